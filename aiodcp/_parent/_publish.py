"""Live publication, the learner's side: ``Publisher`` serves sealed versions to readers.

Who owns what: the publisher owns one task group (the accept loop, the inbox, and
per reader a read task and a flush task), the listening socket, and one descriptor
per version in its *ring*. A version stays in the ring while it is the latest or a
reader leases it; it leaves when neither holds (the publisher closes its fd; the
kernel frees the memory once the last reader's fd and mapping are gone too).

The ring has ``ring`` places. A publish that would need one more place than that
(every older version leased) follows ``when_full``: ``"skip"`` the publish (it
returns None), ``"wait"`` until a lease ends, or ``"allocate"`` beyond the ring.

Readers find the publisher by name: a Linux abstract-namespace socket named from
the root's real path and the rank, so nothing is ever left on disk, and a second
publisher on one root fails at once. Both ends check the other's uid
(``SO_PEERCRED``): another user can neither read versions nor pose as the learner.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import struct
import threading
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.to_thread

from .._disk._roots import local_only
from .._errors import CheckpointError, ProtocolError
from .._staging._arena import Arena
from .._staging._staging import Flat
from .._staging._versions import Sealed, Spare, seal_from_arena, seal_from_state
from .._wire import _pubwire as w
from ._parts import Parts

__all__ = ["Publisher", "Publishing", "Ticket", "socket_name"]

log = logging.getLogger("aiodcp")

WhenFull = Literal["skip", "wait", "allocate"]
_UCRED = struct.Struct("3i")


def socket_name(root: str | os.PathLike[str], rank: int = 0) -> bytes:
    """The abstract socket address of ``root``'s publisher for ``rank``."""
    real = os.path.realpath(os.fspath(root))
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:40]
    return b"\0aiodcp-publish-" + digest.encode() + b"-" + str(rank).encode()


def peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return int(uid)


class _Entry:
    """One version in the ring (the publisher's descriptor and its lease count)."""

    def __init__(self, number: int, sealed: Sealed) -> None:
        self.number = number
        self.sealed = sealed
        self.leases = 0


class Ticket:
    """A place in the ring, reserved for version ``number`` before it is filled.

    :meth:`fill_from_arena` (any thread) seals and hands it to the publisher;
    :meth:`close` gives the place back if it was never filled (idempotent, any thread).
    """

    def __init__(self, publisher: Publisher, number: int) -> None:
        self.publisher = publisher
        self.number = number
        self._done = False
        self._lock = threading.Lock()

    def _finish(self, sealed: Sealed | None) -> bool:
        with self._lock:
            if self._done:
                return False
            self._done = True
        self.publisher._post(self, sealed)
        return True

    def fill_from_arena(self, arena: Arena, flat: Flat) -> None:
        """Blocking: copy the staged bytes into a new sealed version and publish it."""
        if self._done:
            return
        sealed = seal_from_arena(arena, flat, self.number, self.publisher._spare)
        if not self._finish(sealed):
            sealed.close()

    def close(self) -> None:
        self._finish(None)


class _Reader:
    """One connected reader: its socket, its protocol state, its outgoing frames."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.wire = w.Wire(w.Side.PUBLISHER)
        self.queue: deque[tuple[memoryview, int | None, bool]] = deque()  # frame, fd, announce
        self.queued = anyio.Event()
        self.gone = False

    def send(self, msg: w.Message, fd: int | None = None) -> None:
        # The protocol's state moves first, whether or not the bytes can leave: a lease
        # counted for a Granted is in ``wire.held``, which ``_drop`` gives back.
        frame = memoryview(self.wire.send(msg))
        if self.gone:
            return
        announce = isinstance(msg, w.Announce)
        if announce:  # only the newest announcement matters: drop unsent older ones
            head = self.queue[0] if self.queue else None
            self.queue = deque(
                e for e in self.queue if not e[2] or (e is head and len(e[0]) != w.FRAME)
            )
        self.queue.append((frame, None if fd is None else os.dup(fd), announce))
        self.flush()
        if self.queue:
            self.queued.set()

    def flush(self) -> bool:
        """Write what the socket takes now; False if the reader is gone."""
        while self.queue and not self.gone:
            data, fd, announce = self.queue[0]
            try:
                if fd is not None:
                    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
                    n = self.sock.sendmsg([data], rights)
                else:
                    n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                self.gone = True
                return False
            if fd is not None:
                os.close(fd)  # the kernel holds its own reference now
            if n < len(data):
                self.queue[0] = (data[n:], None, announce)
                continue
            self.queue.popleft()
        return not self.gone

    def close(self) -> None:
        self.gone = True
        while self.queue:
            _, fd, _ = self.queue.popleft()
            if fd is not None:
                os.close(fd)
        self.wire.close()
        self.sock.close()


class Publisher:
    """Publish versions of a state dict to readers on this host, through shared memory.

    ``async with Publisher(root) as pub: await pub.publish(state_dict)``. Readers
    follow with :func:`aiodcp.follow` on the same ``root``. Usable without a
    checkpointer; :meth:`aiodcp.AsyncCheckpointer.publish` runs one in the
    checkpointer's task group.

    Args:
        root: names the publication (readers pass the same path); nothing is
            written there.
        rank: one publisher per rank (each publishes its own shard).
        ring: versions kept at most (the latest and the leased ones), >= 1.
        when_full: ``"skip"``, ``"wait"`` or ``"allocate"`` when every place in
            the ring is leased (see the module docstring).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        rank: int = 0,
        ring: int = 3,
        when_full: WhenFull = "skip",
    ) -> None:
        if not isinstance(ring, int) or ring < 1:
            raise ValueError(f"ring must be an int >= 1, got {ring!r}")
        if when_full not in ("skip", "wait", "allocate"):
            raise ValueError(f"when_full must be 'skip', 'wait' or 'allocate', got {when_full!r}")
        local_only(root, "Publisher")
        self.root = Path(root)
        self.rank = rank
        self.ring = ring
        self.when_full = when_full
        self._entries: dict[int, _Entry] = {}
        self._latest: int | None = None
        self._high = -1  # the highest number reserved or published
        self._tickets: set[Ticket] = set()
        self._readers: set[_Reader] = set()
        self._changed = anyio.Event()
        self._listener: socket.socket | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._inbox: list[tuple[Ticket, Sealed | None]] = []
        self._inbox_lock = threading.Lock()
        self._wake_r = self._wake_w = -1
        self._open = False
        self._spare = Spare()
        self._making_spare = False
        self._started = anyio.Event()  # (a checkpointer's publisher) opened, or
        self._failed = anyio.Event()  # failed to

    async def _failed_or_started(self) -> None:
        async with anyio.create_task_group() as tg:

            async def on(event: anyio.Event) -> None:
                await event.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(on, self._started)
            tg.start_soon(on, self._failed)

    # ------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Publisher:
        if self._open or self._tg is not None:
            raise RuntimeError("a Publisher can be opened once")
        name = await anyio.to_thread.run_sync(socket_name, self.root, self.rank)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(name)
        except OSError as exc:
            sock.close()
            raise CheckpointError(
                f"cannot publish {self.root} (rank {self.rank}): another publisher serves it "
                f"on this host ({exc})"
            ) from exc
        sock.listen(64)
        sock.setblocking(False)
        self._listener = sock
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._open = True
        self._tg.start_soon(self._accept_loop, name="publisher accept")
        self._tg.start_soon(self._inbox_loop, name="publisher inbox")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._open:
            return
        self._open = False
        self._signal()  # publishes waiting for a place find it closed
        for reader in list(self._readers):
            with contextlib.suppress(ProtocolError):
                reader.send(w.Closing())  # best effort: readers end their iteration
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            await self._tg.__aexit__(None, None, None)  # our tasks never raise
        finally:
            self._close_all()

    def _close_all(self) -> None:
        self._spare.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for reader in list(self._readers):
            reader.close()
        self._readers.clear()
        for entry in self._entries.values():
            entry.sealed.close()
        self._entries.clear()
        with self._inbox_lock:  # a copy thread posts after this: it closes its version
            inbox, self._inbox = self._inbox, []
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1
        for _, sealed in inbox:
            if sealed is not None:
                sealed.close()

    # ------------------------------------------------------------ inspection
    @property
    def latest(self) -> int | None:
        """The newest version published, None before the first."""
        return self._latest

    @property
    def live(self) -> dict[int, int]:
        """Versions in the ring -> leases on each (a snapshot)."""
        return {n: e.leases for n, e in sorted(self._entries.items())}

    @property
    def readers(self) -> int:
        """Readers connected now."""
        return len(self._readers)

    # -------------------------------------------------------------- publish
    async def publish(
        self, state_dict: Mapping[str, Any], *, version: int | None = None
    ) -> int | None:
        """Copy ``state_dict`` into a new sealed version and announce it to readers.

        Returns the version's number (``version``, default: the last one + 1), or
        None when the ring was full and ``when_full="skip"``. The copy runs in a
        worker thread (GIL released while it copies); the tensors may change again
        once this returns. Cancelling it waits for the copy, then publishes nothing.
        """
        ticket = await self.reserve(version)
        if ticket is None:
            return None
        made: list[Sealed] = []

        def fill() -> None:
            made.append(seal_from_state(state_dict, ticket.number, self._spare))

        try:
            await anyio.to_thread.run_sync(fill)
        except BaseException:
            ticket.close()
            for sealed in made:
                sealed.close()
            raise
        self._install(ticket, made[0])
        return ticket.number

    def check_version(self, version: int | None) -> int:
        """The number a publish of ``version`` gets (ValueError if not increasing)."""
        if version is None:
            return self._high + 1
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be an int >= 0, got {version!r}")
        if version <= self._high:
            raise ValueError(
                f"version {version} is not newer than version {self._high} already published"
            )
        return version

    async def reserve(self, version: int | None = None) -> Ticket | None:
        """A place in the ring for the next version, by the ``when_full`` policy."""
        self._check_open()
        number = self.check_version(version)
        while self._pinned() + 1 > self.ring:
            if self.when_full == "skip":
                log.info(
                    "publish of version %d skipped: all %d ring places leased", number, self.ring
                )
                return None
            if self.when_full == "allocate":
                log.debug("ring full: version %d goes beyond %d places", number, self.ring)
                break
            await self._changed.wait()
            self._check_open()
            number = self.check_version(version)
        ticket = Ticket(self, number)
        self._tickets.add(ticket)
        self._high = number
        return ticket

    def _pinned(self) -> int:
        """Places the next version cannot take: leased versions and reserved tickets."""
        return sum(1 for e in self._entries.values() if e.leases) + len(self._tickets)

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError("the Publisher is not open: use `async with Publisher(root)`")

    def _signal(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _post(self, ticket: Ticket, sealed: Sealed | None) -> None:
        """A ticket finished in some thread: hand it to the event loop."""
        with self._inbox_lock:
            if self._wake_w < 0:  # closed meanwhile
                if sealed is not None:
                    sealed.close()
                return
            self._inbox.append((ticket, sealed))
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"x")

    async def _inbox_loop(self) -> None:
        while True:
            await anyio.wait_readable(self._wake_r)
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
            with self._inbox_lock:
                inbox, self._inbox = self._inbox, []
            for ticket, sealed in inbox:
                if sealed is None:
                    self._tickets.discard(ticket)
                    self._signal()
                else:
                    self._install(ticket, sealed)

    def _install(self, ticket: Ticket, sealed: Sealed) -> None:
        """Version ``ticket.number`` is sealed: make it the latest and announce it."""
        self._tickets.discard(ticket)
        if not self._open:
            sealed.close()
            return
        if self._latest is not None and ticket.number < self._latest:
            sealed.close()  # an older ticket finished late: never announced
            self._signal()
            return
        self._entries[ticket.number] = _Entry(ticket.number, sealed)
        self._latest = ticket.number
        if not self._making_spare and self._tg is not None:  # the next publish only copies
            self._making_spare = True
            self._tg.start_soon(self._make_spare, sealed.nbytes, sealed.header_nbytes)
        self._trim()
        for reader in list(self._readers):
            reader.send(w.Announce(ticket.number))
        self._signal()

    async def _make_spare(self, nbytes: int, header_nbytes: int) -> None:
        capacity = max(2 * header_nbytes, 4096)
        try:
            await anyio.to_thread.run_sync(self._spare.make, nbytes, capacity)
        except OSError as exc:  # no memory for it now: publishes allocate as they go
            log.warning("publisher: no spare version made: %s", exc)
        finally:
            self._making_spare = False

    def _trim(self) -> None:
        """Versions neither latest nor leased leave the ring."""
        for number in [n for n, e in self._entries.items() if not e.leases and n != self._latest]:
            self._entries.pop(number).sealed.close()

    # -------------------------------------------------------------- readers
    async def _accept_loop(self) -> None:
        assert self._listener is not None and self._tg is not None
        while True:
            await anyio.wait_readable(self._listener)
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            sock.setblocking(False)
            if peer_uid(sock) != os.getuid():
                log.warning("publisher: refused a reader of another user")
                sock.close()
                continue
            reader = _Reader(sock)
            self._readers.add(reader)
            reader.send(w.Hello(w.PROTOCOL, os.getpid()))
            if self._latest is not None:
                reader.send(w.Announce(self._latest))
            self._tg.start_soon(self._serve, reader, name="publisher reader")

    async def _serve(self, reader: _Reader) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._flush_loop, reader)
                await self._read_loop(reader)
                tg.cancel_scope.cancel()
        finally:
            self._drop(reader)

    async def _flush_loop(self, reader: _Reader) -> None:
        while not reader.gone:
            await reader.queued.wait()
            reader.queued = anyio.Event()
            while reader.queue and not reader.gone:
                await anyio.wait_writable(reader.sock)
                reader.flush()

    async def _read_loop(self, reader: _Reader) -> None:
        while not reader.gone:
            await anyio.wait_readable(reader.sock)
            try:
                data = reader.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                return  # EOF: the reader exited or was killed
            reader.wire.receive(data)
            try:
                while (item := reader.wire.next_message()) is not None:
                    self._handle(reader, item[0])
            except ProtocolError as exc:
                log.warning("publisher: dropping a reader: %s", exc)
                return

    def _handle(self, reader: _Reader, msg: w.Message) -> None:
        if isinstance(msg, w.Acquire):
            entry = self._entries.get(msg.version)
            if entry is None:
                reader.send(w.Refused(msg.version))
                return
            entry.leases += 1  # counted before the descriptor leaves
            s = entry.sealed
            reader.send(w.Granted(msg.version, s.nbytes, s.header_offset, s.header_nbytes), s.fd)
        elif isinstance(msg, w.Release):
            entry = self._entries.get(msg.version)
            if entry is not None:
                entry.leases -= 1
                self._trim()
                self._signal()

    def _drop(self, reader: _Reader) -> None:
        """A reader is gone (EOF, error, or we close): its leases end with it."""
        self._readers.discard(reader)
        for number, count in reader.wire.held.items():
            entry = self._entries.get(number)
            if entry is not None:
                entry.leases -= count
        reader.wire.held.clear()
        reader.close()
        if self._open:
            self._trim()
            self._signal()


_UNSET: Any = object()


class Publishing(Parts):
    """The publication part of :class:`aiodcp.AsyncCheckpointer` (a mixin)."""

    _publisher: Publisher | None

    async def publisher(self, *, ring: int = _UNSET, when_full: WhenFull = _UNSET) -> Publisher:
        """This checkpointer's :class:`Publisher` (opened on first use, in its task group).

        Readers ``aiodcp.follow(root)`` it. Options apply when it opens (default
        ``ring=3``, ``when_full="skip"``); other options later are a ValueError. It
        closes with the checkpointer (readers' iterations then end).
        """
        self._check_open()
        if self._publisher is None:
            pub = Publisher(
                self.root,
                rank=self.rank,
                ring=3 if ring is _UNSET else ring,
                when_full="skip" if when_full is _UNSET else when_full,
            )
            self._publisher = pub  # set first: a concurrent first call uses this one

            async def host(*, task_status: anyio.abc.TaskStatus[None]) -> None:
                async with pub:
                    task_status.started()
                    await anyio.sleep_forever()

            assert self._tg is not None
            try:
                await self._tg.start(host, name="publisher")
            except BaseException:
                self._publisher = None
                pub._failed.set()
                raise
            pub._started.set()
        elif not self._publisher._started.is_set():
            await self._publisher._failed_or_started()
            if self._publisher is None:
                raise CheckpointError("the publisher failed to open")
        current = self._publisher
        assert current is not None
        for name, value in (("ring", ring), ("when_full", when_full)):
            if value is not _UNSET and getattr(current, name) != value:
                raise ValueError(f"the publisher is open with {name}={getattr(current, name)!r}")
        return current

    async def publish(
        self, state_dict: Mapping[str, Any], *, version: int | None = None
    ) -> int | None:
        """Publish ``state_dict`` to live readers on this host, without the disk.

        As :meth:`Publisher.publish`: returns the version (default: the last + 1;
        pass the step to keep versions and checkpoints comparable), or None when
        the ring is full and ``when_full="skip"``.
        """
        pub = await self.publisher()
        return await pub.publish(state_dict, version=version)

    async def _reserve_publication(self, version: int) -> Ticket | None:
        pub = await self.publisher()
        return await pub.reserve(version)
