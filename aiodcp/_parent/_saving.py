"""How a save starts: a slot and a step taken, the daemons agreed on, the copy, the send.

Part of :class:`aiodcp.AsyncCheckpointer` (a mixin, for one concern per module).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import torch

from .._disk import _storage
from .._errors import (
    CheckpointCancelledError,
    CheckpointError,
    CheckpointExistsError,
)
from .._staging._arena import memfd_with
from .._staging._staging import _is_stateful, dumps_skeleton, flatten, gc_paused, quick_switching
from .._wire import _protocol as p
from ._generation import Generation
from ._handle import SaveHandle, SaveResult
from ._parts import Parts
from ._slots import CopyThread, Slot

log = logging.getLogger("aiodcp")

__all__ = ["Saving"]


class Saving(Parts):
    async def save(
        self,
        state_dict: Mapping[str, Any],
        *,
        step: int | None = None,
        overwrite: bool = False,
        overlap: bool = False,
        publish: bool = False,
    ) -> SaveHandle:
        """Stage ``state_dict`` and start persisting it as ``step``.

        By default this returns once staged: the caller may then change every
        tensor in place, the checkpoint holds the values at the time of the call.
        With ``overlap=True`` it returns at once and the copy runs in a worker
        thread (GIL released) while the caller goes on: the tensors must not be
        mutated until ``await handle.staged()`` -- :meth:`guard` makes optimizers
        and modules wait for that by themselves. Top-level ``Stateful`` values
        (modules, optimizers, schedulers) give their ``state_dict()`` at the call
        either way. The daemon starts persisting as soon as the copy is done,
        without waiting for the caller to yield to the event loop. ``step=None``
        is the latest step + 1. ``publish=True`` also publishes the staged bytes to
        live readers as version ``step`` (see :meth:`publish`; one more memory copy
        in the copy thread, under the publisher's ``when_full`` policy).

        Cancelling the caller while it stages (any way: anyio, asyncio's
        ``task.cancel()``/``timeout``/``wait_for``, trio) raises at once and aborts
        the save: nothing is sent or published. The copy itself stops on its own
        a moment later; its slot is busy until then (``wait()`` covers it).

        Raises:
            TypeError: a value cannot be sent to the daemon (the key path is named;
                with ``overlap=True`` the handle fails with it instead).
            CheckpointExistsError: ``step`` is committed or already being saved,
                and ``overwrite`` is False.
        """
        self._check_open()
        _storage.check_step(step)
        if overwrite and self.store.remote:
            raise ValueError(f"overwrite=True is not supported on an object store ({self.store})")
        assert self._daemons is not None
        t0 = time.perf_counter()
        handle = SaveHandle(-1, self._send_cancel)
        handle._t0 = t0
        handle._overwrite = overwrite
        if self.when_busy == "skip" and not self._slots.any_free:
            return self._skipped(step, t0)
        if overlap:  # the values are the call's; only tensors are copied later
            state_dict = taken_now(state_dict)
        slot = await self._slots.take(handle)
        handle._slot = slot
        try:
            handle.step = self._reserve_step(step)
            self._inflight.add(handle)
            gen = await self._daemons.for_save()
            if publish:
                handle._ticket = await self._reserve_publication(handle.step)
        except BaseException as exc:
            if handle._ticket is not None:
                handle._ticket.close()
            self._finish(handle, None, _as_error(exc, handle.step))
            raise
        # From here the save's stage task owns it: the copy (its own thread), the slot
        # until the copy has stopped, the skeleton's fd, the hand-over to the daemon.
        # A guard blocking this (the loop's) thread may hand the save over first.
        copying = CopyThread(
            self._stage_blocking,
            state_dict,
            handle,
            overwrite,
            _cuda_stream(),
            self._early_pointers(),
            on_stop=functools.partial(_copy_stopped, handle),
        )
        handle._copy = copying
        handle._copying = (copying, gen, overwrite)
        self._spawn(self._stage, handle, gen, copying, name="stage")
        if overlap:
            return handle
        try:
            await handle.staged()
        except BaseException:
            handle._observed = True
            handle.cancel()  # the stage task aborts it once the copy has stopped
            raise
        if handle.done() and handle._copy_error is not None:
            handle._observed = True  # the copy's own error (TypeError, step exists): raised here
            raise handle._error if handle._error is not None else handle._copy_error
        return handle  # sent; or failed later (its daemon died meanwhile): the handle says so

    async def _stage(self, handle: SaveHandle, gen: Generation, copying: CopyThread) -> None:
        """The save's owner from its copy to its hand-over: wait for the copy to stop
        (shielded), then send the save to ``gen`` or finish the handle with the reason."""
        try:
            try:
                fd, nbytes = await copying.result()
            except BaseException as exc:
                handle._copying = None
                self._finish_unsent(handle, _as_error(exc, handle.step))
                if exc is not copying.error:  # not the copy's error: we are cancelled
                    raise  # (natively: the loop is ending; the shield stops anyio's)
                return
        finally:
            self._settle(handle)  # a handle already done lets go of its slot now
        if handle._copying is None:  # a guard handed it over (and closed fd) already
            return
        _, _, overwrite = handle._copying
        handle._copying = None
        try:
            if handle.done():  # finished meanwhile (the checkpointer closed)
                return
            # A cancellation that arrived during the copy aborts the save here. Alone,
            # nothing is sent. With several ranks the save is sent and cancelled at once,
            # so every rank's daemon still takes part in (and agrees to cancel) this
            # step: the ranks stay in lockstep.
            lockstep = self._group is not None and self._group.distributed
            if handle._cancel_requested and not lockstep:
                self._finish_unsent(
                    handle,
                    CheckpointCancelledError(
                        f"save of step {handle.step} was cancelled while staging; "
                        "nothing was published",
                        step=handle.step,
                    ),
                )
                return
            self._send_save(handle, gen, handle._slot, fd, nbytes, overwrite)
            if handle._cancel_requested:
                self._send_cancel(handle)
        except Exception as exc:
            if handle._gen is None:  # not sent: the handle reports it
                self._finish_unsent(handle, exc)
            return
        finally:
            os.close(fd)
        handle._staged_event.set()
        self._emit(handle, "staged", 0, handle._nbytes)

    def _finish_unsent(self, handle: SaveHandle, error: BaseException) -> None:
        """Finish a save that never reached a daemon; its error waits for ``wait()``
        unless its caller has seen it."""
        if self._finish(handle, None, error) and not handle._observed:
            self._unobserved.append(handle)

    def _early_pointers(self) -> frozenset[int]:
        """Storage addresses of guarded modules' buffers: copied first, so a guarded
        forward (which may update them, as BatchNorm does) waits only for those."""
        return frozenset(p for guard in self._guards for p in guard.buffer_pointers())

    def _stage_blocking(
        self,
        state_dict: Mapping[str, Any],
        handle: SaveHandle,
        overwrite: bool,
        stream: Any,
        early: frozenset[int],
    ) -> tuple[int, int]:
        """Copy thread: flatten, fit the slot's arena, copy, write the skeleton memfd."""
        step = handle.step
        if (lost := self.store.writer_lost()) is not None:
            raise CheckpointError(lost)
        if not overwrite and self.store.exists(step, quick=True):
            raise self.store.exists_error(step)
        # No GC pass (a full collection can hold the GIL for 100s of ms), and short
        # GIL switch intervals, while this thread runs Python code per tensor. Both
        # are this thread's to restore, whatever happens to the caller.
        with gc_paused(), quick_switching():
            flat = flatten(state_dict)
            slot = handle._slot
            arena = slot.fit(flat)
            first = []
            if early:  # guarded modules' buffers go first
                first = [i for i, t in enumerate(flat.tensors) if t.data_ptr() in early]
            arena.stage(flat, stream=stream, first=first, on_first=handle._buffers_flag.set)
            handle._nbytes = arena.used_bytes
            handle._stage_seconds = time.perf_counter() - handle._t0
            handle._staged_flag.set()  # the sources may change now (guards wake up here)
            blob = dumps_skeleton(flat.skeleton)
            if handle._ticket is not None:  # publish the staged bytes (a sealed copy)
                handle._ticket.fill_from_arena(arena, flat)
        return memfd_with(blob, f"aiodcp-skeleton-{step}"), len(blob)

    def hand_over_staged(self) -> None:
        """Hand every overlapped save whose copy is done to its daemon, now.

        A guard calls this right after ``optimizer.step()`` waited for the copies, in the
        thread that called it: when that is the event loop's (an async training loop,
        whose synchronous steps keep the loop from running its own tasks), the saves
        are sent from here instead of whenever the loop next gets to run. Elsewhere, or
        for a save being cancelled, the save's own task does it.
        """
        if self._loop_thread != threading.get_ident():
            return
        for handle in list(self._inflight):
            pending = handle._copying
            if pending is None or not handle.is_staged() or handle._cancel_requested:
                continue
            if handle.done():
                continue
            copying, gen, overwrite = pending
            if self._group is not None and self._group.distributed:
                continue  # ranks hand over in lockstep, from their tasks
            value = copying.join()  # after the copy: the skeleton's memfd, a few ms at most
            if value is None:
                continue  # it failed: its task reports the error
            handle._copying = None
            fd, nbytes = value
            try:
                self._send_save(handle, gen, handle._slot, fd, nbytes, overwrite)
            except Exception as exc:  # never into the user's optimizer.step()
                if handle._gen is None:
                    self._finish_unsent(handle, exc)  # not sent: the handle reports it
                continue  # sent: its generation finishes it
            finally:
                os.close(fd)
            handle._staged_event.set()
            self._emit(handle, "staged", 0, handle._nbytes)

    def _send_save(
        self, handle: SaveHandle, gen: Generation, slot: Slot, fd: int, nbytes: int, ow: bool
    ) -> None:
        """Hand the handle to ``gen`` (on the loop, no await in between: atomic)."""
        if not gen.alive:  # it died while we staged: the handle reports it
            self._finish(handle, None, self._died_error(gen, handle.step))
            self._unobserved.append(handle)
            return
        slot.announce(gen)
        assert slot.arena is not None
        handle._req_id = self._next_req
        self._next_req += 1
        handle._gen = gen
        handle._move("persisting")
        gen.pending[handle._req_id] = handle
        gen.send(p.Save(handle._req_id, handle.step, slot.arena.arena_id, nbytes, ow), fd=fd)
        if slot.retired:
            self._spawn(anyio.to_thread.run_sync, slot.close_retired, name="close arenas")

    async def prepare(self, state_dict: Mapping[str, Any]) -> None:
        """Allocate and pre-fault the staging memory for ``state_dict``'s layout now.

        Optional: call it once before the training loop and the first ``save()``
        stalls no longer than the later ones (the arena's page faults happen
        here instead). Nothing is saved. Slots that a save holds are left alone:
        ``prepare()`` never shares a slot with a save. A later layout change
        simply gets a new arena.
        """
        self._check_open()
        assert self._daemons is not None
        flat = await anyio.to_thread.run_sync(flatten, state_dict)
        token = object()
        taken: list[Slot] = []
        try:
            while (slot := self._slots.try_take(token)) is not None:
                taken.append(slot)
            for slot in taken:
                await anyio.to_thread.run_sync(slot.fit, flat)
                gen = self._daemons.current
                if gen is not None and gen.alive:
                    slot.announce(gen)
                await anyio.to_thread.run_sync(slot.close_retired)
        finally:
            for slot in taken:
                self._slots.give(slot, token)

    def _next_step(self) -> int:
        return max(self._high_step, max(self._reserved, default=-1)) + 1

    def _reserve_step(self, step: int | None) -> int:
        if step is None:
            step = self._next_step()
        elif step in self._reserved:
            raise CheckpointExistsError(f"step {step} is already being saved")
        self._reserved.add(step)
        return step

    def _skipped(self, step: int | None, t0: float) -> SaveHandle:
        chosen = step if step is not None else self._next_step()
        handle = SaveHandle(chosen)
        handle._observed = True
        self._emit(handle, "skipped", 0, 0)
        handle._finish(
            SaveResult(
                chosen,
                self.store.step_path(chosen),
                0,
                time.perf_counter() - t0,
                0.0,
                skipped=True,
            ),
            None,
        )
        return handle


def _copy_stopped(handle: SaveHandle, error: BaseException | None) -> None:
    """The copy thread's last act: after a failure nothing reads the sources any more,
    so guards waiting on them wake up (and report ``error``)."""
    if handle._ticket is not None:
        handle._ticket.close()  # a publication never filled gives its place back
    if error is not None:
        handle._copy_error = error
        handle._buffers_flag.set()
        handle._staged_flag.set()


def _as_error(exc: BaseException, step: int) -> Exception:
    if isinstance(exc, Exception):
        return exc
    return CheckpointCancelledError(f"save of step {step} was cancelled", step=step)


def taken_now(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """``state_dict`` with its top-level ``Stateful`` values replaced by their
    ``state_dict()``, called now: the Python values in them (a learning rate, a step
    count) are the call's, whatever changes before an overlapped copy runs."""
    if not isinstance(state_dict, Mapping) or not any(_is_stateful(v) for v in state_dict.values()):
        return state_dict
    return {
        k: (_hyper_cloned(v.state_dict()) if _is_stateful(v) else v) for k, v in state_dict.items()
    }


def _hyper_cloned(state: Any) -> Any:
    """An optimizer's state dict with the tensors in its ``param_groups`` cloned: a
    tensor learning rate is updated in place by a scheduler, which no guard sees."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or not any(
        isinstance(v, torch.Tensor) for g in groups if isinstance(g, dict) for v in g.values()
    ):
        return state
    return {
        **state,
        "param_groups": [
            {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in g.items()}
            if isinstance(g, dict)
            else g
            for g in groups
        ],
    }


def _cuda_stream() -> Any:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return torch.cuda.current_stream()
    return None
