"""One save in the daemon: agree -> write into a temporary directory -> agree -> commit.

Part of :class:`aiodcp._daemon._daemon.Daemon` (a mixin: the daemon's process, channel and
threads live there; what its saver thread does with each save lives here). Every rank
runs the same saves in the same order, because DCP's collectives need it; at two points
the ranks vote (``ok``, ``cancel``, ``dying``) so that a cancellation or a dying daemon
on any rank ends the save on all of them alike.
"""

from __future__ import annotations

import enum
import gc
import io
import logging
import os
import pickle
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from .._disk import _retention, _storage
from .._disk._store import Store
from .._staging._arena import MappedArena
from .._staging._staging import MeshSpec, PickledLeaf, rebuild
from .._wire import _protocol as p
from .._wire._protocol import DaemonConfig as Config
from ._dcp_errors import DaemonExiting, PeerFailed, SaveCancelled, is_cancellation
from ._dcp_errors import save as dcp_save

__all__ = ["Persisting", "Request", "Stop", "Stopping"]

log = logging.getLogger("aiodcp.daemon")


def _slow_write() -> float:
    """Test-only fault injection: seconds to sleep before each write item, so tests can
    kill or cancel mid-persist (read at each write: a
    daemon forked from the fork server has the environment of its own spawn)."""
    return float(os.environ.get("AIODCP_TEST_SLOW_WRITE", "0") or 0)


# At most one "writing" report per this many seconds and save: a live line moves ten
# times a second, and the parent's loop is not woken per MiB.
_REPORT_EVERY = 0.1


@dataclass
class Request:
    msg: p.Save
    skeleton: bytes
    cancel: threading.Event = field(default_factory=threading.Event)
    reason: str = "cancelled by the parent"


# How a rank votes at each agreement point of a save.
_OK, _CANCEL, _DYING = "ok", "cancel", "dying"


class Stop(enum.Enum):
    """Why the daemon stops: TERMINATE (the parent asked: finish, then exit), SIGTERM,
    HALT (the parent is gone or unusable, or the group is no longer trusted)."""

    RUNNING = "running"
    TERMINATE = "terminate"
    SIGTERM = "SIGTERM"
    HALT = "halt"


class Stopping:
    """The daemon's stop state. It moves once, out of RUNNING; the first reason wins
    (a later one is ignored, never an error: a SIGTERM during a graceful exit is still
    a graceful exit)."""

    def __init__(self) -> None:
        self.kind = Stop.RUNNING
        self.reason = ""

    def enter(self, kind: Stop, reason: str) -> bool:
        if kind is Stop.RUNNING:
            raise RuntimeError("a daemon never goes back to running")
        if self.kind is not Stop.RUNNING:
            return False
        self.kind, self.reason = kind, reason
        return True

    @property
    def dying(self) -> bool:
        """Stopping for a reason that aborts saves (not a graceful Terminate)."""
        return self.kind in (Stop.SIGTERM, Stop.HALT)


class Persisting:
    """The save path of the daemon (see the module docstring)."""

    cfg: Config
    root: Path
    store: Store
    pg: Any
    arenas: dict[int, MappedArena]
    doomed: set[int]
    requests: dict[int, Request]
    tmp_dirs: set[Path]
    stopping: Stopping
    first_save: bool

    def send(self, msg: p.Message) -> bool:
        raise NotImplementedError

    def mesh(self, spec: MeshSpec) -> Any:
        raise NotImplementedError

    def _halt(self, reason: str, kind: Stop = ...) -> None:
        raise NotImplementedError

    def _agree(self, obj: Any) -> list[Any]:
        if self.pg is None:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.cfg.world_size
        try:
            dist.all_gather_object(out, obj)
        except RuntimeError as exc:  # gloo: a peer's daemon vanished mid-collective
            raise PeerFailed(f"lost contact with another rank's daemon: {exc}") from exc
        return out

    def _vote(self, req: Request) -> str:
        if self.stopping.dying:
            return _DYING
        return _CANCEL if req.cancel.is_set() else _OK

    def _check_votes(self, req: Request, votes: list[str]) -> None:
        """Dying peers fail the save on every rank; a cancel anywhere cancels it."""
        if self._vote(req) == _DYING:
            raise DaemonExiting(req.reason)
        dying = [rank for rank, v in enumerate(votes) if v == _DYING]
        if dying:
            raise PeerFailed(f"the checkpoint daemon of rank(s) {dying} is exiting mid-save")
        if _CANCEL in votes:
            raise SaveCancelled(req.reason)

    def _save(self, req: Request) -> None:
        msg = req.msg
        t0 = time.perf_counter()
        tmp: Path | None = None
        began = False
        try:
            token = _storage.new_token()
            votes = self._agree((msg.step, self._vote(req), token))
            steps = {v[0] for v in votes}
            if len(steps) != 1:
                raise RuntimeError(f"ranks disagree on the step to save: {sorted(steps)}")
            self._check_votes(req, [v[1] for v in votes])
            tmp = self.store.tmp_dir(msg.step, votes[0][2])
            self.tmp_dirs.add(tmp)
            if not msg.overwrite and self.store.exists(msg.step):
                raise self.store.exists_error(msg.step)
            if self.cfg.rank == 0:
                began = True
                self.store.begin(msg.step)  # an object store's intent (a no-op locally)
            nbytes = self._write(req, tmp)
            self._check_votes(req, self._agree(self._vote(req)))
            err = self._commit(req, tmp)
            if err:
                raise RuntimeError(err)
            self.tmp_dirs.discard(tmp)
            # Retention runs before the reply: once the handle resolves, steps() is final.
            self._retain()
            path = self.store.step_path(msg.step)
            seconds = time.perf_counter() - t0
            self.send(p.Saved(msg.req_id, msg.step, str(path), nbytes, seconds))
            log.info("step %d committed (%d bytes, %.3fs)", msg.step, nbytes, seconds)
        except BaseException as exc:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                self.tmp_dirs.discard(tmp)
            if began:
                try:
                    self.store.abandon(msg.step)  # an object store: what was uploaded
                except Exception as cleanup:
                    log.warning("could not clean up step %d: %s", msg.step, cleanup)
            cancelled = is_cancellation(exc)
            if self.stopping.dying:
                return  # dying (SIGTERM, parent gone): the parent reports our death
            # With several ranks, a failure (unlike a cancellation, which the ranks
            # agree on by vote) may have left the daemons' group mid-collective or
            # broken (a peer died). Rather than trust it, every daemon exits and the
            # parents start a fresh group for the next save.
            fatal = self.pg is not None and not cancelled
            if cancelled:
                text, tb = req.reason, ""
            else:
                text = self._diagnose(msg) + (str(exc) or repr(exc))
                tb = traceback.format_exc()
                log.warning("save of step %d failed: %s: %s", msg.step, type(exc).__name__, text)
            self.send(
                p.SaveFailed(
                    msg.req_id,
                    type(exc).__name__,
                    p.clip(text),
                    p.clip(tb),
                    cancelled=cancelled,
                    fatal=fatal,
                )
            )
            if fatal:
                self._halt("process group is no longer trusted after a failed save")
        finally:
            self._after_save(req)

    def _diagnose(self, msg: p.Save) -> str:
        """A plain-words prefix for errors whose cause DCP's message hides (a full disk)."""
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            return ""
        arena = self.arenas.get(msg.arena_id)
        needed = (arena.nbytes if arena is not None else 0) + msg.skeleton_nbytes
        if free < needed + (1 << 20):
            return (
                f"no space left on device ({free} bytes free in {self.root}, "
                f"save needs ~{needed}): "
            )
        return ""

    def _write(self, req: Request, tmp: Path) -> int:
        from . import _writer

        msg = req.msg
        arena = self.arenas[msg.arena_id]
        state = rebuild(pickle.loads(req.skeleton), arena.views, self.mesh)
        total = sum(s.nbytes for s in arena.specs)
        planner = _Planner(req, self, total, caching=self.pg is not None)
        # any writer thread's error fails the save; the bytes are hashed for the manifest
        writer = _writer.VerifiedWriter(
            tmp,
            step=msg.step,
            thread_count=self.cfg.thread_count,
            sync_files=self.cfg.sync_files,
            direct_io=self.cfg.direct_io,
            on_bytes=planner.written,
        )
        dcp_save(state, writer=writer, planner=planner, rank=self.cfg.rank, pg=self.pg)
        planner.report(final=True)
        return total

    def _commit(self, req: Request, tmp: Path) -> str | None:
        """Rank 0 publishes the step once every rank's data is durable; all learn the result."""
        msg = req.msg
        err: str | None = None
        if self.store.remote:
            err = self._upload(req, tmp)
        if err is None and self.cfg.rank == 0:
            try:
                self.store.commit(tmp, msg.step, overwrite=msg.overwrite)
            except BaseException as exc:
                err = f"{type(exc).__name__}: {exc}"
            else:
                if msg.overwrite:  # the old step, unless a reader still reads it
                    _retention.remove_unheld_trash(self.root)
        if self.pg is not None:
            import torch.distributed as dist

            box = [err]
            dist.broadcast_object_list(box, src=0)
            err = box[0]
        return err

    def _upload(self, req: Request, tmp: Path) -> str | None:
        """An object store: every rank uploads its own files; all learn every failure.
        The commit point is the marker, after the upload: until then a cancel on any
        rank stops the uploads (aborted) and cancels the save on all ranks."""

        def should_stop() -> None:
            if self.stopping.dying:
                raise DaemonExiting(self.stopping.reason)
            if req.cancel.is_set():
                raise SaveCancelled(req.reason)

        last = [0.0]

        def progress(sent: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 0.25 or sent == total:
                last[0] = now
                self.send(p.Progress(req.msg.req_id, "uploading", sent, total))

        vote: str | None = None
        try:
            self.store.upload(tmp, req.msg.step, self.cfg.rank, should_stop, progress)
            if req.cancel.is_set():
                vote = _CANCEL
        except BaseException as exc:
            vote = _CANCEL if is_cancellation(exc) else f"{type(exc).__name__}: {exc}"
        votes = self._agree(vote) if self.pg is not None else [vote]
        err = next((v for v in votes if v and v != _CANCEL), None)
        if err is None and _CANCEL in votes:
            raise SaveCancelled(req.reason)
        return err

    def _retain(self) -> None:
        if self.cfg.rank != 0 or self.cfg.keep_last is None:
            return
        try:
            deleted = self.store.apply_retention(self.cfg.keep_last, self.cfg.keep_every)
            if deleted:
                log.info("retention deleted steps %s", deleted)
        except Exception as exc:
            log.warning("retention failed: %s", exc)

    def _after_save(self, req: Request) -> None:
        arena_id = req.msg.arena_id
        if arena_id in self.doomed and not any(
            r is not req and r.msg.arena_id == arena_id for r in list(self.requests.values())
        ):
            self.doomed.discard(arena_id)
            arena = self.arenas.pop(arena_id, None)
            if arena is not None:
                arena.release()
        if self.cfg.disable_automatic_gc and not self.cfg.disable_manual_gc:
            gc.collect()
            if self.first_save:
                gc.freeze()
        self.first_save = False


class _Planner(DefaultSavePlanner):
    """DCP's default planner, plus: cancellation at each write item, progress (the
    writer's threads call :meth:`written` as bytes reach the files), and values the
    parent already serialised written as they are."""

    def __init__(self, req: Request, daemon: Persisting, total: int, caching: bool) -> None:
        # Plan caching (torch >= 2.6) skips re-sending unchanged plans between ranks.
        super().__init__(enable_plan_caching=caching)
        self._req = req
        self._daemon = daemon
        self._total = total
        self._written = 0
        self._last = 0.0
        self._lock = threading.Lock()

    def resolve_data(self, write_item: Any) -> Any:
        if slow := _slow_write():  # fault-injection hook for tests: widen the persist window
            time.sleep(slow)
        if self._req.cancel.is_set():
            if self._daemon.stopping.dying:
                raise DaemonExiting(self._req.reason)
            raise SaveCancelled(self._req.reason)
        obj = self.lookup_object(write_item.index)
        if isinstance(obj, PickledLeaf):
            return io.BytesIO(obj.data)
        return self.transform_object(write_item, obj)

    def written(self, nbytes: int) -> None:
        """A writer thread wrote ``nbytes`` more tensor bytes (called about every MiB)."""
        with self._lock:
            self._written += nbytes
            now = time.monotonic()
            if now - self._last < _REPORT_EVERY:
                return
            self._last = now
            written = min(self._written, self._total)
        self._send("writing", written)

    def report(self, final: bool = False) -> None:
        """Say that every byte is written (``final``), or how many are so far."""
        with self._lock:
            written = self._total if final else min(self._written, self._total)
        self._send("written" if final else "writing", written)

    def _send(self, phase: str, written: int) -> None:
        self._daemon.send(p.Progress(self._req.msg.req_id, phase, written, self._total))
