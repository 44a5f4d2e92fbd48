"""The public parent-side API: ``AsyncCheckpointer``, ``SaveHandle``, ``SaveResult``."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import time
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import sniffio

from . import _protocol as p
from . import _storage
from ._dist import Group, rendezvous, resolve_group
from ._errors import (
    CheckpointCancelledError,
    CheckpointError,
    CheckpointExistsError,
    SaveFailedError,
    WorkerDiedError,
)
from ._load import load_checkpoint
from ._staging import Arena, Flat, dumps_skeleton, flatten
from ._watch import notify_commit, watch
from ._worker import Worker, describe_exit

__all__ = ["AsyncCheckpointer", "SaveEvent", "SaveHandle", "SaveResult"]

log = logging.getLogger("aiodcp")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


@dataclass(frozen=True)
class SaveResult:
    """What a committed (or skipped) save produced."""

    step: int
    path: Path
    metadata: Any
    """DCP's ``Metadata`` of the checkpoint (``None`` when skipped)."""
    nbytes: int
    """Bytes of tensor data staged and written."""
    stage_seconds: float
    """Time ``save()`` held the caller: waiting for a staging slot plus the copy."""
    persist_seconds: float
    """Time the daemon took to write, make durable and commit."""
    skipped: bool = False
    """True when ``when_busy="skip"`` dropped this save; nothing was written."""


@dataclass(frozen=True)
class SaveEvent:
    """Progress of one save, for UIs and notebooks (see ``on_event``)."""

    step: int
    phase: Literal["staged", "writing", "written", "committed", "failed", "skipped"]
    bytes_written: int
    total_bytes: int
    seconds: float
    """Seconds since ``save()`` was called."""


class SaveHandle:
    """A staged save. ``await handle`` returns its :class:`SaveResult` once committed.

    Awaiting is safe to cancel (e.g. under ``anyio.fail_after``): the save goes
    on, only the waiting stops. :meth:`cancel` cancels the save itself.
    """

    def __init__(self, owner: AsyncCheckpointer | None, step: int, req_id: int) -> None:
        self._owner = owner
        self.step = step
        self._req_id = req_id
        self._event = anyio.Event()
        self._result: SaveResult | None = None
        self._error: BaseException | None = None
        self._observed = False
        self._cancel_requested = False
        self._t0 = time.perf_counter()
        self._stage_seconds = 0.0
        self._slot: _Slot | None = None

    def done(self) -> bool:
        """True once the save is committed, failed or cancelled."""
        return self._event.is_set()

    def cancel(self) -> bool:
        """Ask the daemon to abort this save at its next write boundary.

        Returns False if the save already finished. If the save reaches its
        commit point first, it commits and ``await handle`` returns normally;
        otherwise ``await handle`` raises :class:`CheckpointCancelledError` and
        nothing is published. With several ranks, the step is cancelled on all.
        """
        if self.done():
            return False
        self._cancel_requested = True
        if self._owner is not None:
            self._owner._send_cancel(self)
        return True

    def result(self) -> SaveResult:
        """The result of a finished save (raises its error); never waits."""
        if not self.done():
            raise anyio.WouldBlock(f"save of step {self.step} is still in flight")
        self._observed = True
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    async def wait(self) -> SaveResult:
        """Same as ``await handle``."""
        await self._event.wait()
        return self.result()

    def __await__(self) -> Generator[Any, None, SaveResult]:
        return self.wait().__await__()

    def __repr__(self) -> str:
        state = "pending"
        if self.done():
            state = "failed" if self._error is not None else "committed"
        return f"<SaveHandle step={self.step} {state}>"

    # -- owner side
    def _finish(self, result: SaveResult | None, error: BaseException | None) -> None:
        if self.done():
            return
        self._result, self._error = result, error
        if isinstance(error, CheckpointCancelledError) and self._cancel_requested:
            self._observed = True  # the caller asked for it
        self._event.set()


@dataclass
class _Slot:
    arena: Arena | None = None
    busy: bool = False
    retired: list[Arena] = field(default_factory=list)
    """Arenas this slot replaced; released (daemon and parent) on the loop."""


class AsyncCheckpointer:
    """Checkpoint PyTorch state from async code, in a background daemon.

    ``async with AsyncCheckpointer(root) as ckpt`` starts the daemon (so the
    first save does not pay for it) and stops it on exit: a normal exit waits
    for in-flight saves; an exit by exception or cancellation cancels them
    (nothing half-written is published). Every committed checkpoint is a plain
    DCP directory ``root/step_<N>``.

    Args:
        root: directory holding the checkpoints (created if missing).
        process_group: group whose ranks save together; ``None`` means the
            default group when ``torch.distributed`` is initialised, else a
            single process with no collectives.
        init_timeout: seconds the daemon may take to start (spawn + GLOO init).
        shutdown_timeout: seconds a graceful daemon exit may take before SIGTERM.
        use_prefix_store: daemons meet on a ``PrefixStore`` over the trainer's
            ``MASTER_ADDR``/``MASTER_PORT`` store instead of a fresh port
            (default: ``DCP_USE_PREFIX_STORE=1``).
        disable_automatic_gc: no automatic GC in the daemon (default:
            ``DCP_DISABLE_AUTOMATIC_GC=1``); it then collects after each save
            and freezes after the first, unless ``disable_manual_gc``
            (default: ``DCP_DISABLE_MANUAL_GC=1``).
        max_inflight: saves that may be staged or persisting at once; each has
            its own shared-memory arena (reused across saves of one layout).
        when_busy: ``"wait"`` for a free slot, or ``"skip"`` the save (its
            result has ``skipped=True``) when every slot is busy.
        keep_last, keep_every: retention after each commit: keep the newest
            ``keep_last`` steps and every step divisible by ``keep_every``.
        collective_timeout: seconds a collective between daemons may take.
        thread_count: DCP ``FileSystemWriter`` threads in the daemon (2 persisted
            1 GiB at about 1.1 GiB/s here against 0.5-0.6 GiB/s with 1).
        daemon_niceness: added to the daemon's nice value (CPU and, by default,
            I/O priority), so persisting steals less from training.
        on_event: called on the event loop with each :class:`SaveEvent`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        process_group: Any = None,
        init_timeout: float = 1800.0,
        shutdown_timeout: float = 60.0,
        use_prefix_store: bool | None = None,
        disable_automatic_gc: bool | None = None,
        disable_manual_gc: bool | None = None,
        max_inflight: int = 1,
        when_busy: Literal["wait", "skip"] = "wait",
        keep_last: int | None = None,
        keep_every: int | None = None,
        collective_timeout: float = 600.0,
        thread_count: int = 2,
        daemon_niceness: int = 0,
        on_event: Callable[[SaveEvent], None] | None = None,
    ) -> None:
        if not isinstance(max_inflight, int) or max_inflight < 1:
            raise ValueError(f"max_inflight must be an int >= 1, got {max_inflight!r}")
        if when_busy not in ("wait", "skip"):
            raise ValueError(f"when_busy must be 'wait' or 'skip', got {when_busy!r}")
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise ValueError(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
        if keep_every is not None and (not isinstance(keep_every, int) or keep_every < 1):
            raise ValueError(f"keep_every must be an int >= 1 or None, got {keep_every!r}")
        for name, value in (
            ("init_timeout", init_timeout),
            ("shutdown_timeout", shutdown_timeout),
            ("collective_timeout", collective_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        self.root = Path(root).absolute()
        self._process_group = process_group
        self.init_timeout = float(init_timeout)
        self.shutdown_timeout = float(shutdown_timeout)
        self.use_prefix_store = (
            _env_flag("DCP_USE_PREFIX_STORE") if use_prefix_store is None else use_prefix_store
        )
        self.disable_automatic_gc = (
            _env_flag("DCP_DISABLE_AUTOMATIC_GC")
            if disable_automatic_gc is None
            else disable_automatic_gc
        )
        self.disable_manual_gc = (
            _env_flag("DCP_DISABLE_MANUAL_GC") if disable_manual_gc is None else disable_manual_gc
        )
        self.max_inflight = max_inflight
        self.when_busy = when_busy
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.collective_timeout = float(collective_timeout)
        self.thread_count = int(thread_count)
        self.daemon_niceness = int(daemon_niceness)
        self.on_event = on_event

        self._group: Group | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._worker: Worker | None = None
        self._worker_lock: anyio.Lock | None = None
        self._slots = [_Slot() for _ in range(max_inflight)]
        self._slot_free: anyio.Semaphore | None = None
        self._pending: dict[int, SaveHandle] = {}
        self._handles: list[SaveHandle] = []
        self._next_req = 0
        self._high_step = -1
        self._reserved: set[int] = set()
        self._lock: _storage.WriterLock | None = None
        self._state: Literal["new", "opening", "open", "closing", "closed"] = "new"
        self._host_close: anyio.Event | None = None
        self._host_done: anyio.Event | None = None
        self._host_task: Any = None  # a strong reference: asyncio keeps only weak ones
        self._body_scope: anyio.CancelScope | None = None
        self.preempted: int | None = None
        """The signal that ended the block, after ``handle_signals``; else None."""

    # ------------------------------------------------------------- lifecycle
    @property
    def worker_pid(self) -> int | None:
        """The daemon's pid, or None when no daemon is running."""
        w = self._worker
        return w.pid if w is not None and w.alive else None

    @property
    def rank(self) -> int:
        return self._group.rank if self._group is not None else 0

    async def __aenter__(self) -> AsyncCheckpointer:
        await self._begin()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        opened = await self._finish_open()
        # The body gets a scope of its own, inside the task group's: preemption
        # cancels the body without cancelling our tasks.
        self._body_scope = anyio.CancelScope()
        self._body_scope.__enter__()
        return opened

    async def start(self) -> AsyncCheckpointer:
        """Open without ``async with``, for notebooks (asyncio only).

        In a notebook each cell runs as its own task, so a checkpointer opened in
        one cell and closed in another cannot own a task group entered in the
        first. ``start()`` runs its task group in a host task of its own instead;
        close it with :meth:`aclose`. If the kernel is restarted or killed
        instead, the daemon sees its channel close and exits by itself.
        """
        if sniffio.current_async_library() != "asyncio":
            raise RuntimeError("start() needs asyncio; use `async with AsyncCheckpointer(...)`")
        import asyncio

        await self._begin()
        started = anyio.Event()
        self._host_close = anyio.Event()
        self._host_done = anyio.Event()

        async def host() -> None:
            try:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    started.set()
                    assert self._host_close is not None
                    await self._host_close.wait()
                    tg.cancel_scope.cancel()
            finally:
                assert self._host_done is not None
                self._host_done.set()

        self._host_task = asyncio.get_running_loop().create_task(host())
        await started.wait()
        return await self._finish_open()

    async def aclose(self) -> None:
        """Close a checkpointer opened with :meth:`start` (as a normal ``async with`` exit)."""
        await self.__aexit__(None, None, None)

    async def _begin(self) -> None:
        if self._state != "new":
            raise RuntimeError("an AsyncCheckpointer can be opened only once")
        self._state = "opening"
        self._group = resolve_group(self._process_group)
        self._worker_lock = anyio.Lock()
        self._slot_free = anyio.Semaphore(self.max_inflight)
        await anyio.to_thread.run_sync(self._prepare_root)

    async def _finish_open(self) -> AsyncCheckpointer:
        self._state = "open"
        try:
            await self._ensure_worker()
        except BaseException:
            self._state = "closing"
            await self._close_task_group()
            with anyio.CancelScope(shield=True):
                await self._close_resources()
            raise
        return self

    async def _close_task_group(self) -> None:
        """Stop our tasks. They never raise, so nothing is wrapped in an ExceptionGroup."""
        assert self._tg is not None
        if self._host_close is not None and self._host_done is not None:
            self._host_close.set()
            with anyio.CancelScope(shield=True):
                await self._host_done.wait()
        else:
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)

    def _prepare_root(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise CheckpointError(f"checkpoint root {self.root} exists and is not a directory")
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise CheckpointError(f"checkpoint root {self.root} is not writable")
        if self.rank == 0:
            lock = _storage.WriterLock(self.root)
            lock.acquire()
            self._lock = lock
            removed = _storage.cleanup_leftovers(self.root)
            if removed:
                log.info("removed %d leftovers of interrupted saves in %s", len(removed), self.root)
        latest = _storage.read_latest(self.root)
        self._high_step = -1 if latest is None else latest

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if self._state in ("closing", "closed"):
            return None  # aclose() twice is harmless
        assert self._tg is not None
        preempted = False
        if self._body_scope is not None:
            scope, self._body_scope = self._body_scope, None
            preempted = bool(scope.__exit__(exc_type, exc, tb))
        error: BaseException | None = None
        try:
            if exc_type is None:
                try:
                    await self.wait()
                except CheckpointError as e:
                    error = e
            else:
                for handle in list(self._pending.values()):
                    handle.cancel()
        finally:
            self._state = "closing"
            with anyio.CancelScope(shield=True):
                if self._worker is not None:
                    await self._worker.shutdown(self.shutdown_timeout)
            await self._close_task_group()
            with anyio.CancelScope(shield=True):
                await self._close_resources()
            self._state = "closed"
        if error is not None:
            raise error
        if preempted and self.preempted is not None:
            raise SystemExit(128 + self.preempted)
        return None

    async def _close_resources(self) -> None:
        for handle in list(self._pending.values()):
            handle._finish(
                None,
                CheckpointCancelledError(
                    f"save of step {handle.step} cancelled: checkpointer closed", step=handle.step
                ),
            )
        self._pending.clear()

        def close() -> None:
            for slot in self._slots:
                for arena in [*slot.retired, *filter(None, [slot.arena])]:
                    arena.close()
                slot.retired.clear()
                slot.arena = None
            if self._lock is not None:
                # no daemon runs now: whatever temporaries are left are litter
                _storage.cleanup_leftovers(self.root)
                self._lock.release()
                self._lock = None

        await anyio.to_thread.run_sync(close)

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(
                "AsyncCheckpointer is not open: use `async with AsyncCheckpointer(...) as ckpt` "
                "(or `ckpt = await AsyncCheckpointer(...).start()` in a notebook)"
            )

    async def _ensure_worker(self) -> Worker:
        """The live daemon, starting a fresh one if there is none (all ranks together)."""
        assert self._worker_lock is not None and self._group is not None and self._tg is not None
        async with self._worker_lock:
            if self._worker is not None and self._worker.alive:
                return self._worker
            group = self._group
            if self._worker is not None and group.rank == 0:
                # the previous daemon died: its saves failed, their temporaries are litter
                await anyio.to_thread.run_sync(_storage.cleanup_leftovers, self.root)
            rdv = None
            if group.distributed:
                rdv = await anyio.to_thread.run_sync(rendezvous, group, self.use_prefix_store)
            config = p.DaemonConfig(
                root=str(self.root),
                rank=group.rank,
                world_size=group.world_size if group.distributed else 1,
                master_addr=rdv.master_addr if rdv else "",
                master_port=rdv.master_port if rdv else 0,
                use_prefix_store=self.use_prefix_store,
                token=rdv.token if rdv else "",
                init_timeout=self.init_timeout,
                collective_timeout=self.collective_timeout,
                disable_automatic_gc=self.disable_automatic_gc,
                disable_manual_gc=self.disable_manual_gc,
                thread_count=self.thread_count,
                niceness=self.daemon_niceness,
                keep_last=self.keep_last,
                keep_every=self.keep_every,
                log_level=logging.getLogger("aiodcp").getEffectiveLevel(),
            )
            self._worker = await Worker.start(
                self._tg,
                config,
                init_timeout=self.init_timeout,
                on_message=self._on_message,
                on_exit=self._on_exit,
            )
            log.info("checkpoint daemon pid %d ready (rank %d)", self._worker.pid, group.rank)
            return self._worker

    # ------------------------------------------------------------------ save
    async def save(
        self,
        state_dict: Mapping[str, Any],
        *,
        step: int | None = None,
        overwrite: bool = False,
    ) -> SaveHandle:
        """Stage ``state_dict`` and start persisting it as ``step``; return once staged.

        After this returns the caller may change every tensor in place: the
        checkpoint holds the values at the time of the call. ``step=None`` is
        the latest step + 1 (0 for an empty root). Cancelling the caller while
        it stages aborts the save (nothing is written) and re-raises.

        Raises:
            TypeError: a value cannot be sent to the daemon (the key path is named).
            CheckpointExistsError: ``step`` is committed and ``overwrite`` is False.
        """
        self._check_open()
        _storage.check_step(step)
        assert self._slot_free is not None
        t0 = time.perf_counter()
        if self.when_busy == "skip" and self._slot_free.value == 0:
            return self._skipped(step, t0)
        await self._slot_free.acquire()
        slot = next(s for s in self._slots if not s.busy)
        slot.busy = True
        chosen = self._reserve_step(step)
        try:
            worker = await self._ensure_worker()
            flat, blob = await anyio.to_thread.run_sync(
                self._stage, state_dict, slot, chosen, overwrite, _cuda_stream()
            )
            # The copy itself cannot be interrupted; a cancellation that arrived
            # meanwhile aborts the save here, before anything is sent.
            await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            self._free_slot(slot, chosen)
            raise
        assert slot.arena is not None
        arena = slot.arena
        self._announce_arena(worker, slot)
        req_id = self._next_req
        self._next_req += 1
        handle = SaveHandle(self, chosen, req_id)
        handle._t0 = t0
        handle._stage_seconds = time.perf_counter() - t0
        handle._slot = slot
        self._pending[req_id] = handle
        self._handles.append(handle)
        self._handles = [h for h in self._handles if not (h.done() and h._observed)]
        sent = worker.send(
            p.Save(req_id, chosen, arena.arena_id, flat.specs, overwrite=overwrite, blob=blob)
        )
        self._emit(handle, "staged", 0, flat.nbytes)
        if not sent:  # the daemon died while we staged
            self._fail(handle, self._died_error(worker, chosen))
        return handle

    def _stage(
        self, state_dict: Mapping[str, Any], slot: _Slot, step: int, overwrite: bool, stream: Any
    ) -> tuple[Flat, bytes]:
        """Worker thread: flatten, (re)use an arena, copy, serialise the skeleton."""
        if not overwrite and _storage.step_dir(self.root, step).exists():
            raise CheckpointExistsError(f"step {step} already exists in {self.root}")
        flat = flatten(state_dict)
        self._fit_arena(slot, flat)
        assert slot.arena is not None
        slot.arena.stage(flat, stream=stream)
        blob = dumps_skeleton(flat.skeleton)
        return flat, blob

    @staticmethod
    def _fit_arena(slot: _Slot, flat: Flat) -> None:
        """Give ``slot`` an arena for ``flat``'s layout, retiring the one it replaces."""
        if slot.arena is not None and slot.arena.fingerprint == flat.fingerprint:
            return
        if slot.arena is not None:
            slot.retired.append(slot.arena)
        slot.arena = Arena(flat.nbytes, flat.fingerprint)

    async def prepare(self, state_dict: Mapping[str, Any]) -> None:
        """Allocate and pre-fault the staging memory for ``state_dict``'s layout now.

        Optional: call it once before the training loop and the first ``save()``
        stalls no longer than the later ones (the arena's page faults happen
        here instead). Nothing is saved. A later layout change simply gets a new arena.
        """
        self._check_open()
        assert self._slot_free is not None
        flat = await anyio.to_thread.run_sync(flatten, state_dict)
        worker = await self._ensure_worker()
        for slot in self._slots:
            if slot.busy:
                continue
            await anyio.to_thread.run_sync(self._fit_arena, slot, flat)
            self._announce_arena(worker, slot)

    def _announce_arena(self, worker: Worker, slot: _Slot) -> None:
        """Tell the daemon about ``slot``'s arena and to forget those it replaced."""
        for old in slot.retired:
            if old.arena_id in worker.arenas:
                worker.send(p.ReleaseArena(old.arena_id))
                worker.arenas.discard(old.arena_id)
            old.close()
        slot.retired.clear()
        arena = slot.arena
        if arena is not None and arena.arena_id not in worker.arenas:
            worker.send(p.Arena(arena.arena_id, arena.nbytes), fd=arena.fd)
            worker.arenas.add(arena.arena_id)

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
        handle = SaveHandle(None, chosen, -1)
        handle._observed = True
        self._emit(handle, "skipped", 0, 0)
        handle._finish(
            SaveResult(
                chosen,
                _storage.step_dir(self.root, chosen),
                None,
                0,
                time.perf_counter() - t0,
                0.0,
                skipped=True,
            ),
            None,
        )
        return handle

    def _send_cancel(self, handle: SaveHandle) -> None:
        if self._worker is not None and handle._req_id in self._pending:
            self._worker.send(p.Cancel(handle._req_id))

    # ------------------------------------------------------- daemon messages
    def _on_message(self, msg: p.Message) -> None:
        if isinstance(msg, p.Progress):
            h = self._pending.get(msg.req_id)
            if h is not None:
                phase: Literal["writing", "written"] = (
                    "written" if msg.phase == "written" else "writing"
                )
                self._emit(h, phase, msg.bytes_written, msg.total_bytes)
            return
        if not isinstance(msg, (p.Saved, p.SaveFailed)):
            return
        handle = self._pending.get(msg.req_id)
        if handle is None:
            return
        if isinstance(msg, p.Saved):
            self._high_step = max(self._high_step, msg.step)
            result = SaveResult(
                step=msg.step,
                path=Path(msg.path),
                metadata=pickle.loads(msg.blob) if msg.blob else None,
                nbytes=msg.nbytes,
                stage_seconds=handle._stage_seconds,
                persist_seconds=msg.persist_seconds,
            )
            self._release(handle)
            handle._finish(result, None)
            self._emit(handle, "committed", msg.nbytes, msg.nbytes)
            notify_commit(self.root, msg.step)
        else:
            if msg.fatal and self._worker is not None:
                self._worker.terminating = True  # exiting: the next save starts a new one
            error: CheckpointError
            if msg.cancelled:
                error = CheckpointCancelledError(
                    f"save of step {handle.step} was cancelled ({msg.message}); "
                    "nothing was published",
                    step=handle.step,
                )
            else:
                error = SaveFailedError(
                    f"save of step {handle.step} failed in the daemon: {msg.error_type}: "
                    f"{msg.message}\n--- daemon traceback ---\n{msg.traceback}",
                    step=handle.step,
                    remote_type=msg.error_type,
                    remote_traceback=msg.traceback,
                )
            self._fail(handle, error)

    def _fail(self, handle: SaveHandle, error: BaseException) -> None:
        self._release(handle)
        handle._finish(None, error)
        self._emit(handle, "failed", 0, 0)

    def _release(self, handle: SaveHandle) -> None:
        self._pending.pop(handle._req_id, None)
        slot, handle._slot = handle._slot, None
        self._free_slot(slot, handle.step)

    def _free_slot(self, slot: _Slot | None, step: int) -> None:
        """The save of ``step`` is over (or never started): its step and slot are free."""
        self._reserved.discard(step)
        if slot is not None and slot.busy:
            slot.busy = False
            assert self._slot_free is not None
            self._slot_free.release()

    def _died_error(self, worker: Worker, step: int | None) -> WorkerDiedError:
        where = f" while saving step {step}" if step is not None else ""
        return WorkerDiedError(
            f"checkpoint daemon (pid {worker.pid}) {describe_exit(worker.returncode)}{where}; "
            "the step was not published",
            returncode=worker.returncode,
            step=step,
        )

    def _on_exit(self, worker: Worker) -> None:
        for handle in list(self._pending.values()):
            self._fail(handle, self._died_error(worker, handle.step))
        if self._worker is worker:
            worker.arenas.clear()

    def _emit(self, handle: SaveHandle, phase: Any, written: int, total: int) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(
                SaveEvent(handle.step, phase, written, total, time.perf_counter() - handle._t0)
            )
        except Exception:
            log.exception("on_event callback failed")

    # ------------------------------------------------------------ preemption
    def handle_signals(
        self,
        *signals: int,
        grace: float = 30.0,
        final_save: Callable[[], Any] | None = None,
    ) -> None:
        """Opt in to preemption handling: on one of ``signals`` (e.g. SIGTERM), finish up.

        The signal is received on the event loop (``loop.add_signal_handler``
        semantics, never in a plain signal handler). Then, within ``grace``
        seconds: ``final_save()`` is awaited if given (it may return a
        :class:`SaveHandle`, which is awaited too), every in-flight save is
        awaited until committed, and the ``async with`` body is cancelled; the
        block then exits with ``SystemExit(128 + signal)``. Saves still in flight
        when the grace period ends are cancelled, never published.
        """
        self._check_open()
        if self._host_done is not None:
            raise RuntimeError("handle_signals() needs `async with AsyncCheckpointer(...)`")
        if not signals:
            raise ValueError("name at least one signal, e.g. signal.SIGTERM")
        assert self._tg is not None
        self._tg.start_soon(self._preemption, signals, grace, final_save)

    async def _preemption(
        self, signals: tuple[int, ...], grace: float, final_save: Callable[[], Any] | None
    ) -> None:
        signum = 0
        with anyio.open_signal_receiver(*(signal.Signals(s) for s in signals)) as received:
            async for signum in received:  # noqa: B007  (the first one is enough)
                break
        log.warning("received signal %d: committing in-flight saves (grace %.0fs)", signum, grace)
        self.preempted = int(signum)
        with anyio.move_on_after(grace) as scope:
            try:
                if final_save is not None:
                    result = final_save()
                    if hasattr(result, "__await__"):
                        result = await result
                    if isinstance(result, SaveHandle):
                        await result
                await self.wait()
            except CheckpointError as exc:
                log.error("final checkpoint on signal %d failed: %s", signum, exc)
        if scope.cancelled_caught:
            log.error("grace period of %.0fs ran out; cancelling in-flight saves", grace)
        if self._body_scope is not None:
            self._body_scope.cancel()

    # ----------------------------------------------------------------- other
    async def wait(self) -> None:
        """Wait until every in-flight save is committed; re-raise a failure.

        Raises the first failure no one has retrieved yet (by awaiting its
        handle or an earlier ``wait()``); cancelling ``wait()`` cancels no save.
        """
        for handle in list(self._pending.values()):
            await handle._event.wait()
        failures = [
            h for h in self._handles if h.done() and h._error is not None and not h._observed
        ]
        for h in failures:
            h._observed = True
        self._handles = [h for h in self._handles if not h.done()]
        if failures:
            assert failures[0]._error is not None
            raise failures[0]._error

    async def steps(self) -> list[int]:
        """Committed steps under ``root``, ascending."""
        return await anyio.to_thread.run_sync(_storage.list_steps, self.root)

    async def load(
        self,
        state_dict: Mapping[str, Any],
        *,
        step: int | None = None,
        verify: bool = False,
        fallback: bool = False,
    ) -> int:
        """Load a committed step into ``state_dict`` in place; return the step.

        ``step=None`` loads the latest. Runs DCP's load off the event loop on
        this checkpointer's process group (resharding as DCP does). ``verify``
        and ``fallback`` and the errors are as in :func:`aiodcp.load`.
        """
        self._check_open()
        return await load_checkpoint(
            state_dict,
            self.root,
            step=step,
            group=self._group,
            verify=verify,
            fallback=fallback,
        )

    def watch(
        self, *, include_latest: bool = False, poll_interval: float = 0.5
    ) -> AsyncIterator[int]:
        """``aiodcp.watch`` on this checkpointer's root."""
        return watch(self.root, include_latest=include_latest, poll_interval=poll_interval)


def _cuda_stream() -> Any:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return torch.cuda.current_stream()
    return None
