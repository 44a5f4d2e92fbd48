"""How a save ends: the daemon's replies, a generation's death, the disk's word.

Part of :class:`aiodcp.AsyncCheckpointer` (a mixin). :meth:`Outcomes._finish` is the one
place a handle lets go of its generation, slot and step.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread

from .._disk._store import Store
from .._errors import (
    CheckpointCancelledError,
    CheckpointError,
    CheckpointExistsError,
    DaemonDiedError,
    SaveFailedError,
)
from .._wire import _protocol as p
from ._generation import Generation, describe_exit
from ._handle import SaveEvent, SaveHandle, SaveResult
from ._parts import Parts
from ._watch import notify_commit

log = logging.getLogger("aiodcp")

__all__ = ["Outcomes", "latest_on_disk"]


class Outcomes(Parts):
    def _send_cancel(self, handle: SaveHandle) -> None:
        gen = handle._gen
        if gen is not None and handle._req_id in gen.pending:
            gen.send(p.Cancel(handle._req_id))

    # ------------------------------------------------------- daemon messages
    def _on_message(self, gen: Generation, msg: p.Message) -> None:
        """A reply from ``gen``: it can only concern ``gen``'s own handles (fencing)."""
        req_id = getattr(msg, "req_id", None)
        handle = gen.pending.get(req_id) if isinstance(req_id, int) else None
        if handle is None:
            return
        if isinstance(msg, p.Progress):
            phase: Literal["writing", "written", "uploading"] = (
                msg.phase if msg.phase in ("written", "uploading") else "writing"  # type: ignore[assignment]
            )
            self._emit(handle, phase, msg.bytes_written, msg.total_bytes)
        elif isinstance(msg, p.Saved):
            self._committed(handle, msg.nbytes, msg.persist_seconds, recovered=False)
        elif isinstance(msg, p.SaveFailed):
            error: CheckpointError
            if msg.cancelled:
                error = CheckpointCancelledError(
                    f"save of step {handle.step} was cancelled ({msg.message}); "
                    "nothing was published",
                    step=handle.step,
                )
            else:
                log.debug("daemon traceback of step %d:\n%s", handle.step, msg.traceback)
                error = SaveFailedError(  # the traceback: .remote_traceback and debug log
                    f"save of step {handle.step} failed in the daemon: {msg.error_type}: "
                    f"{msg.message.strip().partition(chr(10))[0][:500]}",
                    step=handle.step,
                    remote_type=msg.error_type,
                    remote_traceback=msg.traceback,
                )
            # (a step that already existed is committed, but not by this save)
            if msg.cancelled or handle._overwrite or msg.error_type == "CheckpointExistsError":
                self._finish(handle, None, error)
                self._unobserved.append(handle)
            else:
                # With several ranks a failure may come after rank 0 renamed the step
                # (e.g. rank 0's daemon died right after): the disk decides.
                gen.pending.pop(handle._req_id, None)
                self._spawn(self._settle_from_disk, handle, error, name="settle from disk")

    async def _settle_from_disk(self, handle: SaveHandle, error: CheckpointError) -> None:
        committed = await anyio.to_thread.run_sync(self.store.is_committed, handle.step)
        if committed:
            log.warning("step %d was committed although its save reported: %s", handle.step, error)
            self._committed(handle, handle._nbytes, 0.0, recovered=True)
        else:
            self._finish(handle, None, error)
            self._unobserved.append(handle)

    def _committed(self, handle: SaveHandle, nbytes: int, persist: float, recovered: bool) -> None:
        self._high_step = max(self._high_step, handle.step)
        result = SaveResult(
            step=handle.step,
            path=self.store.step_path(handle.step),
            nbytes=nbytes,
            stage_seconds=handle._stage_seconds,
            persist_seconds=persist,
            recovered=recovered,
            _store=self.store,
        )
        if self._finish(handle, result, None):
            self._emit(handle, "committed", nbytes, nbytes)
            notify_commit(self.root, handle.step)

    def _finish(
        self, handle: SaveHandle, result: SaveResult | None, error: BaseException | None
    ) -> bool:
        """The one way a save ends: its generation and step let go of it, and its slot
        once its copy has stopped (:meth:`_settle`)."""
        if handle._gen is not None:
            handle._gen.pending.pop(handle._req_id, None)
        self._reserved.discard(handle.step)
        if isinstance(error, CheckpointExistsError):  # taken on disk meanwhile: skip it
            self._high_step = max(self._high_step, handle.step)
        first = handle._finish(result, error)
        self._settle(handle)
        if first and error is not None:
            self._emit(handle, "failed", 0, 0)
        return first

    def _settle(self, handle: SaveHandle) -> None:
        """Give a done handle's slot back -- only once its copy thread has stopped, which
        owns the slot until then (a caller cancelled mid-copy returns before it stops)."""
        if not handle.done() or (handle._copy is not None and not handle._copy.stopped.is_set()):
            return
        if handle._slot is not None:
            self._slots.give(handle._slot, handle)
            handle._slot = None
        self._inflight.discard(handle)
        handle._settled.set()

    async def _on_exit(self, gen: Generation) -> None:
        """``gen``'s process is reaped: settle *its* handles, from the disk's point of view.

        A step whose directory is there was committed (the rename is the commit
        point), even if the daemon died before it could say so.
        """
        handles = list(gen.pending.values())
        fresh = [h.step for h in handles if not h._overwrite]  # an overwrite's step existed
        committed, taken = await anyio.to_thread.run_sync(self._after_death, fresh)
        self._high_step = max(self._high_step, taken)  # on the loop, never in the thread
        for handle in handles:
            if handle.step in committed:
                log.warning(
                    "daemon died after committing step %d; outcome re-read from disk", handle.step
                )
                self._committed(handle, handle._nbytes, 0.0, recovered=True)
            else:
                self._finish(handle, None, self._died_error(gen, handle.step))
                self._unobserved.append(handle)

    def _after_death(self, steps: list[int]) -> tuple[set[int], int]:
        """Worker thread: which of ``steps`` are committed, the highest step taken on
        disk; repair derived state."""
        committed = {s for s in steps if self.store.is_committed(s)}
        if self.rank == 0:
            try:
                self.store.reconcile()
            except OSError as exc:
                log.warning("could not repair latest/.commits in %s: %s", self.root, exc)
        return committed, latest_on_disk(self.store, self.rank)

    def _died_error(self, gen: Generation, step: int | None) -> DaemonDiedError:
        where = f" while saving step {step}" if step is not None else ""
        return DaemonDiedError(
            f"checkpoint daemon (pid {gen.pid}) {describe_exit(gen.returncode)}{where}; "
            "the step was not published",
            returncode=gen.returncode,
            step=step,
        )

    def _emit(self, handle: SaveHandle, phase: Any, written: int, total: int) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(
                SaveEvent(handle.step, phase, written, total, time.perf_counter() - handle._t0)
            )
        except Exception:
            log.exception("on_event callback failed")


def latest_on_disk(store: Store, rank: int) -> int:
    """The highest step taken on disk, committed or not: ``step=None`` picks a higher one."""
    return store.highest_taken_step()
