"""The rank's daemon across generations: start, agree on restarts, stop.

``Supervisor.for_save()`` is the one place a daemon is (re)started. With
several ranks it first runs the per-save :class:`~aiodcp._parent._dist.DaemonAgreement`
(through the trainer's store, off the loop, cancellable): if any rank's daemon
is not serving, *every* rank stops its daemon and all start a new generation
together. So restarts are collective decisions taken at a point every rank
reaches, and never leave the trainer's own collectives out of step.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import anyio.to_thread

from .._disk._store import Store
from .._errors import CheckpointError
from .._wire import _protocol as p
from ._dist import DaemonAgreement, Group, Rendezvous
from ._generation import Generation

__all__ = ["Supervisor"]

log = logging.getLogger("aiodcp")


class Supervisor:
    def __init__(
        self,
        tg: anyio.abc.TaskGroup,
        store: Store,
        group: Group,
        make_config: Callable[[Rendezvous | None], p.DaemonConfig],
        *,
        init_timeout: float,
        agree_timeout: float,
        shutdown_timeout: float,
        use_prefix_store: bool,
        on_message: Callable[[Generation, p.Message], None],
        on_exit: Callable[[Generation], Awaitable[None]],
    ) -> None:
        self._tg = tg
        self._store = store
        self.group = group
        self._make_config = make_config
        self._init_timeout = init_timeout
        self._agree_timeout = agree_timeout
        self._shutdown_timeout = shutdown_timeout
        self._use_prefix_store = use_prefix_store
        self._on_message = on_message
        self._on_exit = on_exit
        self._lock = anyio.Lock()
        self._numbers = 0
        self.current: Generation | None = None
        self.closed = False
        self._agreement = DaemonAgreement(group) if group.distributed else None

    async def for_save(self) -> Generation:
        """A serving daemon for the next save; every rank calls it once per save."""
        async with self._lock:
            if self.closed:
                raise CheckpointError("the checkpointer is closing: no new save starts")
            gen = self.current
            alive = gen is not None and gen.alive
            rdv: Rendezvous | None = None
            if self._agreement is not None:
                abandoned = threading.Event()
                agreement = self._agreement

                def agree() -> Rendezvous | None:
                    # /proc knows of a death the event loop may not have seen yet
                    running = alive and gen is not None and _running(gen.pid)
                    return agreement.agree(
                        running, self._use_prefix_store, self._agree_timeout, abandoned
                    )

                try:
                    rdv = await anyio.to_thread.run_sync(agree, abandon_on_cancel=True)
                finally:
                    abandoned.set()  # an abandoned thread stops at its next poll
                if rdv is None:
                    assert gen is not None
                    return gen
            elif alive:
                assert gen is not None
                return gen
            if gen is not None:
                await gen.stop(self._shutdown_timeout)  # a live peer of a dead daemon, too
                if self.group.rank == 0:  # no daemon runs now: temporaries are litter
                    await anyio.to_thread.run_sync(self._store.cleanup_leftovers)
            return await self._spawn(rdv)

    async def _spawn(self, rdv: Rendezvous | None) -> Generation:
        self._numbers += 1
        config = self._make_config(rdv)
        self.current = await Generation.spawn(
            self._tg,
            self._numbers,
            config,
            init_timeout=self._init_timeout,
            on_message=self._on_message,
            on_exit=self._on_exit,
        )
        log.info(
            "checkpoint daemon pid %d ready (rank %d, generation %d)",
            self.current.pid,
            self.group.rank,
            self._numbers,
        )
        return self.current

    async def start(self) -> None:
        """Start the first generation (at open), agreed like any other."""
        try:
            await self.for_save()
        except CheckpointError:
            raise
        except OSError as exc:
            raise CheckpointError(f"cannot start the checkpoint daemon: {exc}") from exc

    async def stop(self) -> None:
        """Stop the current generation for good; bounded (see :meth:`Generation.stop`).
        A save that asks for a daemon afterwards is refused, never given a new one."""
        self.closed = True
        with anyio.CancelScope(shield=True):
            if self.current is not None:
                await self.current.stop(self._shutdown_timeout)


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (blocking: reads /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
