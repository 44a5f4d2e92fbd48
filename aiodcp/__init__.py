"""aiodcp: checkpoint PyTorch training state from async code, in a background daemon.

The whole public API::

    async with aiodcp.AsyncCheckpointer("checkpoints") as ckpt:
        handle = await ckpt.save(state_dict, step=step)  # returns once staged
        result = await handle                             # committed and durable
        step = await ckpt.load(state_dict)                # latest committed step

    step = await aiodcp.load(state_dict, "checkpoints")   # readers: no daemon
    async for step in aiodcp.watch("checkpoints"): ...    # follow new commits
    async with aiodcp.hold("checkpoints", step): ...      # keep retention off it

    await ckpt.publish(state_dict, version=step)          # live, same host, no disk
    async for version in aiodcp.follow("checkpoints"):    # readers: newest version
        async with version: await version.copy_into(state_dict)
"""

import importlib as _importlib
import warnings as _warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._parent._checkpointer import AsyncCheckpointer, SaveEvent, SaveHandle, SaveResult
    from ._parent._follow import Follower, Version, follow
    from ._parent._guard import Guard
    from ._parent._load import hold, load
    from ._parent._publish import Publisher
    from ._parent._watch import watch

from ._errors import (
    CheckpointCancelledError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    DaemonDiedError,
    ProtocolError,
    PublisherGoneError,
    SaveFailedError,
    WorkerDiedError,
)

# The names that need torch load on first use (PEP 562), so that `aiodcp ls`,
# `verify` and `gc` start without importing torch.
_LAZY = {
    "AsyncCheckpointer": "._parent._checkpointer",
    "SaveEvent": "._parent._checkpointer",
    "SaveHandle": "._parent._checkpointer",
    "SaveResult": "._parent._checkpointer",
    "Guard": "._parent._guard",
    "Follower": "._parent._follow",
    "Version": "._parent._follow",
    "follow": "._parent._follow",
    "Publisher": "._parent._publish",
    "hold": "._parent._load",
    "load": "._parent._load",
    "watch": "._parent._watch",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aiodcp' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__version__ = "0.1.0"

# In single-process mode aiodcp calls DCP with no_dist=True on purpose; DCP warns
# about that on every call.
_warnings.filterwarnings(
    "ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized"
)

__all__ = [
    "AsyncCheckpointer",
    "CheckpointCancelledError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "DaemonDiedError",
    "Follower",
    "Guard",
    "ProtocolError",
    "Publisher",
    "PublisherGoneError",
    "SaveEvent",
    "SaveFailedError",
    "SaveHandle",
    "SaveResult",
    "Version",
    "WorkerDiedError",
    "__version__",
    "follow",
    "hold",
    "load",
    "watch",
]
