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
      .tmp-step_300-<id>/  a save in progress (never listed, removed at next start)
      .trash-...           a step being deleted by retention or overwrite
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

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import pickle
import re
import shutil
import signal
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import xxhash

from ._errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
)

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
    "reconcile",
    "is_committed",
    "is_managed",
    "file_digest",
    "write_manifest",
    "read_manifest",
    "MANIFEST",
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
MANIFEST = ".aiodcp-manifest.json"
MANIFEST_FORMAT = "aiodcp-manifest"
MANIFEST_VERSION = 1
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
    tmp = root / f".{LATEST}.{uuid.uuid4().hex}"
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
    ``rename`` (the old one stays loadable until then) and deleted afterwards.
    """
    if not (tmp / METADATA).is_file():
        raise CheckpointError(f"refusing to commit {tmp}: it has no {METADATA}")
    verify(tmp, checksums=False, step=step)
    if read_manifest(tmp, step=step) is None:
        write_manifest(tmp, step, _hash_files(tmp, _needed_files(tmp)))
    _fsync_tree(tmp)
    final = step_dir(root, step)
    _fault_point("before_rename")
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
    _fault_point("after_rename")
    latest = read_latest(root)
    if latest is not None:
        write_latest(root, latest)
    _fault_point("after_latest")
    append_commit(root, step)
    _fault_point("after_log")
    return final


def _read_latest_file(root: Path) -> int | None:
    try:
        text = (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else -1


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
    (replaced or truncated by hand) is read again from its start.
    """
    try:
        with open(root / COMMITS, "rb") as f:
            if offset > os.fstat(f.fileno()).st_size:
                offset = 0
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
    """Delete committed steps outside the policy, sparing those a reader holds.

    Only steps aiodcp committed (with its manifest) count and are deleted; a plain
    DCP directory under the root is left alone.
    """
    managed = [s for s in list_steps(root) if is_managed(root, s)]
    victims = retention_victims(managed, keep_last, keep_every)
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
_HASH_CHUNK = 8 << 20


def file_digest(path: Path) -> tuple[int, str]:
    """``(size, xxh3_64 hex)`` of a file's bytes, read in 8 MiB chunks."""
    h = xxhash.xxh3_64()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def _hash_files(path: Path, names: Iterable[str]) -> dict[str, tuple[int, str]]:
    return {name: file_digest(path / name) for name in sorted({*names, METADATA})}


def write_manifest(path: Path, step: int, files: dict[str, tuple[int, str]]) -> None:
    """Write ``path/.aiodcp-manifest.json`` (format, step, size and xxh3_64 per file) durably."""
    doc = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "step": step,
        "hash": "xxh3_64",
        "files": {
            name: {"size": size, "xxh3_64": digest} for name, (size, digest) in files.items()
        },
    }
    tmp = path / f"{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MANIFEST)


def _step_of(path: Path) -> int | None:
    m = re.search(r"step_(\d+)", path.name)
    return int(m.group(1)) if m else None


def read_manifest(path: Path, *, step: int | None = None) -> dict[str, tuple[int, str]] | None:
    """``{file: (size, xxh3_64 hex)}`` from the step's manifest; None if it has none
    (a plain DCP directory). Raises :class:`CheckpointCorruptError` if it is unreadable."""
    step = _step_of(path) if step is None else step
    try:
        with open(path / MANIFEST, "rb") as f:
            doc = json.loads(f.read())
        if doc.get("format") != MANIFEST_FORMAT or not isinstance(doc.get("files"), dict):
            raise ValueError("not an aiodcp manifest")
        if doc.get("version") != MANIFEST_VERSION:
            raise ValueError(f"unknown manifest version {doc.get('version')!r}")
        if step is not None and doc.get("step") != step:
            raise ValueError(f"it is the manifest of step {doc.get('step')}")
        return {str(name): (int(e["size"]), str(e["xxh3_64"])) for name, e in doc["files"].items()}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointCorruptError(
            f"step {step}: {MANIFEST} in {path} is unreadable: {exc}", step=step, file=MANIFEST
        ) from None


def _load_metadata(path: Path, step: int | None) -> Any:
    meta_path = path / METADATA
    try:
        with open(meta_path, "rb") as f:
            return pickle.load(f)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{meta_path} is missing") from None
    except Exception as exc:
        raise CheckpointCorruptError(
            f"step {step}: {meta_path} is unreadable: {exc}", step=step, file=METADATA
        ) from exc


def _needed_bytes(metadata: Any, step: int | None) -> dict[str, int]:
    """File -> bytes it must hold, from ``.metadata``; every declared chunk must have a
    storage entry (a writer thread that failed silently leaves some without one)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    storage = getattr(metadata, "storage_data", None) or {}
    for fqn, md in sorted((getattr(metadata, "state_dict_metadata", None) or {}).items()):
        chunks = getattr(md, "chunks", None)
        keys = [(fqn, tuple(c.offsets)) for c in chunks] if chunks is not None else [(fqn, None)]
        for key_fqn, offsets in keys:
            if MetadataIndex(key_fqn, offsets) not in storage:
                where = "" if offsets is None else f" at offset {list(offsets)}"
                raise CheckpointCorruptError(
                    f"step {step}: {METADATA} declares {key_fqn!r}{where} "
                    "but no file holds it (a writer failed)",
                    step=step,
                    file=METADATA,
                )
    needed: dict[str, int] = {}
    for info in storage.values():
        rel = getattr(info, "relative_path", None)
        if rel is None:
            continue
        needed[rel] = max(needed.get(rel, 0), int(info.offset) + int(info.length))
    return needed


def _needed_files(path: Path) -> list[str]:
    return sorted(_needed_bytes(_load_metadata(path, _step_of(path)), _step_of(path)))


def verify(path: Path, *, checksums: bool, step: int | None = None) -> Any:
    """Check a step directory against what was committed; return its DCP metadata.

    Always: the manifest's files have their committed sizes, every chunk
    ``.metadata`` declares has a storage entry, every file it names is there and
    long enough. With ``checksums``: every file in the manifest hashes to its
    committed xxh3_64 (reads the whole step). A directory without aiodcp's
    manifest (plain ``dcp.save``) gets the ``.metadata`` checks only.

    Raises:
        CheckpointCorruptError: naming the step and the first file that differs.
        CheckpointNotFoundError: ``.metadata`` is missing (not a checkpoint).
    """
    step = _step_of(path) if step is None else step
    manifest = read_manifest(path, step=step)
    for name, (size, digest) in sorted((manifest or {}).items()):
        file = path / name
        try:
            actual = file.stat().st_size
        except FileNotFoundError:
            if name == METADATA:
                raise CheckpointNotFoundError(f"{file} is missing") from None
            raise CheckpointCorruptError(
                f"step {step}: checkpoint file {file} is missing", step=step, file=name
            ) from None
        if actual != size:
            how = "truncated" if actual < size else "longer than committed"
            raise CheckpointCorruptError(
                f"step {step}: checkpoint file {file} is {how}: {actual} bytes, committed {size}",
                step=step,
                file=name,
            )
        if checksums and file_digest(file)[1] != digest:
            raise CheckpointCorruptError(
                f"step {step}: checkpoint file {file} is corrupt: its xxh3_64 checksum "
                f"differs from the one committed ({digest})",
                step=step,
                file=name,
            )
    metadata = _load_metadata(path, step)
    for rel, size in sorted(_needed_bytes(metadata, step).items()):
        file = path / rel
        try:
            actual = file.stat().st_size
        except FileNotFoundError:
            raise CheckpointCorruptError(
                f"step {step}: checkpoint file {file} is missing", step=step, file=rel
            ) from None
        if actual < size:
            raise CheckpointCorruptError(
                f"step {step}: checkpoint file {file} is truncated: {actual} bytes, "
                f"metadata needs {size}",
                step=step,
                file=rel,
            )
    return metadata
