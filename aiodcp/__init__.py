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

import warnings as _warnings

from ._checkpointer import AsyncCheckpointer, SaveEvent, SaveHandle, SaveResult
from ._errors import (
    CheckpointCancelledError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ProtocolError,
    PublisherGoneError,
    SaveFailedError,
    WorkerDiedError,
)
from ._follow import Follower, Version, follow
from ._load import hold, load
from ._publish import Publisher
from ._watch import watch

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
    "Follower",
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
