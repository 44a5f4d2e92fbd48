"""Reading checkpoints: resolve a step, hold it, verify it, ``dcp.load`` it -- off the loop."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from . import _storage
from ._dist import Group, broadcast_int, resolve_group
from ._errors import CheckpointError, CheckpointNotFoundError

__all__ = ["hold", "load", "load_checkpoint"]


def _resolve_step(root: Path, step: int | None) -> int:
    if step is None:
        latest = _storage.read_latest(root)
        if latest is None:
            raise CheckpointNotFoundError(f"no committed checkpoint in {root}")
        return latest
    if not (_storage.step_dir(root, step) / _storage.METADATA).is_file():
        raise CheckpointNotFoundError(f"step {step} is not committed in {root}")
    return step


def _load_blocking(state_dict: Any, root: Path, step: int | None, group: Group) -> int:
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    _storage.check_step(step)
    if group.distributed:
        # Every rank must load the same step: rank 0 decides (-1: none found).
        mine: int | None = None
        if group.rank == 0:
            try:
                mine = _resolve_step(root, step)
            except CheckpointNotFoundError:
                mine = -1
        chosen = broadcast_int(group, mine)
        if chosen is None or chosen < 0:
            raise CheckpointNotFoundError(
                f"no committed checkpoint in {root}"
                if step is None
                else f"step {step} is not committed in {root}"
            )
        step = chosen
    else:
        step = _resolve_step(root, step)
    path = _storage.step_dir(root, step)
    lease = _try_hold(root, step)
    try:
        _storage.verify(path)
        try:
            dcp_load(
                state_dict,
                checkpoint_id=path,
                process_group=group.pg if group.distributed else None,
                no_dist=not group.distributed,
            )
        except Exception as exc:
            raise CheckpointError(f"loading {path} failed: {exc}") from exc
    finally:
        if lease is not None:
            _storage.release_hold(root, lease)
    return step


def _try_hold(root: Path, step: int) -> int | None:
    """Lease the step while loading, where the root is writable (read-only roots skip it)."""
    if not os.access(root, os.W_OK):
        return None
    return _storage.hold_step(root, step)


async def load_checkpoint(
    state_dict: Mapping[str, Any], root: Path, *, step: int | None, group: Group | None
) -> int:
    if group is None:
        group = resolve_group(None)
    return await anyio.to_thread.run_sync(_load_blocking, state_dict, root, step, group)


async def load(
    state_dict: Mapping[str, Any],
    root: str | os.PathLike[str],
    *,
    step: int | None = None,
    process_group: Any = None,
) -> int:
    """Load a committed checkpoint into ``state_dict`` in place, without a daemon.

    ``step=None`` loads the latest committed step; returns the step loaded.
    Tensors are loaded in place and ``Stateful`` values get ``load_state_dict``,
    as with ``torch.distributed.checkpoint.load``; resharding works the same way.

    Raises:
        CheckpointNotFoundError: no such committed step.
        CheckpointError: the checkpoint is damaged (the missing or short file is named).
    """
    path = await anyio.to_thread.run_sync(_storage.abspath, root)
    return await load_checkpoint(state_dict, path, step=step, group=resolve_group(process_group))


@contextlib.asynccontextmanager
async def hold(root: str | os.PathLike[str], step: int) -> AsyncIterator[int]:
    """Keep ``step`` safe from retention while the block runs (a reader's lease).

    The lease is a file lock: it ends with the block, or with the process if it
    crashes, so a dead reader never pins a step for ever.

    Raises:
        CheckpointNotFoundError: the step is not committed (or was just deleted).
    """
    path = await anyio.to_thread.run_sync(_storage.abspath, root)
    fd = await anyio.to_thread.run_sync(_storage.hold_step, path, step)
    try:
        yield step
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_storage.release_hold, path, fd)
