"""The public parent-side API: ``AsyncCheckpointer``.

Who owns what (see also the state tables in ``_handle``, ``_generation`` and
``_slots``): the checkpointer owns one task group; in it run the daemon
generations (``_generation.Generation``, started by ``_supervisor.Supervisor``),
overlapped staging tasks and the preemption task, each supervised. A save's
handle holds its staging slot and its step from ``save()`` until it is done;
:meth:`AsyncCheckpointer._finish` is the one place that lets them go.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
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
from ._arena import memfd_with
from ._dist import Group, Rendezvous, resolve_group
from ._errors import (
    CheckpointCancelledError,
    CheckpointError,
    CheckpointExistsError,
    SaveFailedError,
    WorkerDiedError,
)
from ._generation import Generation, describe_exit
from ._guard import Guard
from ._handle import SaveEvent, SaveHandle, SaveResult
from ._load import load_checkpoint
from ._slots import Slot, SlotPool
from ._staging import dumps_skeleton, flatten, gc_paused
from ._supervisor import Supervisor
from ._watch import notify_commit, watch

__all__ = ["AsyncCheckpointer", "SaveEvent", "SaveHandle", "SaveResult"]

log = logging.getLogger("aiodcp")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


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
        self._daemons: Supervisor | None = None
        self._slots = SlotPool(max_inflight)
        self._inflight: set[SaveHandle] = set()  # staging or persisting
        self._unobserved: list[SaveHandle] = []  # failed, nobody has seen the error yet
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
        """The daemon's pid, or None when no daemon is serving."""
        gen = self._daemons.current if self._daemons is not None else None
        return gen.pid if gen is not None and gen.alive else None

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
        await anyio.to_thread.run_sync(self._prepare_root)

    async def _finish_open(self) -> AsyncCheckpointer:
        assert self._tg is not None and self._group is not None
        self._daemons = Supervisor(
            self._tg,
            self.root,
            self._group,
            self._daemon_config,
            init_timeout=self.init_timeout,
            agree_timeout=self.collective_timeout,
            shutdown_timeout=self.shutdown_timeout,
            use_prefix_store=self.use_prefix_store,
            on_message=self._on_message,
            on_exit=self._on_exit,
        )
        self._state = "open"
        try:
            await self._daemons.start()
        except BaseException:
            self._state = "closing"
            await self._daemons.stop()
            await self._close_task_group()
            with anyio.CancelScope(shield=True):
                await self._close_resources()
            raise
        return self

    async def _close_task_group(self) -> None:
        """Stop our tasks. They never raise (all supervised), so nothing is wrapped in
        an ExceptionGroup; each is bounded, so this is too."""
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
            appended = _storage.reconcile(self.root)  # the directories are the truth
            if appended:
                log.warning("steps %s were committed but not logged; logged them now", appended)
        self._high_step = max(self._high_step, _latest_on_disk(self.root, self.rank))

    def _daemon_config(self, rdv: Rendezvous | None) -> p.DaemonConfig:
        group = self._group
        assert group is not None
        return p.DaemonConfig(
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

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if self._state in ("closing", "closed"):
            return None  # aclose() twice is harmless
        assert self._tg is not None and self._daemons is not None
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
                for handle in list(self._inflight):
                    handle.cancel()
        finally:
            # Bounded from here on, whatever raised where: shutdown_timeout + ~15 s.
            self._state = "closing"
            await self._daemons.stop()
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
        for handle in list(self._inflight):
            self._finish(
                handle,
                None,
                CheckpointCancelledError(
                    f"save of step {handle.step} cancelled: checkpointer closed", step=handle.step
                ),
            )

        def close() -> None:
            for slot in self._slots.slots:
                slot.close()
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

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: Any, name: str) -> None:
        """Start one of our tasks, supervised: an exception is logged, never propagated
        into the task group (where it would cancel the daemon's tasks)."""
        assert self._tg is not None

        async def supervised() -> None:
            try:
                await fn(*args)
            except Exception:
                log.exception("aiodcp task %r failed", name)

        self._tg.start_soon(supervised, name=name)

    # ------------------------------------------------------------------ save
    async def save(
        self,
        state_dict: Mapping[str, Any],
        *,
        step: int | None = None,
        overwrite: bool = False,
        overlap: bool = False,
    ) -> SaveHandle:
        """Stage ``state_dict`` and start persisting it as ``step``.

        By default this returns once staged: the caller may then change every
        tensor in place, the checkpoint holds the values at the time of the call.
        With ``overlap=True`` it returns at once and the copy runs in a worker
        thread (GIL released) while the caller goes on: the tensors must not be
        mutated until ``await handle.staged()`` -- :meth:`guard` makes an
        optimizer wait for that by itself. Either way the daemon starts
        persisting as soon as the copy is done, without waiting for the caller
        to yield to the event loop. ``step=None`` is the latest step + 1.

        Cancelling the caller while it stages aborts the save (nothing is
        written) and re-raises.

        Raises:
            TypeError: a value cannot be sent to the daemon (the key path is named;
                with ``overlap=True`` the handle fails with it instead).
            CheckpointExistsError: ``step`` is committed or already being saved,
                and ``overwrite`` is False.
        """
        self._check_open()
        _storage.check_step(step)
        assert self._daemons is not None
        t0 = time.perf_counter()
        handle = SaveHandle(-1, self._send_cancel)
        handle._t0 = t0
        handle._overwrite = overwrite
        if self.when_busy == "skip" and not self._slots.any_free:
            return self._skipped(step, t0)
        slot = await self._slots.take(handle)
        handle._slot = slot
        try:
            handle.step = self._reserve_step(step)
            self._inflight.add(handle)
            gen = await self._daemons.for_save()
        except BaseException as exc:
            self._finish(handle, None, exc if isinstance(exc, Exception) else None)
            raise
        stream = _cuda_stream()
        if overlap:
            # Start the copy now, in a thread of its own: a guard may block this (the
            # loop's) thread before the loop runs again, and must not wait for a copy
            # that only the loop could start.
            copying = _Copy(self._stage_blocking, state_dict, handle, overwrite, stream)
            self._spawn(
                self._stage, handle, gen, state_dict, overwrite, stream, copying, name="stage"
            )
            return handle
        await self._stage(handle, gen, state_dict, overwrite, stream, raise_errors=True)
        return handle

    async def _stage(
        self,
        handle: SaveHandle,
        gen: Generation,
        state_dict: Mapping[str, Any],
        overwrite: bool,
        stream: Any,
        copying: _Copy | None = None,
        *,
        raise_errors: bool = False,
    ) -> None:
        """Copy into the handle's slot and send the save to ``gen``: the handle (holding
        the slot and the step) is finished here on any failure, before or after."""
        slot = handle._slot
        try:
            if copying is None:
                fd, nbytes = await anyio.to_thread.run_sync(
                    self._stage_blocking, state_dict, handle, overwrite, stream
                )
            else:
                fd, nbytes = await copying.result()
            try:
                handle._staged_event.set()
                # The copy cannot be interrupted; a cancellation that arrived meanwhile
                # aborts the save here. Alone, nothing is sent. With several ranks the
                # save is sent and cancelled at once, so every rank's daemon still takes
                # part in (and agrees to cancel) this step: the ranks stay in lockstep.
                lockstep = self._group is not None and self._group.distributed
                try:
                    await anyio.lowlevel.checkpoint_if_cancelled()
                except BaseException:
                    if lockstep:
                        handle._cancel_requested = handle._observed = True
                        self._send_save(handle, gen, slot, fd, nbytes, overwrite)
                        self._send_cancel(handle)
                    raise
                if handle._cancel_requested and not lockstep:
                    raise CheckpointCancelledError(
                        f"save of step {handle.step} was cancelled while staging; "
                        "nothing was published",
                        step=handle.step,
                    )
                self._send_save(handle, gen, slot, fd, nbytes, overwrite)
                if handle._cancel_requested:
                    self._send_cancel(handle)
            finally:
                os.close(fd)
        except BaseException as exc:
            if handle._gen is not None:  # sent: its generation finishes it
                raise
            error = (
                exc
                if isinstance(exc, Exception)
                else CheckpointCancelledError(
                    f"save of step {handle.step} was cancelled while staging", step=handle.step
                )
            )
            if self._finish(handle, None, error) and not raise_errors:
                self._unobserved.append(handle)
            if raise_errors or not isinstance(exc, Exception):
                handle._observed = True
                raise
            return
        self._emit(handle, "staged", 0, handle._nbytes)

    def _stage_blocking(
        self, state_dict: Mapping[str, Any], handle: SaveHandle, overwrite: bool, stream: Any
    ) -> tuple[int, int]:
        """Worker thread: flatten, fit the slot's arena, copy, write the skeleton memfd."""
        step = handle.step
        if not overwrite and _storage.step_dir(self.root, step).exists():
            raise CheckpointExistsError(f"step {step} already exists in {self.root}")
        with gc_paused():  # else a full collection can hold the GIL for 100s of ms
            flat = flatten(state_dict)
            slot = handle._slot
            arena = slot.fit(flat)
            arena.stage(flat, stream=stream)
            handle._nbytes = arena.used_bytes
            handle._stage_seconds = time.perf_counter() - handle._t0
            handle._staged_flag.set()  # the sources may change now (guards wake up here)
            blob = dumps_skeleton(flat.skeleton)
        return memfd_with(blob, f"aiodcp-skeleton-{step}"), len(blob)

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
                _storage.step_dir(self.root, chosen),
                0,
                time.perf_counter() - t0,
                0.0,
                skipped=True,
            ),
            None,
        )
        return handle

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
            phase: Literal["writing", "written"] = (
                "written" if msg.phase == "written" else "writing"
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
                error = SaveFailedError(
                    f"save of step {handle.step} failed in the daemon: {msg.error_type}: "
                    f"{msg.message}\n--- daemon traceback ---\n{msg.traceback}",
                    step=handle.step,
                    remote_type=msg.error_type,
                    remote_traceback=msg.traceback,
                )
            if msg.cancelled or handle._overwrite:
                self._finish(handle, None, error)
                self._unobserved.append(handle)
            else:
                # With several ranks a failure may come after rank 0 renamed the step
                # (e.g. rank 0's daemon died right after): the disk decides.
                gen.pending.pop(handle._req_id, None)
                self._spawn(self._settle_from_disk, handle, error, name="settle from disk")

    async def _settle_from_disk(self, handle: SaveHandle, error: CheckpointError) -> None:
        committed = await anyio.to_thread.run_sync(_storage.is_committed, self.root, handle.step)
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
            path=_storage.step_dir(self.root, handle.step),
            nbytes=nbytes,
            stage_seconds=handle._stage_seconds,
            persist_seconds=persist,
            recovered=recovered,
        )
        if self._finish(handle, result, None):
            self._emit(handle, "committed", nbytes, nbytes)
            notify_commit(self.root, handle.step)

    def _finish(
        self, handle: SaveHandle, result: SaveResult | None, error: BaseException | None
    ) -> bool:
        """The one way a save ends: its generation, slot and step let go of it."""
        if handle._gen is not None:
            handle._gen.pending.pop(handle._req_id, None)
        if handle._slot is not None:
            self._slots.give(handle._slot, handle)
            handle._slot = None
        self._reserved.discard(handle.step)
        self._inflight.discard(handle)
        if not handle._finish(result, error):
            return False
        if error is not None:
            self._emit(handle, "failed", 0, 0)
        return True

    async def _on_exit(self, gen: Generation) -> None:
        """``gen``'s process is reaped: settle *its* handles, from the disk's point of view.

        A step whose directory is there was committed (the rename is the commit
        point), even if the daemon died before it could say so.
        """
        handles = list(gen.pending.values())
        fresh = [h.step for h in handles if not h._overwrite]  # an overwrite's step existed
        committed = await anyio.to_thread.run_sync(self._after_death, fresh)
        for handle in handles:
            if handle.step in committed:
                log.warning(
                    "daemon died after committing step %d; outcome re-read from disk", handle.step
                )
                self._committed(handle, handle._nbytes, 0.0, recovered=True)
            else:
                self._finish(handle, None, self._died_error(gen, handle.step))
                self._unobserved.append(handle)

    def _after_death(self, steps: list[int]) -> set[int]:
        """Worker thread: which of ``steps`` are committed; repair derived state."""
        committed = {s for s in steps if _storage.is_committed(self.root, s)}
        if self.rank == 0:
            try:
                _storage.reconcile(self.root)
            except OSError as exc:
                log.warning("could not repair latest/.commits in %s: %s", self.root, exc)
        self._high_step = max(self._high_step, _latest_on_disk(self.root, self.rank))
        return committed

    def _died_error(self, gen: Generation, step: int | None) -> WorkerDiedError:
        where = f" while saving step {step}" if step is not None else ""
        return WorkerDiedError(
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

    # ------------------------------------------------------------ guards, signals
    def guard(self, *objects: Any, strict: bool = False) -> Guard:
        """Make mutating ``objects`` wait for pending overlapped staging (opt-in).

        Optimizers get a step pre-hook, modules a ``load_state_dict`` pre-hook:
        before they change a tensor, they wait until every ``overlap=True``
        save's copy is done -- or, with ``strict=True``, raise ``RuntimeError``.
        Returns a :class:`Guard`; ``guard.remove()`` takes the hooks off.
        """
        return Guard(objects, lambda: [h for h in self._inflight if not h.is_staged()], strict)

    def handle_signals(
        self,
        *signals: int,
        grace: float = 30.0,
        final_save: Callable[[], Any] | None = None,
    ) -> None:
        """Opt in to preemption handling: on one of ``signals`` (e.g. SIGTERM), finish up.

        The signal receiver is installed before this returns. The signal is then
        received on the event loop (never in a plain signal handler). Within
        ``grace`` seconds: ``final_save()`` is awaited if given (it may return a
        :class:`SaveHandle`, which is awaited too), every in-flight save is
        awaited until committed, and the ``async with`` body is cancelled; the
        block then exits with ``SystemExit(128 + signal)``. Saves still in flight
        when the grace period ends are cancelled, never published. An error in
        ``final_save`` is logged and does not stop the rest.
        """
        self._check_open()
        if self._host_done is not None:
            raise RuntimeError("handle_signals() needs `async with AsyncCheckpointer(...)`")
        if not signals:
            raise ValueError("name at least one signal, e.g. signal.SIGTERM")
        receiver = anyio.open_signal_receiver(*(signal.Signals(s) for s in signals))
        received = receiver.__enter__()  # installed now, not when a task first runs
        self._spawn(self._preemption, receiver, received, grace, final_save, name="preemption")

    async def _preemption(
        self,
        receiver: Any,
        received: AsyncIterator[int],
        grace: float,
        final_save: Callable[[], Any] | None,
    ) -> None:
        signum = 0
        try:
            async for signum in received:  # noqa: B007  (the first one is enough)
                break
        finally:
            receiver.__exit__(None, None, None)
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
            except Exception as exc:
                log.error("final checkpoint on signal %d failed: %r", signum, exc)
            try:
                await self.wait()
            except CheckpointError as exc:
                log.error("in-flight checkpoint on signal %d failed: %s", signum, exc)
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
        while self._inflight:
            await next(iter(self._inflight))._event.wait()
        failures = [h for h in self._unobserved if not h._observed]
        self._unobserved.clear()
        for h in failures:
            h._observed = True
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


def _latest_on_disk(root: Path, rank: int) -> int:
    latest = _storage.read_latest(root)
    return -1 if latest is None else latest


def _cuda_stream() -> Any:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return torch.cuda.current_stream()
    return None


class _Copy:
    """The blocking copy of an overlapped save, running from construction on in a
    thread of its own (not one the event loop has yet to hand out)."""

    def __init__(self, fn: Callable[..., tuple[int, int]], *args: Any) -> None:
        self._value: tuple[int, int] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(fn, args), name="aiodcp-stage", daemon=True
        )
        self._thread.start()

    def _run(self, fn: Callable[..., tuple[int, int]], args: tuple[Any, ...]) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:
            self._error = exc

    async def result(self) -> tuple[int, int]:
        """Wait for the copy; a cancellation waits for it too (it writes into the slot)."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._thread.join)
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value
