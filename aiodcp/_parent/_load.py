"""Reading checkpoints: choose a step, verify it, hold it, check the state dict fits,
``dcp.load`` it -- off the loop, every failure a typed ``CheckpointError``."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from .._disk import _manifest, _retention, _safe, _storage
from .._disk._roots import open_store
from .._disk._store import LocalStore, Store
from .._errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
)
from ._dist import Group, from_rank0, resolve_group

__all__ = ["hold", "load", "load_checkpoint"]

log = logging.getLogger("aiodcp")


def _choose_step(root: Path, step: int | None, verify: bool, fallback: bool) -> tuple[int, Held]:
    """Which step to load, leased first, then checked (sizes; checksums with ``verify``).
    Rank 0 runs it. Returns the step and its :class:`Held` (lease and pinned
    directory): the caller loads through it and releases it.

    The lease comes before the check so that retention cannot delete the step while
    it is hashed or loaded. With ``step=None`` a step that vanished before it was
    leased (retention, after a newer commit) is skipped and the listing read again,
    newest first. With ``fallback``: the newest step that verifies, each skipped one
    logged with the reason; without ``fallback`` a damaged latest raises.
    """
    if step is not None:
        held = Held(root, step)
        try:
            held.verify(checksums=verify)
        except BaseException:
            held.release()
            raise
        return step, held
    tried: set[int] = set()
    failed: list[int] = []
    while True:
        candidates = [s for s in reversed(_storage.list_steps(root)) if s not in tried]
        if not candidates:
            break
        candidate = candidates[0]
        tried.add(candidate)
        try:
            held = Held(root, candidate)
        except CheckpointNotFoundError:
            log.info("load: step %d of %s vanished before it was leased", candidate, root)
            continue  # retention deleted it: a newer step is there, read the listing again
        try:
            held.verify(checksums=verify)
            return candidate, held
        except (CheckpointCorruptError, CheckpointNotFoundError) as exc:
            held.release()
            if not fallback:
                raise
            failed.append(candidate)
            log.warning("load: skipping step %d of %s: %s", candidate, root, exc)
        except BaseException:
            held.release()
            raise
    if not failed:
        raise CheckpointNotFoundError(f"no committed checkpoint in {root}")
    raise CheckpointCorruptError(
        f"no step in {root} verifies (checked {len(failed)}: {min(failed)}..{max(failed)})"
    )


def _short(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _mismatch(state_dict: Mapping[str, Any], metadata: Any, step: int) -> CheckpointError | None:
    """Compare the state dict's flattened keys and tensor shapes with the checkpoint's.

    Keys the state dict has and the checkpoint lacks, and tensors of another shape,
    are errors; keys only the checkpoint has are not (DCP loads a subset), but are
    named in the message to help spot a rename.
    """
    import torch
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.stateful import Stateful

    try:
        sd = {k: (v.state_dict() if isinstance(v, Stateful) else v) for k, v in state_dict.items()}
        flat, _ = flatten_state_dict(sd)
    except Exception as exc:
        return CheckpointError(f"cannot read the state dict's keys: {type(exc).__name__}: {exc}")
    have = metadata.state_dict_metadata
    missing = sorted(k for k in flat if k not in have)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...] | None]] = {}
    for key, value in flat.items():
        md = have.get(key)
        if md is None or not isinstance(value, torch.Tensor):
            continue
        size = getattr(md, "size", None)  # None: the checkpoint holds a python object
        theirs = None if size is None else tuple(int(d) for d in size)
        if tuple(value.size()) != theirs:
            mismatched[key] = (tuple(value.size()), theirs)
    if not missing and not mismatched:
        return None
    unexpected = sorted(k for k in have if k not in flat)
    parts = []
    if missing:
        parts.append(f"keys missing from the checkpoint: {_short(missing)}")
    if mismatched:
        shapes = [
            f"{k!r} is {tuple(mine)} in the state dict but "
            + ("a python object" if theirs is None else f"{theirs}")
            + " in the checkpoint"
            for k, (mine, theirs) in sorted(mismatched.items())
        ]
        parts.append("shape mismatch: " + "; ".join(shapes[:8]))
    if unexpected:
        parts.append(
            f"keys only in the checkpoint (not loaded, not an error): {_short(unexpected)}"
        )
    return CheckpointMismatchError(
        f"step {step} does not fit the state dict: " + "; ".join(parts),
        step=step,
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        mismatched=mismatched,
    )


def _first_error(group: Group, err: CheckpointError | None) -> CheckpointError | None:
    """The lowest rank's error, word for word the same on every rank (blocking
    collective); it says which rank found it."""
    import torch.distributed as dist

    every: list[Any] = [None] * group.world_size
    dist.all_gather_object(every, err, group=group.pg)
    for rank, e in enumerate(every):
        if e is not None:
            e.args = (f"rank {rank}: {e}",)
            assert isinstance(e, CheckpointError)
            return e
    return None


def _dcp_failure(exc: BaseException) -> str:
    """DCP's ``CheckpointException`` (a BaseException) in one line per failed rank."""
    failures = getattr(exc, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
    parts = []
    for rank, f in sorted(failures.items()):
        inner = f[0] if isinstance(f, tuple) else f
        parts.append(f"rank {rank}: {type(inner).__name__}: {inner}")
    return "; ".join(parts)


def _checkpoint_error(exc: BaseException) -> CheckpointError | None:
    """aiodcp's own error raised inside DCP's load (the safe reader's or planner's),
    unwrapped from DCP's ``CheckpointException``; the lowest rank's."""
    failures = getattr(exc, "failures", None)
    if not isinstance(failures, dict):
        return None
    for rank, f in sorted(failures.items()):
        inner = f[0] if isinstance(f, tuple) else f
        if isinstance(inner, CheckpointError):
            if len(failures) > 1:
                inner.args = (f"rank {rank}: {inner}",)
            return inner
    return None


def _load_blocking(
    state_dict: Any,
    root: Path,
    step: int | None,
    group: Group,
    verify: bool,
    fallback: bool,
    weights_only: bool = True,
) -> int:
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    _storage.check_step(step)
    held: Held | None = None
    err: CheckpointError | None = None
    try:
        if group.distributed:
            # Every rank must load the same step, or raise the same error: rank 0 decides
            # (and holds its lease from before the check until every rank has loaded).
            mine: int | CheckpointError | None = None
            if group.rank == 0:
                try:
                    mine, held = _choose_step(root, step, verify, fallback)
                except CheckpointError as exc:
                    mine = exc
            chosen = from_rank0(group, mine)
            if isinstance(chosen, CheckpointError):
                raise chosen
            assert isinstance(chosen, int)
            step = chosen
        else:
            step, held = _choose_step(root, step, verify, fallback)
        path = _storage.step_dir(root, step)
        try:
            if held is None:
                held = Held(root, step)
            metadata = held.verify(checksums=False)  # cheap; gives the metadata
            err = _mismatch(state_dict, metadata, step)
        except CheckpointError as exc:
            err = exc
        if group.distributed:
            err = _first_error(group, err)
        if err is not None:
            raise err
        assert held is not None
        try:
            dcp_load(
                state_dict,
                # reads .metadata only through aiodcp's restricted unpickler (here: hands
                # back the one just checked), non-tensor values with torch.load(weights_only)
                # and every file through the directory pinned when the step was leased:
                # an overwrite=True commit swapping the step meanwhile cannot mix two
                storage_reader=_safe.storage_reader(held.pinned, metadata=metadata, step=step),
                planner=_safe.load_planner(weights_only=weights_only, step=step),
                process_group=group.pg if group.distributed else None,
                no_dist=not group.distributed,
            )
        except CheckpointException as exc:
            own = _checkpoint_error(exc)
            if own is not None:
                raise own from None
            raise CheckpointError(f"loading {path} failed: {_dcp_failure(exc)}") from None
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"loading {path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if held is not None:
            held.release()
    return step


class Held:
    """A step a reader is reading: leased (where the root is writable; retention and an
    overwrite's clean-up then leave it alone) and *pinned* -- its directory opened, and
    every file read through that descriptor, so a step swapped by an ``overwrite=True``
    commit meanwhile is still read whole, old or new, never a mix of the two.

    Raises:
        CheckpointNotFoundError: the step is not committed (or was just deleted).
    """

    def __init__(self, root: Path, step: int) -> None:
        self.root, self.step = root, step
        self.lease = _retention.hold_step(root, step) if os.access(root, os.W_OK) else None
        try:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
            self.dirfd = os.open(_storage.step_dir(root, step), flags)
        except OSError:
            self.release()
            raise CheckpointNotFoundError(f"step {step} is not committed in {root}") from None
        self.pinned = Path(f"/proc/self/fd/{self.dirfd}")

    def verify(self, *, checksums: bool) -> Any:
        """``_manifest.verify`` of the pinned directory; errors name the step's path."""
        try:
            return _manifest.verify(self.pinned, checksums=checksums, step=self.step)
        except CheckpointError as exc:
            real = str(_storage.step_dir(self.root, self.step))
            exc.args = tuple(
                a.replace(str(self.pinned), real) if isinstance(a, str) else a for a in exc.args
            )
            raise

    def release(self) -> None:
        if getattr(self, "dirfd", -1) >= 0:
            os.close(self.dirfd)
            self.dirfd = -1
        if self.lease is not None:
            _retention.release_hold(self.root, self.lease)
            self.lease = None


async def load_checkpoint(
    state_dict: Mapping[str, Any],
    root: Path | Store,
    *,
    step: int | None,
    group: Group | None,
    verify: bool = False,
    fallback: bool = False,
    weights_only: bool = True,
) -> int:
    if group is None:
        group = resolve_group(None)
    if isinstance(root, Store) and not isinstance(root, LocalStore):
        from ._load_remote import load_remote

        return await anyio.to_thread.run_sync(
            load_remote,
            _load_blocking,
            state_dict,
            root,
            step,
            group,
            verify,
            fallback,
            weights_only,
        )
    if isinstance(root, LocalStore):
        root = root.root
    return await anyio.to_thread.run_sync(
        _load_blocking, state_dict, root, step, group, verify, fallback, weights_only
    )


async def load(
    state_dict: Mapping[str, Any],
    root: str | os.PathLike[str],
    *,
    step: int | None = None,
    process_group: Any = None,
    verify: bool = False,
    fallback: bool = False,
    weights_only: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> int:
    """Load a committed checkpoint into ``state_dict`` in place, without a daemon.

    ``step=None`` loads the latest committed step; returns the step loaded.
    Tensors are loaded in place and ``Stateful`` values get ``load_state_dict``,
    as with ``torch.distributed.checkpoint.load``; resharding works the same way.
    Every key of ``state_dict`` must be in the checkpoint with the same shape;
    the checkpoint may hold more keys (they are not loaded), as in DCP.

    The step's files are always checked against its ``.metadata`` and manifest
    (present, committed sizes); ``verify=True`` also checks every file's xxh3_64
    checksum (reads the whole step once more). ``fallback=True`` with
    ``step=None`` loads the newest step that passes those checks, logging each
    one it skips (logger ``aiodcp``). With several ranks, rank 0 decides the step
    and every rank raises the same error. The step is leased (:func:`hold`) before
    it is checked, so retention cannot delete it meanwhile.

    Reading never runs code from the checkpoint: ``.metadata`` is unpickled
    admitting only the types DCP writes there, and non-tensor values with
    ``torch.load(weights_only=True)`` (plain Python values, containers, tensors,
    and the types registered with ``torch.serialization.add_safe_globals``).
    ``weights_only=False`` unpickles non-tensor values of any type, as DCP's own
    load does: only for checkpoints you trust, since unpickling can run code.

    Raises:
        CheckpointNotFoundError: no such committed step.
        CheckpointCorruptError: the step's files differ from what was committed
            (step and file named); with ``fallback``, no step verifies.
        CheckpointMismatchError: keys of ``state_dict`` the checkpoint lacks, or
            tensors of another shape (all named).
        CheckpointError: DCP's load failed (its error, in one line per rank); a
            non-tensor value needs a type ``weights_only=True`` does not admit.
    """
    store = await anyio.to_thread.run_sync(open_store, root, storage_options)
    try:
        return await load_checkpoint(
            state_dict,
            store,
            step=step,
            group=resolve_group(process_group),
            verify=verify,
            fallback=fallback,
            weights_only=weights_only,
        )
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(store.close)


@contextlib.asynccontextmanager
async def hold(
    root: str | os.PathLike[str],
    step: int,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> AsyncIterator[int]:
    """Keep ``step`` safe from retention while the block runs (a reader's lease).

    The lease is a file lock: it ends with the block, or with the process if it
    crashes, so a dead reader never pins a step for ever.

    On an ``s3://`` root the lease is an object renewed while the block runs; one
    whose holder died lapses after ``lease_ttl`` seconds.

    Raises:
        CheckpointNotFoundError: the step is not committed (or was just deleted).
    """
    store = await anyio.to_thread.run_sync(open_store, root, storage_options)
    try:
        lease = await anyio.to_thread.run_sync(store.hold, step)
        try:
            yield step
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(store.release, lease)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(store.close)
