"""The on-disk layout under ``root``, and everything that changes it atomically.

::

    root/
      step_100/            a committed checkpoint: a plain DCP directory
        .metadata
        __0_0.distcp ...
      step_200/
      latest               "200": the newest committed step (atomically replaced)
      .commits             one line per commit, appended after it: what watchers follow
      .tmp-step_300-<id>/  a save in progress (never listed, removed at next start)
      .trash-...           a step being deleted by retention or overwrite
      .holds/              leases of readers (``aiodcp.hold``)
      .lock                held by the writer (rank 0) of a live checkpointer

A checkpoint becomes visible only through ``rename(2)`` of its temporary
directory, after its files, ``.metadata`` and the directory itself are
fsync'ed; so ``step_N`` existing *means* committed. Functions here block;
callers in the parent run them in worker threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import pickle
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ._errors import CheckpointError, CheckpointExistsError, CheckpointNotFoundError

__all__ = [
    "check_step",
    "append_commit",
    "read_commits",
    "abspath",
    "HOLDS_DIR",
    "LATEST",
    "WriterLock",
    "apply_retention",
    "cleanup_leftovers",
    "commit",
    "hold_step",
    "list_steps",
    "read_latest",
    "retention_victims",
    "step_dir",
    "tmp_dir",
    "verify",
    "release_hold",
    "write_latest",
    "fsync_dir",
    "METADATA",
]

STEP_RE = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
LATEST = "latest"
COMMITS = ".commits"
HOLDS_DIR = ".holds"
LOCK = ".lock"
METADATA = ".metadata"


def abspath(root: str | os.PathLike[str]) -> Path:
    """``root`` made absolute (reads the working directory: call it off the loop)."""
    return Path(os.path.abspath(root))


def check_step(step: object) -> None:
    """A step is a non-negative int (or None: "choose for me")."""
    if step is None:
        return
    if not isinstance(step, int) or isinstance(step, bool):
        raise TypeError(f"step must be an int or None, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step}"


def tmp_dir(root: Path, step: int, token: str) -> Path:
    return root / f"{TMP_PREFIX}step_{step}-{token}"


def list_steps(root: Path) -> list[int]:
    """Committed steps under ``root``, ascending (never a temporary directory)."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise CheckpointError(f"checkpoint root {root} is not a directory") from None
    steps = []
    for name in names:
        m = STEP_RE.match(name)
        if m and os.path.isfile(os.path.join(root, name, METADATA)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def read_latest(root: Path) -> int | None:
    """The newest committed step, or None when there is none."""
    steps = list_steps(root)
    return steps[-1] if steps else None


# ------------------------------------------------------------------- durability
def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and the directory itself."""
    for entry in os.scandir(path):
        if entry.is_file(follow_symlinks=False):
            fd = os.open(entry.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(path)


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_libc: Any = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(2)``; False where the kernel/filesystem/libc lacks it."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def write_latest(root: Path, step: int) -> None:
    tmp = root / f".{LATEST}.{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    fsync_dir(root)


def commit(root: Path, tmp: Path, step: int, *, overwrite: bool) -> Path:
    """Publish ``tmp`` as ``step_<step>`` atomically, after making it durable.

    With ``overwrite`` an existing step is swapped out in one ``rename`` (the old
    one stays loadable until then) and deleted afterwards.
    """
    if not (tmp / METADATA).is_file():
        raise CheckpointError(f"refusing to commit {tmp}: it has no {METADATA}")
    _fsync_tree(tmp)
    final = step_dir(root, step)
    if final.exists():
        if not overwrite:
            raise CheckpointExistsError(f"step {step} already exists in {root}")
        if _renameat2(tmp, final, _RENAME_EXCHANGE):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old step
        else:  # pragma: no cover - kernels without RENAME_EXCHANGE
            trash = root / f"{TRASH_PREFIX}step_{step}-{uuid.uuid4().hex}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
    else:
        try:
            if not _renameat2(tmp, final, _RENAME_NOREPLACE):  # pragma: no cover
                os.rename(tmp, final)
        except FileExistsError:
            raise CheckpointExistsError(f"step {step} already exists in {root}") from None
    fsync_dir(root)
    latest = read_latest(root)
    if latest is not None:
        write_latest(root, latest)
    append_commit(root, step)
    return final


def append_commit(root: Path, step: int) -> None:
    """Record a commit in the log watchers read (one write of a whole line)."""
    fd = os.open(root / COMMITS, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, f"{step}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_commits(root: Path, offset: int) -> tuple[list[int], int] | None:
    """Steps committed since byte ``offset`` of the log, and the new offset.

    None when the root has no log (written by plain DCP or an older aiodcp). A line
    still being written is left for the next call.
    """
    try:
        with open(root / COMMITS, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return None
    end = data.rfind(b"\n") + 1
    steps = [int(line) for line in data[:end].split() if line.isdigit()]
    return steps, offset + end


def cleanup_leftovers(root: Path) -> list[Path]:
    """Remove temporary and trash directories of interrupted saves. Committed steps stay."""
    removed = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name.startswith((TMP_PREFIX, TRASH_PREFIX)) or (
            entry.name.startswith(f".{LATEST}.") and entry.is_file()
        ):
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class WriterLock:
    """An exclusive ``flock`` on ``root/.lock``: one live writer per root.

    The kernel drops it when the holder dies, so a crashed trainer never
    leaves the root locked.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK
        self.fd = -1

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointError(
                f"{self.path.parent} is in use by another live AsyncCheckpointer"
            ) from None
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------- holds, retention
@contextlib.contextmanager
def _holds_lock(root: Path) -> Iterator[Path]:
    holds = root / HOLDS_DIR
    holds.mkdir(exist_ok=True)
    fd = os.open(holds / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield holds
    finally:
        os.close(fd)


def hold_step(root: Path, step: int) -> int:
    """Take a lease on ``step``; returns the lease's fd (close it to release).

    The lease is a shared ``flock`` on a file in ``.holds``: it lives exactly as
    long as the holder's descriptor, so a crashed reader never pins a step.
    """
    with _holds_lock(root) as holds:
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


def _is_held(holds: Path, step: int) -> bool:
    held = False
    for lease in holds.glob(f"step_{step}.*"):
        try:
            fd = os.open(lease, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = True
        else:
            lease.unlink(missing_ok=True)  # its holder is gone
        finally:
            os.close(fd)
    return held


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
    """Delete committed steps outside the policy, sparing those a reader holds."""
    victims = retention_victims(list_steps(root), keep_last, keep_every)
    if not victims:
        return []
    doomed: list[tuple[int, Path]] = []
    with _holds_lock(root) as holds:
        for step in victims:
            if _is_held(holds, step):
                continue
            trash = root / f"{TRASH_PREFIX}step_{step}-{uuid.uuid4().hex}"
            os.rename(step_dir(root, step), trash)
            doomed.append((step, trash))
    if doomed:
        fsync_dir(root)
    for _, trash in doomed:
        shutil.rmtree(trash, ignore_errors=True)
    return [s for s, _ in doomed]


# ----------------------------------------------------------------- verification
def verify(path: Path) -> Any:
    """Check that every file ``.metadata`` refers to is there and long enough.

    Returns the DCP metadata. Raises :class:`CheckpointError` naming the first
    missing or truncated file: a damaged checkpoint never loads silently.
    """
    meta_path = path / METADATA
    try:
        with open(meta_path, "rb") as f:
            metadata = pickle.load(f)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{meta_path} is missing") from None
    except Exception as exc:
        raise CheckpointError(f"{meta_path} is unreadable: {exc}") from exc
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is None:
            continue
        needed[rel] = max(needed.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(needed.items()):
        file = path / rel
        try:
            actual = file.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {file} is missing") from None
        if actual < size:
            raise CheckpointError(
                f"checkpoint file {file} is truncated: {actual} bytes, metadata needs {size}"
            )
    return metadata


# ------------------------------------------------------------ derived state repair
def is_committed(root: Path, step: int) -> bool:
    """Whether ``step`` is committed (its directory, with ``.metadata``, is there)."""
    return (step_dir(root, step) / METADATA).is_file()


def reconcile(root: Path) -> list[int]:
    """Make ``latest`` and ``.commits`` agree with the committed directories.

    The rename is the commit point; everything else is derived. A committed step
    missing from the commit log (the writer died between rename and append) is
    appended, ascending; ``latest`` is rewritten if wrong. Returns the appended steps.
    """
    steps = list_steps(root)
    logged = read_commits(root, 0)
    seen = set(logged[0]) if logged is not None else set()
    missing = [s for s in steps if s not in seen]
    for s in missing:
        append_commit(root, s)
    if steps:
        try:
            current = int((root / LATEST).read_text().strip())
        except (OSError, ValueError):
            current = None
        if current != steps[-1]:
            write_latest(root, steps[-1])
    return missing
