"""Staging slots (each owns one arena at a time and has exactly one holder at a time),
and the copy thread that writes into one.

A slot is taken by ``save()`` -- its holder is then the save's handle, until the
handle is done *and* its :class:`CopyThread` has stopped -- or by ``prepare()``
(holder: a token of that call, given back in the call's ``finally``). Taking
waits on one semaphore, so ``max_inflight`` bounds staged-or-persisting saves,
and no two users can ever copy into one arena at once: a save whose caller was
cancelled mid-copy keeps its slot until the copy has stopped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread

from .._staging._arena import Arena
from .._staging._staging import Flat
from .._wire import _protocol as p

__all__ = ["CopyThread", "Slot", "SlotPool"]


@dataclass
class Slot:
    index: int
    arena: Arena | None = None
    retired: list[Arena] = field(default_factory=list)
    """Arenas this slot replaced; the daemon is told to unmap them at the next announce."""
    holder: Any = None

    def fit(self, flat: Flat) -> Arena:
        """An arena for ``flat``'s layout (blocking: a new one is allocated and pre-faulted)."""
        if self.arena is not None and self.arena.fits(flat):
            return self.arena
        if self.arena is not None:
            self.retired.append(self.arena)
        arena = Arena(flat.layout)
        arena.views  # noqa: B018  (built now, off the save's critical path)
        self.arena = arena
        return arena

    def announce(self, gen: Any) -> None:
        """Tell ``gen``'s daemon to unmap retired arenas and to map the current one."""
        for old in self.retired:
            if old.arena_id in gen.arenas:
                gen.send(p.ReleaseArena(old.arena_id))
                gen.arenas.discard(old.arena_id)
        arena = self.arena
        if arena is not None and arena.arena_id not in gen.arenas:
            gen.send(
                p.Arena(arena.arena_id, arena.nbytes, arena.layout_offset, arena.layout_nbytes),
                fd=arena.fd,
            )
            gen.arenas.add(arena.arena_id)

    def close_retired(self) -> None:
        """Unmap retired arenas on our side (blocking; after :meth:`announce`)."""
        retired, self.retired = self.retired, []
        for old in retired:
            old.close()

    def close(self) -> None:
        self.close_retired()
        if self.arena is not None:
            self.arena.close()
            self.arena = None


class SlotPool:
    def __init__(self, n: int) -> None:
        self.slots = [Slot(i) for i in range(n)]
        self._free = anyio.Semaphore(n)

    @property
    def any_free(self) -> bool:
        return self._free.value > 0

    def _claim(self, holder: Any) -> Slot:
        slot = next(s for s in self.slots if s.holder is None)
        slot.holder = holder
        return slot

    async def take(self, holder: Any) -> Slot:
        """Wait for a free slot and hold it (cancellable: then nothing is held)."""
        await self._free.acquire()
        return self._claim(holder)

    def try_take(self, holder: Any) -> Slot | None:
        try:
            self._free.acquire_nowait()
        except anyio.WouldBlock:
            return None
        return self._claim(holder)

    def give(self, slot: Slot, holder: Any) -> None:
        """Give ``slot`` back; only its holder may, and only once."""
        if slot.holder is not holder:
            return
        slot.holder = None
        self._free.release()


class CopyThread:
    """The blocking copy of one save, in a thread of its own from construction on (not
    one the event loop has yet to hand out, so a guard blocking the loop's thread never
    waits for a copy that only the loop could start).

    It owns everything the copy touches until it has *stopped*: ``on_stop(error)`` runs
    in the thread as its last act (success or failure), then :attr:`stopped` is set.
    Nothing the caller does -- asyncio's ``task.cancel()``, an anyio scope, a
    ``KeyboardInterrupt`` -- can end it early; whoever gives the slot back waits for it.
    """

    def __init__(
        self,
        fn: Callable[..., tuple[int, int]],
        *args: Any,
        on_stop: Callable[[BaseException | None], None] = lambda error: None,
    ) -> None:
        self._value: tuple[int, int] | None = None
        self._error: BaseException | None = None
        self._on_stop = on_stop
        self.stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(fn, args), name="aiodcp-stage", daemon=True
        )
        self._thread.start()

    def _run(self, fn: Callable[..., tuple[int, int]], args: tuple[Any, ...]) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:
            self._error = exc
        finally:
            try:
                self._on_stop(self._error)
            finally:
                self.stopped.set()

    @property
    def error(self) -> BaseException | None:
        """What the copy raised (None while it runs, or when it succeeded)."""
        return self._error

    def join(self) -> tuple[int, int] | None:
        """Block until the copy thread ends; its value, or None if it failed."""
        self._thread.join()
        return self._value if self._error is None else None

    async def result(self) -> tuple[int, int]:
        """Wait for the copy to stop (shielded: it writes into the slot); its value, or
        its error raised. Only the copy's owner (the save's stage task) calls this."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._thread.join)
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value
