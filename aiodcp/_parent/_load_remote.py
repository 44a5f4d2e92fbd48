"""Loading from an object store: download the step, then the local, safe reader.

The first version is the simplest correct one: the chosen step's files are
downloaded into a private temporary directory (concurrently), checked there by
:func:`aiodcp._disk._manifest.verify` (sizes; xxh3_64 with ``verify``), and loaded by
``load_local`` (:func:`aiodcp._parent._load._load_blocking`) -- the same restricted
``.metadata`` unpickler,
``weights_only`` planner, mismatch checks and errors as for a local root. The
step is leased (a lease object) before it is downloaded. It costs local disk
for one step per rank; ranged reads straight from the store are future work.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .._disk import _manifest, _storage
from .._errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError
from ._dist import Group, from_rank0

__all__ = ["download_verified", "load_remote"]

log = logging.getLogger("aiodcp")


def _relabel(exc: CheckpointError, local: Path, url: str) -> CheckpointError:
    """Name the object, not the temporary copy, in an error's message."""
    exc.args = (str(exc).replace(str(local), url),)
    return exc


def download_verified(store: Any, step: int, dest: Path, *, checksums: bool) -> Path:
    """Download ``step`` into ``dest`` and check it; its local directory.

    Raises:
        CheckpointNotFoundError: not committed.
        CheckpointCorruptError: a file differs from what was committed (the object named).
    """
    local: Path = store.download_step(step, dest)
    try:
        _manifest.verify(local, checksums=checksums, step=step)
    except CheckpointError as exc:
        raise _relabel(exc, local, store.step_path(step)) from None
    return local


def _choose(
    store: Any, step: int | None, verify: bool, fallback: bool, dest: Path
) -> tuple[int, Any]:
    """As :func:`aiodcp._parent._load._choose_step`, on a store: lease, download, check."""
    if step is not None:
        lease = store.hold(step, required=False)
        try:
            download_verified(store, step, dest, checksums=verify)
        except BaseException:
            store.release(lease)
            raise
        return step, lease
    tried: set[int] = set()
    failed: list[int] = []
    while True:
        candidates = [s for s in reversed(store.list_steps()) if s not in tried]
        if not candidates:
            break
        candidate = candidates[0]
        tried.add(candidate)
        try:
            lease = store.hold(candidate, required=False)
        except CheckpointNotFoundError:
            continue  # retention deleted it: read the listing again
        try:
            download_verified(store, candidate, dest, checksums=verify)
            return candidate, lease
        except (CheckpointCorruptError, CheckpointNotFoundError) as exc:
            store.release(lease)
            shutil.rmtree(dest / f"step_{candidate}", ignore_errors=True)
            if not fallback:
                raise
            failed.append(candidate)
            log.warning("load: skipping step %d of %s: %s", candidate, store, exc)
        except BaseException:
            store.release(lease)
            raise
    if not failed:
        raise CheckpointNotFoundError(f"no committed checkpoint in {store}")
    raise CheckpointCorruptError(
        f"no step in {store} verifies (checked {len(failed)}: {min(failed)}..{max(failed)})"
    )


def load_remote(
    load_local: Callable[..., int],
    state_dict: Mapping[str, Any],
    store: Any,
    step: int | None,
    group: Group,
    verify: bool,
    fallback: bool,
    weights_only: bool,
) -> int:
    _storage.check_step(step)
    lease: Any = None
    with tempfile.TemporaryDirectory(prefix="aiodcp-load-") as tmp:
        dest = Path(tmp)
        try:
            if group.distributed:
                mine: int | CheckpointError | None = None
                if group.rank == 0:
                    try:
                        mine, lease = _choose(store, step, verify, fallback, dest)
                    except CheckpointError as exc:
                        mine = exc
                chosen = from_rank0(group, mine)
                if isinstance(chosen, CheckpointError):
                    raise chosen
                assert isinstance(chosen, int)
                if group.rank != 0:
                    # a failure shows up as missing files in the check every rank makes
                    # together below (every rank then raises the same error)
                    with contextlib.suppress(CheckpointError, OSError):
                        store.download_step(chosen, dest)
            else:
                chosen, lease = _choose(store, step, verify, fallback, dest)
            try:
                return load_local(state_dict, dest, chosen, group, False, False, weights_only)
            except CheckpointError as exc:
                raise _relabel(exc, dest / f"step_{chosen}", store.step_path(chosen)) from None
        finally:
            if lease is not None:
                store.release(lease)
