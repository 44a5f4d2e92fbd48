"""Live publication, the learner's side: ``Publisher`` serves sealed versions to readers.

Who owns what: the publisher owns one task group (the accept loop, the inbox, and
per reader a read task and a flush task), the listening socket, and its *ring*
(:mod:`aiodcp._parent._ring`: one descriptor per version, the leases, the places
reserved). A version stays in the ring while it is the latest or a reader leases
it; it leaves when neither holds (the publisher closes its fd; the kernel frees the
memory once the last reader's fd and mapping are gone too).

The ring has ``ring`` places. A publish that would need one more place than that
(every older version leased) follows ``when_full``: ``"skip"`` the publish (it
returns None), ``"wait"`` until a lease ends, or ``"allocate"`` beyond the ring.
Readers find the publisher by name (:mod:`aiodcp._parent._pubconn`).

State the event loop owns (the ring, the readers) is written only on the loop; a
copy thread that seals a version posts it to the inbox (under its lock) and wakes
the loop through a pipe.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from .._disk._roots import local_only
from .._errors import CheckpointError, ProtocolError
from .._staging._arena import Arena
from .._staging._staging import Flat
from .._staging._versions import Sealed, Spare, seal_from_arena, seal_from_state
from .._wire import _pubwire as w
from ._pubconn import ReaderConn, peer_uid, socket_name
from ._ring import Ring, WhenFull

__all__ = ["Publisher", "Ticket", "socket_name"]

log = logging.getLogger("aiodcp")


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
        self._ring = Ring(ring)
        if when_full not in ("skip", "wait", "allocate"):
            raise ValueError(f"when_full must be 'skip', 'wait' or 'allocate', got {when_full!r}")
        local_only(root, "Publisher")
        self.root = Path(root)
        self.rank = rank
        self.ring = ring
        self.when_full = when_full
        self._readers: set[ReaderConn] = set()
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
        self._ring.close()
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
        return self._ring.latest

    @property
    def live(self) -> dict[int, int]:
        """Versions in the ring -> leases on each (a snapshot)."""
        return self._ring.leases()

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
        return self._ring.check_version(version)

    async def reserve(self, version: int | None = None) -> Ticket | None:
        """A place in the ring for the next version, by the ``when_full`` policy."""
        self._check_open()
        number = self.check_version(version)
        while self._ring.full():
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
        self._ring.reserve(ticket, number)
        return ticket

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
                    self._ring.unreserve(ticket)
                    self._signal()
                else:
                    self._install(ticket, sealed)

    def _install(self, ticket: Ticket, sealed: Sealed) -> None:
        """Version ``ticket.number`` is sealed: make it the latest and announce it."""
        if not self._open:
            self._ring.unreserve(ticket)
            sealed.close()
            return
        if not self._ring.install(ticket, ticket.number, sealed):
            self._signal()  # an older ticket finished late: closed, never announced
            return
        if not self._making_spare and self._tg is not None:  # the next publish only copies
            self._making_spare = True
            self._tg.start_soon(self._make_spare, sealed.nbytes, sealed.header_nbytes)
        for reader in list(self._readers):
            reader.send(w.Announce(ticket.number))
        self._signal()

    async def _make_spare(self, nbytes: int, header_nbytes: int) -> None:
        try:
            await anyio.to_thread.run_sync(self._spare.make, nbytes, header_nbytes)
        except OSError as exc:  # no memory for it now: publishes allocate as they go
            log.warning("publisher: no spare version made: %s", exc)
        finally:
            self._making_spare = False

    # -------------------------------------------------------------- readers
    async def _accept_loop(self) -> None:
        assert self._listener is not None and self._tg is not None
        while True:
            await anyio.wait_readable(self._listener)
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:  # EMFILE, ENOBUFS, ECONNABORTED...: never the learner's end
                log.warning("publisher: cannot accept a reader now (%s); retrying", exc)
                await anyio.sleep(0.1)  # it stays in the backlog meanwhile
                continue
            sock.setblocking(False)
            if peer_uid(sock) != os.getuid():
                log.warning("publisher: refused a reader of another user")
                sock.close()
                continue
            reader = ReaderConn(sock)
            self._readers.add(reader)
            reader.send(w.Hello(w.PROTOCOL, os.getpid()))
            if self._ring.latest is not None:
                reader.send(w.Announce(self._ring.latest))
            self._tg.start_soon(self._serve, reader, name="publisher reader")

    async def _serve(self, reader: ReaderConn) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._flush_loop, reader)
                await self._read_loop(reader)
                tg.cancel_scope.cancel()
        finally:
            self._drop(reader)

    async def _flush_loop(self, reader: ReaderConn) -> None:
        while not reader.gone:
            await reader.queued.wait()
            reader.queued = anyio.Event()
            while reader.queue and not reader.gone:
                await anyio.wait_writable(reader.sock)
                reader.flush()

    async def _read_loop(self, reader: ReaderConn) -> None:
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
            except (ProtocolError, OSError) as exc:  # (EMFILE on a version's dup): it alone
                log.warning("publisher: dropping a reader: %s", exc)
                return

    def _handle(self, reader: ReaderConn, msg: w.Message) -> None:
        if isinstance(msg, w.Acquire):
            entry = self._ring.acquire(msg.version)  # counted before the descriptor leaves
            if entry is None:
                reader.send(w.Refused(msg.version))
                return
            s = entry.sealed
            reader.send(w.Granted(msg.version, s.nbytes, s.header_offset, s.header_nbytes), s.fd)
        elif isinstance(msg, w.Release):
            self._ring.release(msg.version)
            self._ring.trim()
            self._signal()

    def _drop(self, reader: ReaderConn) -> None:
        """A reader is gone (EOF, error, or we close): its leases end with it."""
        self._readers.discard(reader)
        self._ring.release_all(reader.wire.held)
        reader.wire.held.clear()
        reader.close()
        if self._open:
            self._ring.trim()
            self._signal()
