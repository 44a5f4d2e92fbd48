"""Each step's manifest (size and xxh3_64 of every file) and the checks made against it.

A committed step holds ``.aiodcp-manifest.json``, written and fsync'ed before the
step's rename (see :func:`aiodcp._disk._storage.commit`). :func:`verify` checks a step
directory without loading it: every chunk ``.metadata`` declares has its bytes,
every file matches the manifest's size, and with ``checksums`` its xxh3_64.
Plain DCP directories (no manifest) are checked against ``.metadata`` only.
Functions here block.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import xxhash

from .._errors import CheckpointCorruptError, CheckpointNotFoundError
from ._safe import load_metadata, safe_relative

__all__ = [
    "MANIFEST",
    "METADATA",
    "file_digest",
    "hash_files",
    "needed_files",
    "read_manifest",
    "verify",
    "write_manifest",
]

METADATA = ".metadata"
MANIFEST = ".aiodcp-manifest.json"
MANIFEST_FORMAT = "aiodcp-manifest"
MANIFEST_VERSION = 1
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


def hash_files(path: Path, names: Iterable[str]) -> dict[str, tuple[int, str]]:
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
    m = re.search(r"step_([0-9]{1,18})", path.name)
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
        files = {str(name): (int(e["size"]), str(e["xxh3_64"])) for name, e in doc["files"].items()}
        for name, (size, _) in files.items():
            if not safe_relative(name) or size < 0:
                raise ValueError(f"it names {name!r} ({size} bytes), not a file of the step")
        return files
    except FileNotFoundError:
        return None
    except (
        OSError,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        OverflowError,
        RecursionError,
    ) as exc:
        raise CheckpointCorruptError(
            f"step {step}: {MANIFEST} in {path} is unreadable: {exc}", step=step, file=MANIFEST
        ) from None


def _load_metadata(path: Path, step: int | None) -> Any:
    """``.metadata`` through aiodcp's restricted unpickler (never arbitrary globals)."""
    return load_metadata(path, step)


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


def needed_files(path: Path) -> list[str]:
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
        actual = _regular_size(file, step, name)
        if actual is None:
            if name == METADATA:
                raise CheckpointNotFoundError(f"{file} is missing")
            raise CheckpointCorruptError(
                f"step {step}: checkpoint file {file} is missing", step=step, file=name
            )
        if actual != size:
            how = "truncated" if actual < size else "longer than committed"
            raise CheckpointCorruptError(
                f"step {step}: checkpoint file {file} is {how}: {actual} bytes, committed {size}",
                step=step,
                file=name,
            )
        if checksums and _digest(file, step, name) != digest:
            raise CheckpointCorruptError(
                f"step {step}: checkpoint file {file} is corrupt: its xxh3_64 checksum "
                f"differs from the one committed ({digest})",
                step=step,
                file=name,
            )
    metadata = _load_metadata(path, step)
    for rel, size in sorted(_needed_bytes(metadata, step).items()):
        file = path / rel
        actual = _regular_size(file, step, rel)
        if actual is None:
            raise CheckpointCorruptError(
                f"step {step}: checkpoint file {file} is missing", step=step, file=rel
            )
        if actual < size:
            raise CheckpointCorruptError(
                f"step {step}: checkpoint file {file} is truncated: {actual} bytes, "
                f"metadata needs {size}",
                step=step,
                file=rel,
            )
    return metadata


def _regular_size(file: Path, step: int | None, name: str) -> int | None:
    """The size of a regular file; None if it is missing. Anything else a step cannot
    hold (a FIFO, a device, a directory: reading it could hang or never end) is corrupt."""
    try:
        st = file.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointCorruptError(
            f"step {step}: checkpoint file {file} is unreadable: {exc}", step=step, file=name
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointCorruptError(
            f"step {step}: checkpoint file {file} is not a regular file", step=step, file=name
        )
    return st.st_size


def _digest(file: Path, step: int | None, name: str) -> str:
    try:
        return file_digest(file)[1]
    except OSError as exc:  # deleted or replaced meanwhile (not under a lease)
        raise CheckpointCorruptError(
            f"step {step}: checkpoint file {file} could not be read: {exc}", step=step, file=name
        ) from None
