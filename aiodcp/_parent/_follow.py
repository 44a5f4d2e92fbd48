"""Live publication, the reader's side: ``follow(root)`` yields leased versions.

``async for version in aiodcp.follow(root)`` gives the newest version each time
(a slow reader skips to the newest), already leased: it stays in the publisher's
ring, and mapped here, until ``async with version`` ends, ``version.release()``, or
the iteration moves on -- whichever comes first. Where no publisher serves ``root``
on this host, the same loop follows committed checkpoints on disk (``watch`` +
``hold`` + ``load``), so an actor's code does not change with its placement.

How the iteration ends: the publisher closed normally -> it stops; the publisher
died (EOF without its Closing frame) -> :class:`PublisherGoneError`; what the reader
holds or copied stays valid. A connection closed before the publisher's Hello (a
reader caught in the backlog of a publisher that was closing) was never served: the
reader looks for a publisher again, as if none had answered.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.to_thread

from .._disk import _retention, _storage
from .._disk._roots import local_only
from .._errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ProtocolError,
    PublisherGoneError,
)
from .._staging._versions import Mapped, copy_into, views_state_dict
from .._wire import _pubwire as w
from ._load import load_checkpoint
from ._pubconn import peer_uid, socket_name
from ._watch import _drain, _inotify

__all__ = ["Follower", "Version", "follow"]

log = logging.getLogger("aiodcp")

Source = Literal["auto", "memory", "disk"]


class _Unserved(Exception):
    """The connection ended before the publisher's Hello: it never served us."""


class Version:
    """One leased version of the published state (see :func:`follow`).

    ``number`` is the version (or the step, from disk); ``source`` is ``"memory"``
    or ``"disk"``. Use it inside ``async with version:``; the lease ends there.
    """

    def __init__(self, number: int, source: str) -> None:
        self.number = number
        self.source = source
        self._released = False
        self._copies = 0
        self._idle = anyio.Event()
        self._idle.set()

    @property
    def released(self) -> bool:
        return self._released

    async def __aenter__(self) -> Version:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()

    def _check(self) -> None:
        if self._released:
            raise CheckpointError(f"version {self.number} was released; its lease is over")

    async def copy_into(self, state_dict: Mapping[str, Any]) -> None:
        """Load this version into ``state_dict`` in place (off the event loop).

        As ``aiodcp.load``: every key of ``state_dict`` must be in the version with
        the same shape (``CheckpointMismatchError`` names the others; nothing is
        changed then), top-level ``Stateful`` values get ``load_state_dict``.
        From memory, plain tensors and a DTensor's local shard of the same shape
        are copied (no resharding); from disk, DCP's load reshards.
        Cancelling it waits for the copy to end (the lease outlives it).
        """
        self._check()
        self._copies += 1
        self._idle = anyio.Event()
        try:
            with anyio.CancelScope(shield=True):
                await self._copy(state_dict)
        finally:
            self._copies -= 1
            if not self._copies:
                self._idle.set()

    async def _copy(self, state_dict: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Zero-copy views of the version's tensors (memory only), valid while leased.

        Views are copy-on-write mappings of the publisher's pages: writing one
        changes only this process's copy. After the lease they read zeros.
        """
        raise CheckpointError(
            f"version {self.number} comes from disk: zero-copy views need a publisher on "
            "this host; use copy_into()"
        )

    async def release(self) -> None:
        """End the lease now (idempotent; waits for copies in progress; shielded)."""
        if self._released:
            return
        self._released = True
        with anyio.CancelScope(shield=True):
            await self._idle.wait()
            await self._release()

    async def _release(self) -> None:
        raise NotImplementedError


class _MemoryVersion(Version):
    def __init__(self, number: int, mapped: Mapped, follower: Follower) -> None:
        super().__init__(number, "memory")
        self.nbytes = mapped.nbytes
        self._mapped = mapped
        self._follower = follower

    async def _copy(self, state_dict: Mapping[str, Any]) -> None:
        m = self._mapped
        assert m.views is not None
        await anyio.to_thread.run_sync(copy_into, state_dict, m.skeleton, m.views, self.number)

    def state_dict(self) -> dict[str, Any]:
        self._check()
        assert self._mapped.views is not None
        return views_state_dict(self._mapped.skeleton, self._mapped.views)

    async def _release(self) -> None:
        await anyio.to_thread.run_sync(self._mapped.unmap)
        self._follower._send_release(self.number)


class _DiskVersion(Version):
    def __init__(self, number: int, root: Path, lease: int) -> None:
        super().__init__(number, "disk")
        self._root = root
        self._lease = lease

    async def _copy(self, state_dict: Mapping[str, Any]) -> None:
        await load_checkpoint(state_dict, self._root, step=self.number, group=None)

    async def _release(self) -> None:
        await anyio.to_thread.run_sync(_retention.release_hold, self._root, self._lease)


def follow(
    root: str | os.PathLike[str],
    *,
    rank: int = 0,
    source: Source = "auto",
    poll_interval: float = 0.5,
) -> Follower:
    """Follow the newest versions of the state published for ``root``.

    ``async for version in follow(root): async with version: ...`` -- each
    ``version`` is leased and is the newest one at the time (latest-only: a slow
    reader skips versions). ``source``: ``"memory"`` follows a
    :class:`aiodcp.Publisher` on this host (waiting, polling every
    ``poll_interval`` seconds, until one serves ``root``); ``"disk"`` follows
    committed checkpoints (the step is the version); ``"auto"`` takes the
    publisher when one answers and committed checkpoints meanwhile, never
    yielding a number lower than one it yielded (number versions by step).
    Close it with ``aclose()``, ``async with follow(...) as versions``, or by
    leaving the loop and dropping it.
    """
    if source not in ("auto", "memory", "disk"):
        raise ValueError(f"source must be 'auto', 'memory' or 'disk', got {source!r}")
    local_only(root, "follow()")
    return Follower(Path(root), rank, source, poll_interval)


class Follower:
    """The iterator :func:`follow` returns."""

    def __init__(self, root: Path, rank: int, source: Source, poll_interval: float) -> None:
        self.root = root
        self.rank = rank
        self.source = source
        self.poll_interval = poll_interval
        self._sock: socket.socket | None = None
        self._wire: w.Wire | None = None
        self._announced: int | None = None
        self._answers: dict[int, tuple[w.Granted | w.Refused, int | None]] = {}
        self._waiting: int | None = None
        self._closing = False
        self._last: int | None = None
        self._current: Version | None = None
        self._inotify: int | None = None
        self._closed = False
        self._unsent: list[bytes] = []
        self._name: bytes | None = None

    def __aiter__(self) -> Follower:
        return self

    async def __aenter__(self) -> Follower:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release the current version and disconnect (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if self._current is not None:
                await self._current.release()
                self._current = None
            self._disconnect()
            if self._inotify is not None:
                os.close(self._inotify)
                self._inotify = None

    def __del__(self) -> None:
        if not self._closed:
            self._disconnect()

    async def __anext__(self) -> Version:
        if self._closed:
            raise StopAsyncIteration
        if self._current is not None:  # moving on ends the previous lease
            current, self._current = self._current, None
            await current.release()
        while True:
            if self._sock is None and self.source != "disk":
                await self._connect()
            if self._sock is not None:
                try:
                    version = await self._next_memory()
                except _Unserved:  # as if no publisher answered: look again
                    await anyio.sleep(self.poll_interval if self.source == "memory" else 0)
                    continue
            else:
                version = await self._next_disk()
            if version is not None:
                self._current = version
                self._last = version.number
                return version

    # ---------------------------------------------------------------- memory
    async def _connect(self) -> None:
        """Connect to the publisher; "memory" waits for one, the others try once."""
        if self._name is None:
            self._name = await anyio.to_thread.run_sync(socket_name, self.root, self.rank)
        while True:
            sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
            )
            try:
                sock.connect(self._name)
                if peer_uid(sock) != os.getuid():
                    raise CheckpointError(f"the publisher of {self.root} runs as another user")
            except (ConnectionRefusedError, FileNotFoundError, BlockingIOError):
                sock.close()
                if self.source != "memory":
                    return
                await anyio.sleep(self.poll_interval)
                continue
            except BaseException:
                sock.close()
                raise
            self._sock = sock
            self._wire = w.Wire(w.Side.READER)
            self._announced = None
            self._closing = False
            return

    def _disconnect(self) -> None:
        if self._wire is not None:
            self._wire.close()
            self._wire = None
        for _, fd in self._answers.values():
            if fd is not None:
                os.close(fd)
        self._answers.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, msg: w.Message) -> None:
        assert self._sock is not None and self._wire is not None
        frame = self._wire.send(msg)
        self._unsent.append(frame)
        self._flush()

    def _flush(self) -> None:
        while self._unsent and self._sock is not None:
            try:
                n = self._sock.send(self._unsent[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._unsent.clear()
                return
            if n < len(self._unsent[0]):
                self._unsent[0] = self._unsent[0][n:]
            else:
                self._unsent.pop(0)

    def _send_release(self, number: int) -> None:
        if self._sock is not None and self._wire is not None and not self._closing:
            with contextlib.suppress(ProtocolError):
                self._send(w.Release(number))

    async def _receive(self) -> None:
        """Read what the publisher sent; EOF -> end or PublisherGoneError."""
        assert self._sock is not None and self._wire is not None
        await anyio.wait_readable(self._sock)
        try:
            data, fds, _flags, _addr = socket.recv_fds(self._sock, 4096, 8)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        self._wire.receive(data, fds)
        while (item := self._wire.next_message()) is not None:
            msg, fd = item
            if isinstance(msg, w.Hello):
                continue
            if isinstance(msg, w.Announce):
                if self._announced is None or msg.version > self._announced:
                    self._announced = msg.version
            elif isinstance(msg, (w.Granted, w.Refused)):
                if msg.version == self._waiting:
                    self._answers[msg.version] = (msg, fd)
                elif fd is not None:  # an answer nobody waits for (a cancelled call)
                    os.close(fd)
                    self._send(w.Release(msg.version))
            elif isinstance(msg, w.Closing):
                self._closing = True
        if not data:
            closing, greeted = self._closing, self._wire.greeted
            self._disconnect()
            if closing:
                self._closed = True
                raise StopAsyncIteration
            if not greeted:  # in the backlog of a publisher that closed: never served
                raise _Unserved
            raise PublisherGoneError(
                f"the publisher of {self.root} (rank {self.rank}) exited without closing"
            )

    async def _next_memory(self) -> Version | None:
        self._flush()
        while self._announced is None or (self._last is not None and self._announced <= self._last):
            await self._receive()
        number = self._announced
        self._waiting = number
        try:
            self._send(w.Acquire(number))
            while number not in self._answers:
                await self._receive()
        finally:
            self._waiting = None
        msg, fd = self._answers.pop(number)
        if isinstance(msg, w.Refused):
            return None  # gone from the ring already: a newer one is announced
        assert isinstance(msg, w.Granted) and fd is not None
        try:
            mapped = await anyio.to_thread.run_sync(
                Mapped, fd, msg.nbytes, msg.header_offset, msg.header_nbytes
            )
        except BaseException:
            self._send_release(number)
            raise
        finally:
            os.close(fd)  # the mapping keeps the memory
        return _MemoryVersion(number, mapped, self)

    # ------------------------------------------------------------------ disk
    async def _next_disk(self) -> Version | None:
        path = await anyio.to_thread.run_sync(_storage.abspath, self.root)
        if self._inotify is None:
            self._inotify = await anyio.to_thread.run_sync(_inotify, path)
        steps = await anyio.to_thread.run_sync(_storage.list_steps, path)
        newer = [s for s in steps if self._last is None or s > self._last]
        if newer:
            step = newer[-1]
            try:
                lease = await anyio.to_thread.run_sync(_retention.hold_step, path, step)
            except CheckpointNotFoundError:
                return None  # retention deleted it: a newer one is there
            return _DiskVersion(step, path, lease)
        with anyio.move_on_after(self.poll_interval):
            if self._inotify is not None:
                await anyio.wait_readable(self._inotify)
            else:
                await anyio.sleep(self.poll_interval)
        if self._inotify is not None:
            _drain(self._inotify)
        return None
