"""The on-disk layout under ``root``, and everything that changes it atomically.

::

    root/
      step_100/            a committed checkpoint: a plain DCP directory, plus
        .metadata
        __0_0.distcp ...
        .aiodcp-manifest.json  size and xxh3_64 of every file, written before the rename
      step_200/
      step_300/            a plain ``dcp.save`` directory (no manifest): listed and
                           loadable, never deleted by retention
      latest               "200": the newest committed step (atomically replaced)
      .commits             one line per commit, appended after it: what watchers follow
      .tmp-step_300-<32 hex>/    a save in progress (never listed, removed at next start)
      .trash-step_100-<32 hex>/  a step being deleted by retention or overwrite
      .latest.<32 hex>     ``latest`` being replaced
      step_400/            no ``.metadata``: not a checkpoint (an interrupted plain
                           ``dcp.save``): never listed, loaded or deleted, but its
                           step is taken (``save(step=None)`` picks a higher one)
      .holds/              leases of readers (``aiodcp.hold``)
      .lock                held by the writer (rank 0) of a live checkpointer

A checkpoint becomes visible only through ``rename(2)`` of its temporary
directory, after its files were checked against ``.metadata`` and its manifest,
and the files, the manifest and the directory itself fsync'ed; so ``step_N``
existing *means* committed. The disk is the single source of truth: ``latest``
and ``.commits`` are derived from the step directories and :func:`reconcile`
repairs them after a crash between the rename and their update. Functions here
block; callers in the parent run them in worker threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import signal
import socket
import stat
import uuid
from pathlib import Path
from typing import Any

from .._errors import CheckpointError, CheckpointExistsError
from ._manifest import (
    MANIFEST,
    METADATA,
    hash_files,
    needed_files,
    read_manifest,
    verify,
    write_manifest,
)

__all__ = [
    "check_step",
    "exists_error",
    "highest_taken_step",
    "incomplete_steps",
    "is_leftover",
    "new_token",
    "append_commit",
    "read_commits",
    "abspath",
    "HOLDS_DIR",
    "LATEST",
    "WriterLock",
    "commit",
    "list_steps",
    "read_latest",
    "step_dir",
    "tmp_dir",
    "reconcile",
    "is_committed",
    "is_managed",
    "write_latest",
    "fsync_dir",
]

# ASCII digits, no leading zero, at most 18 of them: the name is exactly step_dir()'s
# (``\d`` would match other scripts' digits; a 5,000-digit name would make int() raise)
STEP_RE = re.compile(r"^step_(0|[1-9][0-9]{0,17})$", re.ASCII)
_STEP_LINE = re.compile(rb"^(0|[1-9][0-9]{0,17})$")
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
LATEST = "latest"
# Exactly the names aiodcp makes for its own temporaries in ``root`` (a fresh
# ``new_token()`` each): nothing else there is ever removed, whatever its prefix.
LEFTOVER_RE = re.compile(
    r"^(?:\.tmp-step_\d+-[0-9a-f]{32}|\.trash-step_\d+-[0-9a-f]{32}|\.latest\.[0-9a-f]{32})$"
)
COMMITS = ".commits"
HOLDS_DIR = ".holds"
LOCK = ".lock"
# Test-only hook: the committing process SIGKILLs itself at this point of commit()
# (before_rename, after_rename, after_latest, after_log). Never set it in production.
KILL_AT_ENV = "AIODCP_TEST_KILL_AT"


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


def new_token() -> str:
    """The unique part of a temporary name in ``root`` (32 hex digits, see LEFTOVER_RE)."""
    return uuid.uuid4().hex


def tmp_dir(root: Path, step: int, token: str) -> Path:
    return root / f"{TMP_PREFIX}step_{step}-{token}"


def trash_dir(root: Path, step: int) -> Path:
    return root / f"{TRASH_PREFIX}step_{step}-{new_token()}"


def is_leftover(name: str) -> bool:
    """Whether ``name`` (an entry of ``root``) is one of aiodcp's own temporaries."""
    return LEFTOVER_RE.match(name) is not None


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


def highest_taken_step(root: Path) -> int:
    """The highest N such that ``step_N`` exists in ``root``, committed or not (-1: none).

    ``save(step=None)`` picks a step above it: a ``step_N`` without ``.metadata``
    (a crashed plain ``dcp.save``) is not a checkpoint, but its name is taken.
    """
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return -1
    except NotADirectoryError:
        raise CheckpointError(f"checkpoint root {root} is not a directory") from None
    return max((int(m.group(1)) for n in names if (m := STEP_RE.match(n))), default=-1)


def incomplete_steps(root: Path) -> list[int]:
    """Steps whose ``step_N`` exists but is not a committed checkpoint (no ``.metadata``)."""
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(
        int(m.group(1))
        for n in names
        if (m := STEP_RE.match(n)) and not os.path.isfile(os.path.join(root, n, METADATA))
    )


def exists_error(root: Path, step: int) -> CheckpointExistsError:
    """The error for saving ``step`` (without ``overwrite``) where ``step_<step>`` exists."""
    if is_committed(root, step):
        return CheckpointExistsError(f"step {step} already exists in {root}")
    return CheckpointExistsError(
        f"{step_dir(root, step)} exists but is not a committed checkpoint (it has no "
        f"{METADATA}: an interrupted save by another program?); aiodcp never deletes it. "
        "Remove or move it, save another step (step=None picks a free one), or pass "
        "overwrite=True to replace it"
    )


def read_latest(root: Path) -> int | None:
    """The newest committed step, or None when there is none (from the listing:
    the ``latest`` file is derived from it, never the other way round)."""
    steps = list_steps(root)
    return steps[-1] if steps else None


def is_committed(root: Path, step: int) -> bool:
    """Whether ``step_<step>`` is a committed checkpoint (by aiodcp or plain DCP)."""
    return (step_dir(root, step) / METADATA).is_file()


def is_managed(root: Path, step: int) -> bool:
    """Whether aiodcp committed ``step`` (it carries aiodcp's manifest). Retention and
    ``aiodcp gc`` delete only such steps; a plain ``dcp.save`` directory is never touched."""
    return (step_dir(root, step) / MANIFEST).is_file()


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
    tmp = root / f".{LATEST}.{new_token()}"
    with open(tmp, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    fsync_dir(root)


def _fault_point(point: str) -> None:
    """Test hook: die here, as a crash would, when ``AIODCP_TEST_KILL_AT`` names ``point``."""
    if os.environ.get(KILL_AT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def commit(root: Path, tmp: Path, step: int, *, overwrite: bool) -> Path:
    """Publish ``tmp`` as ``step_<step>`` atomically, after checking it and making it durable.

    In this order: verify (every chunk ``.metadata`` declares has a storage entry,
    every file it names is there and long enough, the manifest's sizes match) ->
    manifest (hashed here if the writer did not leave one) -> fsync files and
    directory -> rename -> fsync ``root`` -> ``latest`` -> ``.commits``. A crash
    after the rename leaves ``latest``/``.commits`` behind: :func:`reconcile`
    catches them up. With ``overwrite`` an existing step is swapped out in one
    ``rename`` (the old one stays loadable until then) into ``.trash-step_N-*``,
    which :func:`remove_unheld_trash` deletes once no reader holds step N.
    """
    if not (tmp / METADATA).is_file():
        raise CheckpointError(f"refusing to commit {tmp}: it has no {METADATA}")
    verify(tmp, checksums=False, step=step)
    if read_manifest(tmp, step=step) is None:
        write_manifest(tmp, step, hash_files(tmp, needed_files(tmp)))
    _fsync_tree(tmp)
    final = step_dir(root, step)
    _fault_point("before_rename")
    if final.exists():
        if not overwrite:
            raise exists_error(root, step)
        if _renameat2(tmp, final, _RENAME_EXCHANGE):
            os.rename(tmp, trash_dir(root, step))  # tmp now holds the old step
        else:  # pragma: no cover - kernels without RENAME_EXCHANGE
            os.rename(final, trash_dir(root, step))
            os.rename(tmp, final)
    else:
        try:
            if not _renameat2(tmp, final, _RENAME_NOREPLACE):  # pragma: no cover
                os.rename(tmp, final)
        except FileExistsError:
            raise exists_error(root, step) from None
    fsync_dir(root)
    _fault_point("after_rename")
    latest = read_latest(root)
    if latest is not None:
        write_latest(root, latest)
    _fault_point("after_latest")
    append_commit(root, step)
    _fault_point("after_log")
    return final


def _read_latest_file(root: Path) -> int | None:
    """The step ``latest`` names; None when there is none, -1 when it is not a step
    (any bytes at all: it is only compared with the listing, never trusted)."""
    try:
        fd = os.open(root / LATEST, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return -1  # a directory someone put there: not a step
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return -1  # a directory, a FIFO, a device: never read from it
    with open(fd, "rb") as f:
        data = f.read(64)
    m = _STEP_LINE.match(data.strip())
    return int(m.group(1)) if m else -1


def reconcile(root: Path) -> list[int]:
    """Make ``latest`` and ``.commits`` agree with the committed step directories.

    A committed step missing from the log (the committer died between the rename
    and the append) is appended, ascending, so watchers see it; ``latest`` is
    rewritten if it is wrong. Idempotent and durable (fsync'ed). Returns the steps
    appended. Call it with no commit in flight (the writer lock held, no daemon).
    """
    steps = list_steps(root)
    logged = read_commits(root, 0)
    seen = set(logged[0]) if logged is not None else set()
    want = steps[-1] if steps else None
    have = _read_latest_file(root)
    if want is not None and have != want:
        write_latest(root, want)
    elif want is None and have is not None:
        (root / LATEST).unlink(missing_ok=True)
        fsync_dir(root)
    missing = [s for s in steps if s not in seen]
    for s in missing:
        append_commit(root, s)
    return missing


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
    still being written is left for the next call. A log shorter than ``offset``
    (replaced or truncated by hand) is read again from its start. Lines that are not
    a step number are skipped.

    Raises:
        CheckpointError: the log is not a regular file (a directory, a FIFO).
    """
    path = root / COMMITS
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"commit log {path} is unreadable: {exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointError(f"commit log {path} is not a regular file")
    with open(fd, "rb") as f:
        if offset > st.st_size:
            offset = 0
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    steps = [int(line) for line in data[:end].split() if _STEP_LINE.match(line)]
    return steps, offset + end


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
            holder = _lock_holder(fd)
            os.close(fd)
            raise CheckpointError(
                f"{self.path.parent} is in use by another live AsyncCheckpointer{holder}; "
                "close that one first (or give this one another root)"
            ) from None
        try:  # who holds it, for the message above (a courtesy: the flock is the lock)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _lock_holder(fd: int) -> str:
    """`` (pid P on HOST)`` from a held lock file, `` (this process, pid P)`` if it is
    ours, or "" when the holder wrote nothing readable."""
    try:
        pid_text, _, host = os.pread(fd, 256, 0).decode().strip().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return ""
    if pid == os.getpid() and host == socket.gethostname():
        return f" (this process, pid {pid})"
    return f" (pid {pid} on {host})" if host else f" (pid {pid})"
