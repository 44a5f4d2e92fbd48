"""The parent <-> daemon protocol, with no I/O (in the manner of h11).

Bytes go in through :meth:`Connection.receive_data`, messages come out of
:meth:`Connection.next_event`; :meth:`Connection.send` turns a message into
bytes. Neither touches a socket: the parent (async) and the daemon (threads)
are thin shells around this module.

Frame layout (all integers big-endian)::

    magic  b"AD"      2 bytes
    version           1 byte
    kind              1 byte   (Kind)
    header length     4 bytes  (<= MAX_HEADER, UTF-8 JSON object)
    header

Every message is small and of bounded size, whatever the state holds: the JSON
header carries a handful of scalar fields. Anything proportional to the number
of tensors lives in shared memory and travels as a file descriptor beside the
frame (``Arena``: the staging memory, with the tensor layout in its tail;
``Save``: a memfd holding the pickled skeleton). Text fields are clipped by the
sender (:func:`clip`), so no message can outgrow ``MAX_HEADER``; a frame that
still would is refused at once with :class:`ProtocolError`, never dropped.

Which message may be sent by whom, and when, is the table ``_ALLOWED``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import struct
import typing
from dataclasses import dataclass
from typing import Any, Final

from .._errors import ProtocolError
from ._messages import (
    BY_KIND,
    PROTOCOL_VERSION,
    Arena,
    Cancel,
    DaemonConfig,
    Hello,
    InitFailed,
    Kind,
    Log,
    Message,
    Progress,
    Ready,
    ReleaseArena,
    Role,
    Save,
    Saved,
    SaveFailed,
    Terminate,
)

__all__ = [
    "MAGIC",
    "MAX_HEADER",
    "MAX_TEXT",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "Arena",
    "Cancel",
    "Closed",
    "Connection",
    "DaemonConfig",
    "Hello",
    "InitFailed",
    "Kind",
    "Log",
    "Message",
    "Progress",
    "Ready",
    "ReleaseArena",
    "Role",
    "Save",
    "SaveFailed",
    "Saved",
    "State",
    "Terminate",
    "carries_fd",
    "clip",
    "decode_frame",
    "encode_frame",
]

MAGIC: Final = b"AD"
_HEAD = struct.Struct(">2sBBI")
HEADER_SIZE: Final = _HEAD.size
MAX_HEADER: Final = 1 << 16
MAX_TEXT: Final = 16_000
"""Characters a text field (message, traceback, log line) may carry; the rest is clipped."""


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to ``limit`` characters (keeping both ends), so a frame stays bounded."""
    if len(text) <= limit:
        return text
    half = limit // 2 - 40
    return f"{text[:half]}\n... [{len(text) - 2 * half} characters clipped] ...\n{text[-half:]}"


# ---------------------------------------------------------------------- framing
def carries_fd(msg: Message) -> bool:
    """Whether one file descriptor travels beside ``msg``'s frame (in order)."""
    return isinstance(msg, (Arena, Save))


def encode_frame(msg: Message) -> bytes:
    """Serialise one message into one frame (ProtocolError if it would be too large)."""
    fields = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
    header = json.dumps(fields, separators=(",", ":"), allow_nan=False).encode()
    if len(header) > MAX_HEADER:
        raise ProtocolError(f"{type(msg).__name__} header is {len(header)} bytes > {MAX_HEADER}")
    return _HEAD.pack(MAGIC, PROTOCOL_VERSION, msg.KIND, len(header)) + header


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(name: str, value: Any, tp: Any) -> Any:
    """Validate a decoded JSON value against a field type; return the typed value."""
    bad = ProtocolError(f"field {name!r}: expected {tp}, got {type(value).__name__}")
    if tp is int:
        if not _is_int(value):
            raise bad
        return value
    if tp is float:
        if not (_is_int(value) or isinstance(value, float)):
            raise bad
        return float(value)
    if tp is bool or tp is str:
        if type(value) is not tp:
            raise bad
        return value
    raise AssertionError(f"unsupported field type {tp}")  # pragma: no cover


_HINTS: dict[type[Message], dict[str, Any]] = {}


def _hints(cls: type[Message]) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def decode_frame(buf: bytes | bytearray | memoryview) -> tuple[Message, int] | None:
    """Decode the first frame in ``buf``.

    Returns ``(message, bytes consumed)``, or ``None`` if ``buf`` holds only part
    of a frame. Raises :class:`ProtocolError` on any malformed input; it never
    reads past the bounds the header declares.
    """
    if len(buf) < HEADER_SIZE:
        if len(buf) >= 2 and bytes(buf[:2]) != MAGIC:
            raise ProtocolError(f"bad magic {bytes(buf[:2])!r}")
        return None
    magic, version, kind, hlen = _HEAD.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version}, expected {PROTOCOL_VERSION}")
    try:
        cls = BY_KIND[Kind(kind)]
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind}") from None
    if hlen > MAX_HEADER:
        raise ProtocolError(f"frame too large (header {hlen} > {MAX_HEADER})")
    end = HEADER_SIZE + hlen
    if len(buf) < end:
        return None
    try:
        fields = json.loads(bytes(buf[HEADER_SIZE:end]))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"{cls.__name__}: header is not JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise ProtocolError(f"{cls.__name__}: header is not a JSON object")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in fields.items():
        if key not in names:
            raise ProtocolError(f"{cls.__name__}: unexpected field {key!r}")
        kwargs[key] = _check(key, value, hints[key])
    try:
        msg = cls(**kwargs)
    except TypeError as exc:
        raise ProtocolError(f"{cls.__name__}: {exc}") from None
    return msg, end


# ---------------------------------------------------------------- state machine
class State(enum.Enum):
    HANDSHAKE = "handshake"  # waiting for the daemon's Hello
    INITIALIZING = "initializing"  # waiting for Ready / InitFailed
    SERVING = "serving"
    TERMINATING = "terminating"  # parent sent Terminate; daemon finishes and closes
    CLOSED = "closed"


_P, _D = Role.PARENT, Role.DAEMON
_ALLOWED: Final[dict[tuple[State, Role], frozenset[Kind]]] = {
    (State.HANDSHAKE, _D): frozenset({Kind.HELLO}),
    (State.HANDSHAKE, _P): frozenset({Kind.TERMINATE}),
    (State.INITIALIZING, _D): frozenset({Kind.READY, Kind.INIT_FAILED, Kind.LOG}),
    (State.INITIALIZING, _P): frozenset({Kind.TERMINATE}),
    (State.SERVING, _P): frozenset(
        {Kind.ARENA, Kind.RELEASE_ARENA, Kind.SAVE, Kind.CANCEL, Kind.TERMINATE}
    ),
    (State.SERVING, _D): frozenset({Kind.PROGRESS, Kind.SAVED, Kind.SAVE_FAILED, Kind.LOG}),
    (State.TERMINATING, _P): frozenset({Kind.CANCEL}),  # cancel while closing
    (State.TERMINATING, _D): frozenset({Kind.PROGRESS, Kind.SAVED, Kind.SAVE_FAILED, Kind.LOG}),
}


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


@dataclass(frozen=True)
class Closed:
    """The peer closed the channel (EOF). ``clean`` if that was expected."""

    clean: bool


class Connection:
    """One end of the channel: validates what each side sends, in order.

    Both ends run the same machine; ``our_role`` says which messages are ours.
    Request ids must be fresh and increasing; replies must name an open request;
    a save must name a live arena.
    """

    def __init__(self, our_role: Role) -> None:
        self.our_role = our_role
        self.their_role = _D if our_role is _P else _P
        self.state = State.HANDSHAKE
        self._buf = bytearray()
        self._eof = False
        self._open: set[int] = set()
        self._last_req = -1
        self._arenas: set[int] = set()

    # -- transitions, shared by both directions
    def _apply(self, msg: Message, sender: Role) -> None:
        kind = msg.KIND
        if self.state is State.CLOSED or kind not in _ALLOWED[(self.state, sender)]:
            raise ProtocolError(
                f"{sender.value} may not send {kind.name} in state {self.state.name}"
            )
        if isinstance(msg, Hello):
            if msg.version != PROTOCOL_VERSION:
                raise ProtocolError(f"daemon speaks protocol {msg.version}")
            self.state = State.INITIALIZING
        elif isinstance(msg, Ready):
            self.state = State.SERVING
        elif isinstance(msg, InitFailed):
            self.state = State.CLOSED
        elif isinstance(msg, Arena):
            if min(msg.nbytes, msg.layout_offset, msg.layout_nbytes) < 0:
                raise ProtocolError(f"negative size in {msg}")
            if msg.arena_id in self._arenas:
                raise ProtocolError(f"arena {msg.arena_id} already exists")
            self._arenas.add(msg.arena_id)
        elif isinstance(msg, ReleaseArena):
            if msg.arena_id not in self._arenas:
                raise ProtocolError(f"release of unknown arena {msg.arena_id}")
            self._arenas.discard(msg.arena_id)
        elif isinstance(msg, Save):
            if msg.req_id <= self._last_req:
                raise ProtocolError(f"request id {msg.req_id} is not fresh")
            if msg.arena_id not in self._arenas:
                raise ProtocolError(f"save names unknown arena {msg.arena_id}")
            if msg.step < 0 or msg.skeleton_nbytes < 0:
                raise ProtocolError(f"negative step or size in {msg}")
            self._last_req = msg.req_id
            self._open.add(msg.req_id)
        elif isinstance(msg, Cancel):
            if not 0 <= msg.req_id <= self._last_req:
                raise ProtocolError(f"cancel of unknown request {msg.req_id}")
        elif isinstance(msg, (Progress, Saved, SaveFailed)):
            if msg.req_id not in self._open:
                raise ProtocolError(f"{kind.name} for request {msg.req_id}, which is not open")
            if not isinstance(msg, Progress):
                self._open.discard(msg.req_id)
        elif isinstance(msg, Terminate):
            self.state = State.CLOSED if self.state is not State.SERVING else State.TERMINATING

    @property
    def open_requests(self) -> frozenset[int]:
        return frozenset(self._open)

    # -- our side
    def send(self, msg: Message) -> bytes:
        """Validate that we may send ``msg`` now; return its frame."""
        frame = encode_frame(msg)
        self._apply(msg, self.our_role)
        return frame

    # -- their side
    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means end of file."""
        if self._eof:
            raise ProtocolError("data after end of file")
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Message | _NeedData | Closed:
        """The next message from the peer, ``NEED_DATA``, or ``Closed`` at EOF."""
        decoded = decode_frame(self._buf)
        if decoded is None:
            if not self._eof:
                return NEED_DATA
            if self._buf:
                raise ProtocolError(f"end of file inside a frame ({len(self._buf)} bytes)")
            clean = self.state in (State.CLOSED, State.TERMINATING) and not self._open
            self.state = State.CLOSED
            return Closed(clean=clean)
        msg, used = decoded
        del self._buf[:used]
        self._apply(msg, self.their_role)
        return msg
