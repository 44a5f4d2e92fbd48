"""DCP's per-tensor ``torch.save`` records, written without ``torch.save``'s per-call cost.

DCP's file format stores every tensor as its own ``torch.save`` record (a small zip
archive: the pickled tensor, a few constant entries, the storage's bytes, a
serialization id). ``torch.save`` takes ~250-350 us per call whatever the size, which
at 100,000 small tensors is most of a save. For tensors of one kind (dtype, shape,
stride, storage size) the record's bytes are the same around the data — given
CRC-32 off, as in aiodcp's writer threads (the serialization id is then derived from
the record's names and sizes only). So the first record of each kind is made by
``torch.save`` and kept as a template (the bytes before the data and after it); the
next ones are the prefix, the tensor's storage bytes and the suffix: byte for byte
what ``torch.save`` writes.

Only plain dense CPU tensors up to :data:`MAX_TEMPLATED` bytes are templated (above
that the call's cost is noise beside the data, and a template would copy the data
once more), of at most ``_MAX_KINDS`` kinds; anything else goes through
``torch.save``. The tensors are the writer's detached views (no Python attributes,
which ``torch.save`` would pickle and a template would not).
"""

from __future__ import annotations

import ctypes
import io
import struct
import zipfile
from typing import Any

import torch
from torch.utils.serialization import config as _config

__all__ = ["MAX_TEMPLATED", "write_tensor"]

MAX_TEMPLATED = 1 << 20
_MAX_KINDS = 4096

_Key = tuple[Any, ...]
_templates: dict[_Key, tuple[bytes, bytes] | None] = {}  # one store per kind: atomic


def write_tensor(tensor: torch.Tensor, stream: Any) -> None:
    """``torch.save(tensor, stream)`` for a CPU tensor whose storage is exactly its
    bytes (the writer clones any other); ``stream`` takes bytes-likes via ``write``."""
    if not _templatable(tensor):
        torch.save(tensor, stream)
        return
    storage = tensor.untyped_storage()
    key = (
        tensor.dtype,
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.storage_offset(),
        storage.nbytes(),
        _config.save.storage_alignment,  # per thread from torch 2.13, like the CRC option
    )
    if key not in _templates:
        if len(_templates) < _MAX_KINDS:
            _learn(key, tensor, stream)
        else:  # a full table keeps its kinds (clearing it would miss on every record)
            torch.save(tensor, stream)
        return
    template = _templates[key]
    if template is None:  # this kind's record could not be taken apart
        torch.save(tensor, stream)
        return
    prefix, suffix = template
    stream.write(prefix)
    if storage.nbytes():
        stream.write(_bytes_of(storage))
    stream.write(suffix)


def _bytes_of(storage: torch.UntypedStorage) -> memoryview:
    """The storage's bytes, zero-copy, without numpy (a plain install has none): a
    ctypes array over its data; valid while the caller holds the storage."""
    n = storage.nbytes()
    return memoryview((ctypes.c_ubyte * n).from_address(storage.data_ptr())).cast("B")


def _templatable(t: torch.Tensor) -> bool:
    return (
        not torch.serialization.get_crc32_options()  # else each record has its own CRC
        and type(t) is torch.Tensor
        and t.device.type == "cpu"
        and t.layout == torch.strided
        and not t.is_quantized
        and not t.is_conj()
        and not t.is_neg()
        and not t.requires_grad
        and t.untyped_storage().nbytes() <= MAX_TEMPLATED
    )


def _learn(key: _Key, tensor: torch.Tensor, stream: Any) -> None:
    """``torch.save`` this tensor into memory, write those bytes, and keep them as the
    template of its kind when they take apart as expected."""
    buf = io.BytesIO()
    torch.save(tensor, buf)
    raw = buf.getvalue()
    stream.write(raw)
    _templates[key] = _split(raw, tensor.untyped_storage().nbytes())


def _split(raw: bytes, nbytes: int) -> tuple[bytes, bytes] | None:
    """(prefix, suffix) around the storage's bytes of a one-storage record, or None."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            infos = {i.filename.split("/", 1)[-1]: i for i in zf.infolist()}
    except zipfile.BadZipFile:
        return None
    data = infos.get("data/0")
    if data is None or "data/1" in infos or data.compress_type or data.file_size != nbytes:
        return None
    start = _payload_at(raw, data.header_offset)
    return raw[:start], raw[start + nbytes :]


def _payload_at(raw: bytes, header: int) -> int:
    """Offset of an entry's bytes: after its 30-byte local header, name and extra."""
    name_len, extra_len = struct.unpack_from("<HH", raw, header + 26)
    return int(header) + 30 + int(name_len) + int(extra_len)
