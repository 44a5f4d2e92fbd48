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
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import sniffio

from .._disk import _retention, _storage
from .._disk._roots import open_store
from .._disk._store import LocalStore
from .._errors import (
    CheckpointCancelledError,
    CheckpointError,
)
from .._wire import _protocol as p
from ._dist import Group, Rendezvous, resolve_group
from ._guard import Guard
from ._handle import SaveEvent, SaveHandle, SaveResult
from ._load import load_checkpoint
from ._outcomes import Outcomes, latest_on_disk
from ._preempt import Preemption
from ._publishing import Publishing
from ._saving import Saving
from ._slots import SlotPool
from ._supervisor import Supervisor
from ._watch import watch

__all__ = ["AsyncCheckpointer", "SaveEvent", "SaveHandle", "SaveResult"]

log = logging.getLogger("aiodcp")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


class AsyncCheckpointer(Saving, Outcomes, Preemption, Publishing):
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
        direct_io: write checkpoint files with ``O_DIRECT`` (past the page cache)
            where the filesystem allows, else buffered: ~10x less CPU per byte
            taken from training; the price is that a reader right after the
            save reads from disk, not from memory.
        on_event: called on the event loop with each :class:`SaveEvent`.
        storage_options: for an ``s3://bucket/prefix`` root: ``endpoint_url``,
            ``region_name``, retry, timeout and multipart settings (see the README,
            "Object storage"); credentials come from the standard environment.
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
        direct_io: bool = True,
        on_event: Callable[[SaveEvent], None] | None = None,
        storage_options: Mapping[str, Any] | None = None,
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
        # parsed once, here: an unsupported scheme is refused, never a local directory
        self.store = open_store(root, storage_options)
        self.root: Path | str = (
            self.store.root if isinstance(self.store, LocalStore) else str(self.store)
        )
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
        self.direct_io = bool(direct_io)
        self.on_event = on_event

        self._group: Group | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._daemons: Supervisor | None = None
        self._slots = SlotPool(max_inflight)
        self._inflight: set[SaveHandle] = set()  # not settled: staging, persisting, copying
        self._guards: list[Guard] = []
        self._loop_thread: int | None = None
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
        self._receivers: list[Any] = []  # handle_signals()'s, restored at close
        self.preempted: int | None = None
        self._publisher = None  # opened by publish() / publisher(), in our task group
        """The signal that ended the block, after ``handle_signals``; else None."""

    # ------------------------------------------------------------- lifecycle
    @property
    def daemon_pid(self) -> int | None:
        """The daemon's pid, or None when no daemon is serving."""
        gen = self._daemons.current if self._daemons is not None else None
        return gen.pid if gen is not None and gen.alive else None

    @property
    def worker_pid(self) -> int | None:
        """:attr:`daemon_pid`, by its older name."""
        return self.daemon_pid

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
                    try:
                        await self._host_close.wait()
                    except BaseException:
                        # The loop is shutting down (asyncio.run ended, the kernel stops)
                        # and nobody called aclose(): the daemon has the staged bytes.
                        self._abandoned()
                        raise
                    tg.cancel_scope.cancel()
            finally:
                assert self._host_done is not None
                self._host_done.set()

        self._host_task = asyncio.get_running_loop().create_task(host())
        await started.wait()
        return await self._finish_open()

    def _abandoned(self) -> None:
        """A ``start()``-ed checkpointer whose loop ends without ``aclose()``: the loop
        cancels every task, the daemon's too, so what is in flight is lost -- say which."""
        if self._state != "open":
            return
        lost = sorted(h.step for h in self._inflight if h._result is None)
        log.error(
            "AsyncCheckpointer(%s) was never closed: its event loop ended without "
            "`await ckpt.aclose()`%s",
            self.root,
            f"; steps {lost} in flight were NOT committed" if lost else "",
        )

    async def aclose(self) -> None:
        """Close a checkpointer opened with :meth:`start` (as a normal ``async with`` exit)."""
        await self.__aexit__(None, None, None)

    async def _begin(self) -> None:
        if self._state != "new":
            raise RuntimeError(
                f"this AsyncCheckpointer was already opened (it is {self._state}): create a "
                "new AsyncCheckpointer(...) for each `async with` (or each asyncio.run)"
            )
        self._state = "opening"
        self._loop_thread = threading.get_ident()
        self._group = resolve_group(self._process_group)
        if self._group.distributed and self.when_busy == "skip":
            self._state = "closed"
            raise ValueError(
                'when_busy="skip" is not supported with several ranks: each rank would '
                "decide alone, and a rank could skip a save its peers make"
            )
        # The root's writer lock is taken in a worker thread. Whoever finishes second --
        # the thread, or this task cancelled meanwhile (asyncio's own cancellation does not
        # wait for the thread) -- lets go of it: a cancelled entry once left the root
        # locked for the rest of the process. A failed preparation lets go of it too.
        handoff = threading.Lock()
        state = {"done": False, "abandoned": False}

        def prepare() -> None:
            try:
                self._prepare_root()
            except BaseException:
                self._close_blocking()
                raise
            with handoff:
                state["done"] = True
                abandoned = state["abandoned"]
            if abandoned:
                self._close_blocking()

        try:
            await anyio.to_thread.run_sync(prepare, abandon_on_cancel=True)
        except BaseException:
            self._state = "closed"
            with handoff:
                state["abandoned"] = True
                done = state["done"]
            if done:  # prepared, but we are gone: let go of it, off the loop
                threading.Thread(target=self._close_blocking, name="aiodcp close").start()
            raise

    async def _finish_open(self) -> AsyncCheckpointer:
        assert self._tg is not None and self._group is not None
        self._daemons = Supervisor(
            self._tg,
            self.store,
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
        if self.store.remote:
            self.store.open_writer(self.rank)
            self._high_step = max(self._high_step, latest_on_disk(self.store, self.rank))
            return
        assert isinstance(self.root, Path)
        if self.root.exists() and not self.root.is_dir():
            raise CheckpointError(f"checkpoint root {self.root} exists and is not a directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a read-only mount, no permission, a full disk
            raise CheckpointError(
                f"cannot create checkpoint root {self.root}: {exc.strerror or exc}; "
                "choose a writable directory"
            ) from None
        if not os.access(self.root, os.W_OK) or os.statvfs(self.root).f_flag & os.ST_RDONLY:
            raise CheckpointError(
                f"checkpoint root {self.root} is not writable (read-only mount or "
                "permissions); choose a writable directory"
            )
        if self.rank == 0:
            lock = _storage.WriterLock(self.root)
            lock.acquire()
            self._lock = lock
            removed = _retention.cleanup_leftovers(self.root)
            if removed:
                log.info("removed %d leftovers of interrupted saves in %s", len(removed), self.root)
            appended = _storage.reconcile(self.root)  # the directories are the truth
            if appended:
                log.warning("steps %s were committed but not logged; logged them now", appended)
        self._high_step = max(self._high_step, latest_on_disk(self.store, self.rank))

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
            direct_io=self.direct_io,
            keep_last=self.keep_last,
            keep_every=self.keep_every,
            log_level=logging.getLogger("aiodcp").getEffectiveLevel(),
            storage_options=self.store.daemon_options(),
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if self._state in ("closing", "closed"):
            return None  # aclose() twice is harmless
        if self._state == "new" or self._tg is None or self._daemons is None:
            raise RuntimeError(f"this AsyncCheckpointer was never opened (it is {self._state})")
        self._state = "closing"  # no new save, load or guard from here on
        preempted = False
        if self._body_scope is not None:
            scope, self._body_scope = self._body_scope, None
            preempted = bool(scope.__exit__(exc_type, exc, tb))
        error: BaseException | None = None
        abandoned: list[SaveHandle] = []  # in flight when the block ended by an exception
        try:
            try:
                if exc_type is None:
                    try:
                        await self._wait_settled()
                    except CheckpointError as e:
                        error = e
                else:
                    abandoned = [h for h in self._inflight if not h.done()]
                    for handle in abandoned:
                        handle.cancel()
            finally:
                # Bounded from here on, whatever raised where: shutdown_timeout + ~15 s. Each
                # step runs whatever the one before raised (a cancellation of the block:
                # anyio's or asyncio's own), so the lock, the arenas and the handlers are
                # always let go.
                try:
                    await self._daemons.stop()
                    await self._close_task_group()  # (bounded tasks; may re-raise a cancel)
                finally:
                    self._restore_signals()  # the program's own handlers, whatever ended it
                    self._finish_inflight()
                    try:
                        with anyio.CancelScope(shield=True):
                            await anyio.to_thread.run_sync(self._close_blocking)
                    except BaseException:
                        self._close_blocking()  # cancelled natively meanwhile: close at once
                        raise
                    finally:
                        self._state = "closed"
                        self._say_abandoned(abandoned, exc)
        except BaseException as during:
            # The block's own cancellation (Ctrl-C under asyncio.run, a timeout), raised
            # again by the close (anyio re-raises a pending native cancel where a task group
            # exits): let the original go on, not a copy chained to it ("During handling of
            # the above exception, another exception occurred"). Anything else propagates.
            if not (_interrupts(exc) and isinstance(during, anyio.get_cancelled_exc_class())):
                raise
        if error is not None:
            raise error
        if preempted and self.preempted is not None:
            raise SystemExit(128 + self.preempted)
        return None

    def _say_abandoned(self, handles: list[SaveHandle], exc: BaseException | None) -> None:
        """One line per save the block's exception cut short: which step, and that
        nothing of it was published (the traceback alone does not say so)."""
        if isinstance(exc, anyio.get_cancelled_exc_class()):
            how = "was cancelled (Ctrl-C, a timeout, task.cancel())"
        else:
            how = f"ended by {type(exc).__name__}"
        for handle in handles:
            if handle._error is not None:
                log.warning(
                    "save of step %d cancelled: the `async with` block %s; nothing was published",
                    handle.step,
                    how,
                )

    def _finish_inflight(self) -> None:
        for handle in list(self._inflight):
            self._finish(
                handle,
                None,
                CheckpointCancelledError(
                    f"save of step {handle.step} cancelled: checkpointer closed", step=handle.step
                ),
            )

    def _close_blocking(self) -> None:
        """Unmap the arenas, sweep, release the writer lock (idempotent; blocking)."""
        for slot in self._slots.slots:
            slot.close()
        if self.store.remote and self.rank == 0:
            self.store.close_writer()
        self.store.close()
        if self._lock is not None:
            assert isinstance(self.root, Path)
            # no daemon runs now: whatever temporaries are left are litter
            _retention.cleanup_leftovers(self.root)
            self._lock.release()
            self._lock = None

    async def _close_resources(self) -> None:
        self._finish_inflight()
        await anyio.to_thread.run_sync(self._close_blocking)

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(
                f"AsyncCheckpointer is not open (it is {self._state}): use `async with "
                "AsyncCheckpointer(...) as ckpt` (or `ckpt = await AsyncCheckpointer(...).start()`"
                " in a notebook)"
            )
        if threading.get_ident() != self._loop_thread:
            raise RuntimeError(
                "AsyncCheckpointer is bound to the event loop (and thread) that opened it; "
                "call it from there, or open one checkpointer per loop"
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

    # ------------------------------------------------------------ guards, signals
    def guard(self, *objects: Any, strict: bool = False) -> Guard:
        """Make mutating ``objects`` wait for pending overlapped staging (opt-in).

        Optimizers get a ``step`` pre-hook and modules a ``load_state_dict``
        pre-hook: before they change a tensor, they wait until every
        ``overlap=True`` save's copy is done. Modules also get a ``forward``
        pre-hook that waits until their buffers are copied (they are copied
        first): a forward pass updates buffers such as BatchNorm's running
        statistics. With ``strict=True`` the hooks raise ``RuntimeError``
        instead of waiting. A copy that fails wakes every waiter; its error is
        logged (strict: raised from the hooked call). Returns a
        :class:`Guard`; ``guard.remove()`` takes the hooks off.
        """
        self._check_open()
        guard = Guard(
            objects,
            lambda: list(self._inflight),
            strict,
            self.hand_over_staged,
            self._guards.remove,
        )
        self._guards.append(guard)
        return guard

    # ----------------------------------------------------------------- other
    async def wait(self) -> None:
        """Wait until every in-flight save is committed; re-raise a failure.

        Raises the first failure no one has retrieved yet (by awaiting its
        handle or an earlier ``wait()``); cancelling ``wait()`` cancels no save.
        """
        self._check_open()
        await self._wait_settled()

    async def _wait_settled(self) -> None:
        while self._inflight:
            await next(iter(self._inflight))._settled.wait()
        failures = [h for h in self._unobserved if not h._observed]
        self._unobserved.clear()
        for h in failures:
            h._observed = True
        if failures:
            assert failures[0]._error is not None
            raise failures[0]._error

    async def steps(self) -> list[int]:
        """Committed steps under ``root``, ascending."""
        self._check_open()
        return await anyio.to_thread.run_sync(self.store.list_steps)

    async def load(
        self,
        state_dict: Mapping[str, Any],
        *,
        step: int | None = None,
        verify: bool = False,
        fallback: bool = False,
        weights_only: bool = True,
    ) -> int:
        """Load a committed step into ``state_dict`` in place; return the step.

        ``step=None`` loads the latest. Runs DCP's load off the event loop on
        this checkpointer's process group (resharding as DCP does). ``verify``,
        ``fallback``, ``weights_only`` and the errors are as in :func:`aiodcp.load`.
        """
        self._check_open()
        return await load_checkpoint(
            state_dict,
            self.store,
            step=step,
            group=self._group,
            verify=verify,
            fallback=fallback,
            weights_only=weights_only,
        )

    def watch(
        self, *, include_latest: bool = False, poll_interval: float = 0.5
    ) -> AsyncIterator[int]:
        """``aiodcp.watch`` on this checkpointer's root."""
        return watch(self.store, include_latest=include_latest, poll_interval=poll_interval)


def _interrupts(exc: BaseException | None) -> bool:
    """A cancellation or an interrupt: what a cancellation raised while closing repeats."""
    return isinstance(exc, (anyio.get_cancelled_exc_class(), KeyboardInterrupt, SystemExit))
