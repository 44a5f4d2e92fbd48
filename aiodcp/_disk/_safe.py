"""Reading what a root holds without running its code.

Anything read from a checkpoint root is untrusted: roots are shared, copied and
downloaded. Two kinds of pickle live there, and neither is unpickled with
arbitrary globals here:

* DCP's ``.metadata``: :func:`load_metadata` reads it with :class:`_MetadataUnpickler`,
  which admits only the classes DCP itself writes there (``_ALLOWED``, plus torch's
  dtypes, layouts and memory formats), then :func:`check_metadata` checks its shape
  (types of every field, file names that stay inside the step directory), so later
  code never meets a surprise. Anything else is a :class:`CheckpointCorruptError`
  naming the file and the forbidden global.
* Non-tensor values (DCP's "bytes" items, a ``torch.save`` each): :func:`load_planner`
  loads them with ``torch.load(weights_only=True)`` -- plain Python values, containers,
  tensors, and whatever the program registered with
  ``torch.serialization.add_safe_globals`` -- unless the caller passed
  ``weights_only=False`` (it trusts the checkpoint: DCP's own behaviour).

:func:`storage_reader` is DCP's ``FileSystemReader`` with ``read_metadata`` going
through :func:`load_metadata` (or handing back metadata already read and checked),
so DCP's load never ``pickle.load``s the metadata itself. Functions here block.
"""

from __future__ import annotations

import functools
import io
import pickle
from pathlib import Path, PurePosixPath
from typing import Any

from .._errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError

__all__ = ["check_metadata", "load_metadata", "load_planner", "storage_reader"]

METADATA = ".metadata"

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        (_DCP_METADATA, "Metadata"),
        (_DCP_METADATA, "TensorStorageMetadata"),
        (_DCP_METADATA, "BytesStorageMetadata"),
        (_DCP_METADATA, "ChunkStorageMetadata"),
        (_DCP_METADATA, "TensorProperties"),
        (_DCP_METADATA, "MetadataIndex"),
        (_DCP_METADATA, "StorageMeta"),
        (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # how torch pickles a torch.layout
        ("collections", "OrderedDict"),
        ("builtins", "complex"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytearray"),
        # StorageMeta.checkpoint_id is the path dcp.save was given
        ("pathlib", "Path"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "PureWindowsPath"),
        ("pathlib._local", "Path"),
        ("pathlib._local", "PosixPath"),
        ("pathlib._local", "PurePosixPath"),
        ("pathlib._local", "PureWindowsPath"),
    }
)


class _Forbidden(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` admitting only the globals DCP's ``.metadata`` holds."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch":
            import torch

            value = getattr(torch, name, None) if isinstance(name, str) else None
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise _Forbidden(f"forbidden global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _Forbidden("a persistent id (DCP's metadata has none)")


def load_metadata(path: Path, step: int | None, *, name: str = METADATA) -> Any:
    """DCP's ``Metadata`` from ``path/.metadata``, admitting only DCP's own types, checked.

    Raises:
        CheckpointNotFoundError: the file is missing.
        CheckpointCorruptError: it holds another global (named), is not a pickle of
            DCP's ``Metadata``, or its fields have the wrong types.
    """
    meta_path = path / name
    try:
        with open(meta_path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{meta_path} is missing") from None
    except _Forbidden as exc:
        raise CheckpointCorruptError(
            f"step {step}: {meta_path} is not DCP metadata: it needs {exc}; "
            "aiodcp never unpickles it (it could run code)",
            step=step,
            file=name,
        ) from None
    except (Exception, RecursionError) as exc:
        raise CheckpointCorruptError(
            f"step {step}: {meta_path} is unreadable: {type(exc).__name__}: {exc}",
            step=step,
            file=name,
        ) from None
    problem = _metadata_problem(metadata)
    if problem is not None:
        raise CheckpointCorruptError(
            f"step {step}: {meta_path} is malformed: {problem}", step=step, file=name
        )
    return metadata


def check_metadata(metadata: Any, path: Path, step: int | None) -> None:
    """Raise :class:`CheckpointCorruptError` unless ``metadata`` has DCP's shape."""
    problem = _metadata_problem(metadata)
    if problem is not None:
        raise CheckpointCorruptError(
            f"step {step}: {path / METADATA} is malformed: {problem}", step=step, file=METADATA
        )


def safe_relative(name: object) -> bool:
    """Whether ``name`` names a file inside the step directory (no absolute path, no ``..``)."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        return False
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts and p.parts != (".",)


def _is_size(value: object) -> bool:
    import torch

    return isinstance(value, torch.Size)


def _metadata_problem(metadata: Any) -> str | None:
    """What is wrong with an unpickled ``Metadata``, or None. Only types DCP writes,
    fields of the types DCP reads, and storage entries naming files inside the step."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    if not isinstance(metadata, Metadata):
        return f"it holds a {type(metadata).__name__}, not DCP's Metadata"
    sdm = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(sdm, dict):
        return "state_dict_metadata is not a dict"
    for fqn, md in sdm.items():
        if not isinstance(fqn, str):
            return f"key {fqn!r} is not a string"
        if isinstance(md, BytesStorageMetadata):
            continue
        if not isinstance(md, TensorStorageMetadata):
            return f"{fqn!r} is described by a {type(md).__name__}"
        props = getattr(md, "properties", None)
        if not isinstance(props, TensorProperties) or not isinstance(
            getattr(props, "dtype", None), torch.dtype
        ):
            return f"{fqn!r} has no tensor properties"
        if not isinstance(getattr(props, "layout", None), torch.layout):
            return f"{fqn!r} has no layout"
        size = getattr(md, "size", None)
        chunks = getattr(md, "chunks", None)
        if not isinstance(size, torch.Size) or not isinstance(chunks, list):
            return f"{fqn!r} has no size or chunk list"
        for c in chunks:
            if not isinstance(c, ChunkStorageMetadata) or not (
                _is_size(getattr(c, "offsets", None))
                and _is_size(getattr(c, "sizes", None))
                and len(c.offsets) == len(c.sizes) == len(size)
            ):
                return f"{fqn!r} has a malformed chunk"
    storage = getattr(metadata, "storage_data", None)
    if storage is None:
        return None
    if not isinstance(storage, dict):
        return "storage_data is not a dict"
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(getattr(index, "fqn", None), str):
            return f"storage key {index!r} is not a MetadataIndex"
        if not isinstance(info, _StorageInfo):
            return f"storage entry of {index.fqn!r} is a {type(info).__name__}"
        rel = getattr(info, "relative_path", None)
        if not safe_relative(rel):
            return f"storage entry of {index.fqn!r} names {rel!r}, outside the step"
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not (type(offset) is int and type(length) is int and offset >= 0 and length >= 0):
            return f"storage entry of {index.fqn!r} has a bad offset or length"
    return None


@functools.cache
def _reader_class() -> type[Any]:
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    class SafeReader(FileSystemReader):
        """DCP's reader whose ``read_metadata`` never unpickles arbitrary globals."""

        def __init__(self, path: Path, metadata: Any, step: int | None) -> None:
            super().__init__(path)
            self._aiodcp_path = Path(path)
            self._aiodcp_metadata = metadata
            self._aiodcp_step = step

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            from torch.distributed.checkpoint.metadata import StorageMeta

            rank = kwargs.get("rank")
            if rank is None and self._aiodcp_metadata is not None:
                metadata = self._aiodcp_metadata
            else:
                name = METADATA if rank is None else f"__{int(rank)}{METADATA}"
                metadata = load_metadata(self._aiodcp_path, self._aiodcp_step, name=name)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def storage_reader(path: Path, *, metadata: Any = None, step: int | None = None) -> Any:
    """A ``FileSystemReader`` for ``path`` that reads ``.metadata`` with :func:`load_metadata`;
    with ``metadata`` (already read and checked) it hands that back instead of reading again."""
    return _reader_class()(path, metadata, step)


@functools.cache
def _planner_class() -> type[Any]:
    import torch
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's load planner loading non-tensor values with ``weights_only=True``."""

        def __init__(self, weights_only: bool, step: int | None) -> None:
            super().__init__()
            self._aiodcp_weights_only = weights_only
            self._aiodcp_step = step

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            if not self._aiodcp_weights_only:
                super().load_bytes(read_item, value)
                return
            fqn = read_item.dest_index.fqn
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                why = next((ln for ln in str(exc).splitlines() if "GLOBAL" in ln), "")
                raise CheckpointError(
                    f"step {self._aiodcp_step}: the value of {fqn!r} is a pickled object "
                    f"that weights_only=True does not admit ({why.strip() or exc}); "
                    "load with weights_only=False only if you trust this checkpoint "
                    "(it can run code), or allow its type with "
                    "torch.serialization.add_safe_globals"
                ) from None
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return SafeLoadPlanner


def load_planner(*, weights_only: bool, step: int | None = None) -> Any:
    """DCP's ``DefaultLoadPlanner`` whose ``load_bytes`` uses ``torch.load(weights_only=...)``."""
    return _planner_class()(weights_only, step)
