"""Live publication's connections: how readers find a publisher, and the publisher's
end of each reader's connection (its socket, its protocol state, its outgoing frames).

Readers find the publisher by name: a Linux abstract-namespace socket named from the
root's real path and the rank, so nothing is ever left on disk, and a second
publisher on one root fails at once. Both ends check the other's uid
(``SO_PEERCRED``): another user can neither read versions nor pose as the learner.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from collections import deque

import anyio

from .._wire import _pubwire as w

__all__ = ["ReaderConn", "peer_uid", "socket_name"]

_UCRED = struct.Struct("3i")


def socket_name(root: str | os.PathLike[str], rank: int = 0) -> bytes:
    """The abstract socket address of ``root``'s publisher for ``rank``."""
    real = os.path.realpath(os.fspath(root))
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:40]
    return b"\0aiodcp-publish-" + digest.encode() + b"-" + str(rank).encode()


def peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return int(uid)


class ReaderConn:
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
