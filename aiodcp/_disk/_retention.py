"""What may be deleted from a root, and readers' leases that spare it.

A lease is a shared ``flock`` on a file in ``.holds``: it lives exactly as long as
the holder's descriptor, so a crashed reader never pins a step. Retention deletes
only steps aiodcp committed (with a manifest), renaming each to ``.trash-...``
under the holds lock before removing it; an old step swapped out by an
``overwrite=True`` commit waits in ``.trash-...`` until no reader holds its step.
Leftovers are exactly aiodcp's own temporary names, never another program's.
Functions here block.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from .._errors import CheckpointError, CheckpointNotFoundError
from ._manifest import METADATA
from ._storage import (
    HOLDS_DIR,
    LOCK,
    TRASH_PREFIX,
    fsync_dir,
    is_leftover,
    is_managed,
    list_steps,
    step_dir,
    trash_dir,
)

__all__ = [
    "apply_retention",
    "cleanup_leftovers",
    "hold_step",
    "holds_lock",
    "is_held",
    "leftovers",
    "release_hold",
    "remove_unheld_trash",
    "retention_victims",
]


def hold_step(root: Path, step: int) -> int:
    """Take a lease on ``step``; returns the lease's fd (close it to release).

    The lease is a shared ``flock`` on a file in ``.holds``: it lives exactly as
    long as the holder's descriptor, so a crashed reader never pins a step.
    """
    with holds_lock(root) as holds:
        if not (step_dir(root, step) / METADATA).is_file():
            raise CheckpointNotFoundError(f"step {step} is not committed in {root}")
        lease = holds / f"step_{step}.{os.getpid()}.{uuid.uuid4().hex}"
        fd = os.open(lease, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        return fd


def release_hold(root: Path, fd: int) -> None:
    path = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else None
    os.close(fd)
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def retention_victims(
    steps: Iterable[int], keep_last: int | None, keep_every: int | None
) -> list[int]:
    """Which committed steps retention would delete (pure)."""
    ordered = sorted(steps)
    if keep_last is None:
        return []
    keep = set(ordered[-keep_last:]) if keep_last > 0 else set()
    if keep_every:
        keep |= {s for s in ordered if s % keep_every == 0}
    return [s for s in ordered if s not in keep]


def apply_retention(root: Path, keep_last: int | None, keep_every: int | None) -> list[int]:
    """Delete committed steps outside the policy, sparing those a reader holds.

    Only steps aiodcp committed (with its manifest) count and are deleted; a plain
    DCP directory under the root is left alone.
    """
    managed = [s for s in list_steps(root) if is_managed(root, s)]
    victims = retention_victims(managed, keep_last, keep_every)
    if not victims:
        return []
    doomed: list[tuple[int, Path]] = []
    with holds_lock(root) as holds:
        for step in victims:
            if is_held(holds, step):
                continue
            trash = trash_dir(root, step)
            os.rename(step_dir(root, step), trash)
            doomed.append((step, trash))
    if doomed:
        fsync_dir(root)
    for _, trash in doomed:
        shutil.rmtree(trash, ignore_errors=True)
    return [s for s, _ in doomed]


# ------------------------------------------------------------------- leases
@contextlib.contextmanager
def holds_lock(root: Path) -> Iterator[Path]:
    """The lock every lease change and every deletion of a step takes (exclusive)."""
    holds = root / HOLDS_DIR
    try:
        holds.mkdir(exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        fd = os.open(holds / LOCK, flags, 0o600)
    except FileExistsError:
        raise CheckpointError(f"{holds} is not a directory: readers' leases cannot work") from None
    except OSError as exc:
        raise CheckpointError(f"readers' leases in {holds} are unusable: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield holds
    finally:
        os.close(fd)


def is_held(holds: Path, step: int) -> bool:
    """Whether a live reader holds a lease on ``step`` (call under :func:`holds_lock`);
    leases of dead holders are removed on the way."""
    held = False
    for lease in holds.glob(f"step_{step}.*"):
        try:  # never follow a link, never block on a FIFO; its content is never read
            fd = os.open(lease, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue  # gone, a directory, a link: not a lease aiodcp made
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = True
        else:
            lease.unlink(missing_ok=True)  # its holder is gone
        finally:
            os.close(fd)
    return held


def remove_unheld_trash(root: Path) -> list[Path]:
    """Delete the ``.trash-step_N-*`` directories (old steps swapped out by an
    ``overwrite=True`` commit, or retention's) whose step no reader holds: a reader that
    pinned the old directory before the swap reads it whole until its lease ends."""
    doomed: list[Path] = []
    trash = [p for p in leftovers(root) if p.name.startswith(TRASH_PREFIX)]
    if not trash:
        return []
    if not (root / HOLDS_DIR).is_dir():  # no reader ever leased a step here
        doomed = trash
    else:
        with holds_lock(root) as holds:
            for path in trash:
                m = re.match(rf"^{re.escape(TRASH_PREFIX)}step_(\d+)-", path.name)
                if m and not is_held(holds, int(m.group(1))):
                    doomed.append(path)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def leftovers(root: Path) -> list[Path]:
    """aiodcp's own temporaries in ``root`` (exactly its names: see :data:`LEFTOVER_RE`).

    Another program's ``.tmp-data/`` or ``.latest.json`` is not one of them.
    """
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return [root / name for name in sorted(names) if is_leftover(name)]


def cleanup_leftovers(root: Path) -> list[Path]:
    """Remove aiodcp's temporaries of interrupted saves (call it with no save in flight)
    and old steps no reader holds any more; nothing else in ``root``."""
    removed = remove_unheld_trash(root)
    for path in leftovers(root):
        if path.name.startswith(TRASH_PREFIX):
            continue  # held: a reader is still reading it (see remove_unheld_trash)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
