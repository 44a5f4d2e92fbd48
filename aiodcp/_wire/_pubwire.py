"""The publisher <-> reader protocol of live publication, with no I/O (as h11).

Every frame has one fixed size (:data:`FRAME`): magic, kind, and four signed 64-bit
fields; a message uses the fields it needs. Nothing in a frame grows with the state:
a version's bytes, tensor specs and skeleton live in its sealed memfd, which travels
beside a :class:`Granted` frame by ``SCM_RIGHTS``.

Who sends what, and when (``_FROM``), checked on receipt by :class:`Wire`::

    publisher -> reader   Hello (first, once), Announce, Granted (+ fd) or Refused
                          (each answers one outstanding Acquire, in order), Closing
    reader -> publisher   Acquire (a version announced), Release (a version granted)

A reader asks for a version by number; the publisher counts the lease *before* the fd
leaves, so a version with a descriptor in flight is never taken out of the ring.
"""

from __future__ import annotations

import enum
import os
import struct
from collections import deque
from dataclasses import dataclass
from typing import Final

from .._errors import ProtocolError

__all__ = [
    "FRAME",
    "PROTOCOL",
    "Acquire",
    "Announce",
    "Closing",
    "Granted",
    "Hello",
    "Message",
    "Refused",
    "Release",
    "Side",
    "Wire",
]

MAGIC: Final = b"AV"
PROTOCOL: Final = 1
_STRUCT: Final = struct.Struct(">2sBB4q")
FRAME: Final = _STRUCT.size  # 36 bytes


class Kind(enum.IntEnum):
    HELLO = 1
    ANNOUNCE = 2
    ACQUIRE = 3
    GRANTED = 4
    REFUSED = 5
    RELEASE = 6
    CLOSING = 7


class Side(enum.Enum):
    PUBLISHER = "publisher"
    READER = "reader"


@dataclass(frozen=True)
class Hello:
    """First frame from the publisher: its protocol and pid."""

    protocol: int
    pid: int


@dataclass(frozen=True)
class Announce:
    """``version`` is the newest; ask for it with :class:`Acquire`."""

    version: int


@dataclass(frozen=True)
class Acquire:
    version: int


@dataclass(frozen=True)
class Granted:
    """The lease is counted; the version's memfd comes with this frame.

    ``nbytes`` is the tensor bytes; the header (specs and skeleton, a restricted
    pickle) is ``header_nbytes`` bytes at ``header_offset``: the memfd's end."""

    version: int
    nbytes: int
    header_offset: int
    header_nbytes: int


@dataclass(frozen=True)
class Refused:
    """The version asked for has left the ring; a newer one is announced."""

    version: int


@dataclass(frozen=True)
class Release:
    version: int


@dataclass(frozen=True)
class Closing:
    """The publisher closes normally: no more versions (readers end their iteration)."""


Message = Hello | Announce | Acquire | Granted | Refused | Release | Closing

_KIND: dict[type, Kind] = {
    Hello: Kind.HELLO,
    Announce: Kind.ANNOUNCE,
    Acquire: Kind.ACQUIRE,
    Granted: Kind.GRANTED,
    Refused: Kind.REFUSED,
    Release: Kind.RELEASE,
    Closing: Kind.CLOSING,
}
_FROM: dict[Side, frozenset[Kind]] = {
    Side.PUBLISHER: frozenset(
        {Kind.HELLO, Kind.ANNOUNCE, Kind.GRANTED, Kind.REFUSED, Kind.CLOSING}
    ),
    Side.READER: frozenset({Kind.ACQUIRE, Kind.RELEASE}),
}


def encode(msg: Message) -> bytes:
    kind = _KIND[type(msg)]
    fields = [int(v) for v in vars(msg).values()] if not isinstance(msg, Closing) else []
    fields += [0] * (4 - len(fields))
    return _STRUCT.pack(MAGIC, PROTOCOL, kind, *fields)


def decode(frame: bytes) -> tuple[Kind, Message]:
    magic, proto, kind_no, a, b, c, d = _STRUCT.unpack(frame)
    if magic != MAGIC or proto != PROTOCOL:
        raise ProtocolError(f"not a publication frame (magic {magic!r}, protocol {proto})")
    try:
        kind = Kind(kind_no)
    except ValueError:
        raise ProtocolError(f"unknown publication message kind {kind_no}") from None
    msg: Message
    if kind is Kind.HELLO:
        msg = Hello(a, b)
    elif kind is Kind.ANNOUNCE:
        msg = Announce(a)
    elif kind is Kind.ACQUIRE:
        msg = Acquire(a)
    elif kind is Kind.GRANTED:
        if b < 0 or c < b or d < 0:
            raise ProtocolError(f"malformed Granted frame ({a}, {b}, {c}, {d})")
        msg = Granted(a, b, c, d)
    elif kind is Kind.REFUSED:
        msg = Refused(a)
    elif kind is Kind.RELEASE:
        msg = Release(a)
    else:
        msg = Closing()
    return kind, msg


class Wire:
    """One end of a connection: frames in, messages out, the order checked.

    ``side`` is *this* end; :meth:`receive` takes bytes (and descriptors) from the
    other one and :meth:`next_message` gives its messages, each :class:`Granted`
    with the descriptor that came with it. Descriptors this end has not handed out
    yet are closed by :meth:`close`.
    """

    def __init__(self, side: Side) -> None:
        self.side = side
        self._peer = Side.READER if side is Side.PUBLISHER else Side.PUBLISHER
        self._buf = bytearray()
        self._fds: deque[int] = deque()
        self._greeted = False
        self.asked: deque[int] = deque()  # reader: Acquires not yet answered, in order
        self.held: dict[int, int] = {}  # publisher: version -> leases this reader holds
        self.closed = False

    # -------------------------------------------------------------- sending
    def send(self, msg: Message) -> bytes:
        kind = _KIND[type(msg)]
        if kind not in _FROM[self.side]:
            raise ProtocolError(f"{self.side.value} may not send {type(msg).__name__}")
        if isinstance(msg, Acquire):
            self.asked.append(msg.version)
        elif isinstance(msg, Granted):
            self.held[msg.version] = self.held.get(msg.version, 0) + 1
        return encode(msg)

    # ------------------------------------------------------------ receiving
    def receive(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        self._fds.extend(fds)
        self._buf += data

    def next_message(self) -> tuple[Message, int | None] | None:
        """The next complete message and its descriptor (Granted only); None: need data."""
        if len(self._buf) < FRAME:
            return None
        frame = bytes(self._buf[:FRAME])
        del self._buf[:FRAME]
        kind, msg = decode(frame)
        if kind not in _FROM[self._peer]:
            raise ProtocolError(f"a {self._peer.value} may not send {type(msg).__name__}")
        if self._peer is Side.PUBLISHER and (kind is Kind.HELLO) == self._greeted:
            raise ProtocolError("Hello must come first, and once")
        self._greeted = True
        fd: int | None = None
        if isinstance(msg, (Granted, Refused)):
            if not self.asked or self.asked[0] != msg.version:
                raise ProtocolError(f"{type(msg).__name__} {msg.version} answers no Acquire")
            self.asked.popleft()
            if isinstance(msg, Granted):
                if not self._fds:
                    raise ProtocolError(f"Granted {msg.version} came without its descriptor")
                fd = self._fds.popleft()
        elif isinstance(msg, Release):
            count = self.held.get(msg.version, 0)
            if count <= 0:
                raise ProtocolError(f"Release {msg.version}: no such lease")
            if count == 1:
                del self.held[msg.version]
            else:
                self.held[msg.version] = count - 1
        return msg, fd

    @property
    def greeted(self) -> bool:
        """A reader's: the publisher's Hello came (it served this connection)."""
        return self._greeted

    def close(self) -> None:
        """Close descriptors received and not handed out (idempotent)."""
        self.closed = True
        while self._fds:
            os.close(self._fds.popleft())
