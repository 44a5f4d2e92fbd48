"""The messages of the parent <-> daemon protocol: frozen dataclasses, no I/O.

Each message is a handful of scalar fields (its frame's JSON header); what is
proportional to the number of tensors travels as a file descriptor beside it
(see :mod:`aiodcp._wire._protocol`, which frames them and keeps the state table).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Final

__all__ = [
    "BY_KIND",
    "PROTOCOL_VERSION",
    "Arena",
    "Cancel",
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
    "Terminate",
]

PROTOCOL_VERSION: Final = 2


class Kind(enum.IntEnum):
    HELLO = 1
    READY = 2
    INIT_FAILED = 3
    ARENA = 4
    RELEASE_ARENA = 5
    SAVE = 6
    CANCEL = 7
    PROGRESS = 8
    SAVED = 9
    SAVE_FAILED = 10
    TERMINATE = 11
    LOG = 12


class Role(enum.Enum):
    PARENT = "parent"
    DAEMON = "daemon"


# --------------------------------------------------------------------- messages
@dataclass(frozen=True)
class Message:
    KIND: ClassVar[Kind]


@dataclass(frozen=True)
class Hello(Message):
    """Daemon -> parent, first frame: who is speaking."""

    KIND: ClassVar[Kind] = Kind.HELLO
    pid: int
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Ready(Message):
    """Daemon -> parent: process group (if any) is up; requests may follow."""

    KIND: ClassVar[Kind] = Kind.READY
    rank: int
    world_size: int


@dataclass(frozen=True)
class InitFailed(Message):
    """Daemon -> parent: start-up failed; the daemon exits after sending it."""

    KIND: ClassVar[Kind] = Kind.INIT_FAILED
    error_type: str
    message: str
    traceback: str = ""


@dataclass(frozen=True)
class Arena(Message):
    """Parent -> daemon: a shared-memory arena; its file descriptor rides along.

    ``nbytes`` of tensor data come first; the layout of its tensors (a pickled
    tuple of ``aiodcp._staging._staging.TensorSpec``) is at ``layout_offset``,
    ``layout_nbytes`` long.
    """

    KIND: ClassVar[Kind] = Kind.ARENA
    arena_id: int
    nbytes: int
    layout_offset: int = 0
    layout_nbytes: int = 0


@dataclass(frozen=True)
class ReleaseArena(Message):
    """Parent -> daemon: unmap an arena no save uses any more."""

    KIND: ClassVar[Kind] = Kind.RELEASE_ARENA
    arena_id: int


@dataclass(frozen=True)
class Save(Message):
    """Parent -> daemon: persist the state staged in ``arena_id`` as ``step``.

    A memfd holding the pickled skeleton (``skeleton_nbytes`` long) rides along.
    """

    KIND: ClassVar[Kind] = Kind.SAVE
    req_id: int
    step: int
    arena_id: int
    skeleton_nbytes: int
    overwrite: bool = False


@dataclass(frozen=True)
class Cancel(Message):
    """Parent -> daemon: abort ``req_id`` at the next write boundary (if not committed)."""

    KIND: ClassVar[Kind] = Kind.CANCEL
    req_id: int


@dataclass(frozen=True)
class Progress(Message):
    """Daemon -> parent: ``req_id`` has written ``bytes_written`` of ``total_bytes``."""

    KIND: ClassVar[Kind] = Kind.PROGRESS
    req_id: int
    phase: str
    bytes_written: int
    total_bytes: int


@dataclass(frozen=True)
class Saved(Message):
    """Daemon -> parent: ``req_id`` is committed (retention has run); DCP's metadata
    is in the step's ``.metadata`` file, read by the parent only if asked for."""

    KIND: ClassVar[Kind] = Kind.SAVED
    req_id: int
    step: int
    path: str
    nbytes: int
    persist_seconds: float


@dataclass(frozen=True)
class SaveFailed(Message):
    """Daemon -> parent: ``req_id`` failed (or was cancelled); nothing was published.

    ``fatal``: the daemon exits after this reply (its process group can no longer be
    trusted); the parent starts a fresh one for the next save.
    """

    KIND: ClassVar[Kind] = Kind.SAVE_FAILED
    req_id: int
    error_type: str
    message: str
    traceback: str = ""
    cancelled: bool = False
    fatal: bool = False


@dataclass(frozen=True)
class Terminate(Message):
    """Parent -> daemon: finish the current request, then exit."""

    KIND: ClassVar[Kind] = Kind.TERMINATE


@dataclass(frozen=True)
class Log(Message):
    """Daemon -> parent: one log record, re-emitted by the parent's logging."""

    KIND: ClassVar[Kind] = Kind.LOG
    level: int
    name: str
    message: str


BY_KIND: Final[dict[Kind, type[Message]]] = {
    cls.KIND: cls
    for cls in (
        Hello,
        Ready,
        InitFailed,
        Arena,
        ReleaseArena,
        Save,
        Cancel,
        Progress,
        Saved,
        SaveFailed,
        Terminate,
        Log,
    )
}


@dataclass
class DaemonConfig:
    """Start-up configuration of a daemon, passed as JSON on its command line."""

    root: str
    rank: int = 0
    world_size: int = 1
    master_addr: str = ""
    master_port: int = 0
    use_prefix_store: bool = False
    token: str = ""
    init_timeout: float = 1800.0
    collective_timeout: float = 600.0
    disable_automatic_gc: bool = False
    disable_manual_gc: bool = False
    thread_count: int = 2
    sync_files: bool = True
    direct_io: bool = True
    keep_last: int | None = None
    keep_every: int | None = None
    niceness: int = 0
    log_level: int = 20
    storage_options: dict[str, Any] | None = None
    """An object-store root's options (never credentials: those come from the environment)."""
