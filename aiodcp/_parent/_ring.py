"""Live publication's bookkeeping: the ring of versions, their leases, reserved places.

No I/O and no event loop here (the :class:`aiodcp._parent._publish.Publisher` shell
does both): the ring decides which version is the latest, which ones readers lease,
when a publish finds the ring full, and which descriptors to close.

A version stays in the ring while it is the latest or a reader leases it; it leaves
(its descriptor closed) when neither holds. A place is *pinned* by a leased version
or by a reserved, not yet filled, version (a ticket); the next publish needs one
more place than those, at most ``size`` (else ``when_full`` decides).

Invariant (checked by tests): each version's lease count is the sum, over connected
readers, of what their wire records as held (``Wire.held``): what a reader's
connection takes with it when it goes is exactly what it was counted for.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Literal

from .._staging._versions import Sealed

__all__ = ["Entry", "Ring", "WhenFull"]

WhenFull = Literal["skip", "wait", "allocate"]


class Entry:
    """One version in the ring: the publisher's descriptor and its lease count."""

    def __init__(self, number: int, sealed: Sealed) -> None:
        self.number = number
        self.sealed = sealed
        self.leases = 0


class Ring:
    """The versions a publisher keeps, ``size`` places at most (see the module)."""

    def __init__(self, size: int) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"ring must be an int >= 1, got {size!r}")
        self.size = size
        self.entries: dict[int, Entry] = {}
        self.latest: int | None = None
        self.high = -1  # the highest number reserved or published
        self.tickets: set[Hashable] = set()  # places reserved, not yet filled

    # ------------------------------------------------------------- publishing
    def check_version(self, version: int | None) -> int:
        """The number a publish of ``version`` gets (ValueError if not increasing)."""
        if version is None:
            return self.high + 1
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be an int >= 0, got {version!r}")
        if version <= self.high:
            raise ValueError(
                f"version {version} is not newer than version {self.high} already published"
            )
        return version

    def pinned(self) -> int:
        """Places the next version cannot take: leased versions and reserved tickets."""
        return sum(1 for e in self.entries.values() if e.leases) + len(self.tickets)

    def full(self) -> bool:
        return self.pinned() + 1 > self.size

    def reserve(self, ticket: Hashable, number: int) -> None:
        self.tickets.add(ticket)
        self.high = number

    def unreserve(self, ticket: Hashable) -> None:
        self.tickets.discard(ticket)

    def install(self, ticket: Hashable, number: int, sealed: Sealed) -> bool:
        """Version ``number`` is sealed: it becomes the latest (True: announce it), or,
        older than the latest (a ticket that finished late), it is closed (False)."""
        self.tickets.discard(ticket)
        if self.latest is not None and number < self.latest:
            sealed.close()
            return False
        self.entries[number] = Entry(number, sealed)
        self.latest = number
        self.trim()
        return True

    # ----------------------------------------------------------------- leases
    def acquire(self, number: int) -> Entry | None:
        """Count a lease on ``number`` (before its descriptor leaves); None: gone."""
        entry = self.entries.get(number)
        if entry is not None:
            entry.leases += 1
        return entry

    def release(self, number: int, count: int = 1) -> None:
        entry = self.entries.get(number)
        if entry is not None:
            entry.leases -= count

    def release_all(self, held: Mapping[int, int]) -> None:
        """A reader is gone: the leases its wire recorded end with it."""
        for number, count in held.items():
            self.release(number, count)

    def trim(self) -> None:
        """Versions neither latest nor leased leave the ring (their fds closed)."""
        for number in [n for n, e in self.entries.items() if not e.leases and n != self.latest]:
            self.entries.pop(number).sealed.close()

    def leases(self) -> dict[int, int]:
        """Versions in the ring -> leases on each (a snapshot)."""
        return {n: e.leases for n, e in sorted(self.entries.items())}

    def close(self) -> None:
        for entry in self.entries.values():
            entry.sealed.close()
        self.entries.clear()
