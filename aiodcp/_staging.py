"""Staging: state dict -> (skeleton, tensors) -> shared-memory arena -> daemon views.

The parent flattens a state dict into a *skeleton* (the containers, with each
tensor replaced by a slot and each other value pre-serialised exactly as DCP
would write it) and a list of tensors. The tensors are copied into an
:class:`Arena` -- one ``memfd`` mapping, allocated once per layout and reused
across saves -- and the daemon maps the same memory and rebuilds the state
dict from tensors that *view* it. Only the skeleton and the layout cross the
channel; the bytes never do.

Functions here do blocking work (copies, pickling); the parent calls them in a
worker thread, never on the event loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import io
import mmap
import os
import pickle
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ._protocol import TensorSpec

__all__ = [
    "ALIGN",
    "Arena",
    "DTensorSlot",
    "Flat",
    "MeshSpec",
    "PickledLeaf",
    "TensorSlot",
    "flatten",
    "layout_of",
    "map_arena",
    "rebuild",
]

ALIGN = 64


# ------------------------------------------------------------------ skeleton
@dataclass(frozen=True)
class TensorSlot:
    """Placeholder for tensor number ``index`` in the skeleton."""

    index: int


@dataclass(frozen=True)
class MeshSpec:
    device_type: str
    mesh: list[Any]
    dim_names: tuple[str, ...] | None


@dataclass(frozen=True)
class DTensorSlot:
    """Placeholder for a DTensor: its local shard is tensor ``index``."""

    index: int
    mesh: MeshSpec
    placements: tuple[Any, ...]
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class PickledLeaf:
    """A non-tensor value, already serialised with ``torch.save`` as DCP writes it."""

    data: bytes


@dataclass
class Flat:
    """A flattened state dict: the skeleton, its tensors and their key paths."""

    skeleton: dict[str, Any]
    tensors: list[torch.Tensor]
    paths: list[str]
    fingerprint: str = ""
    specs: tuple[TensorSpec, ...] = ()
    nbytes: int = 0


def _path(parent: str, key: object) -> str:
    return f"{parent}[{key!r}]"


def flatten(state_dict: Mapping[str, Any]) -> Flat:
    """Split ``state_dict`` into skeleton and tensors (blocking: runs user ``state_dict()``).

    Top-level values with ``state_dict()``/``load_state_dict()`` (DCP's
    ``Stateful``) are replaced by their state dict, exactly as ``dcp.save`` does.
    Any other non-tensor value is serialised now, so a value that cannot cross
    to the daemon fails here with a :class:`TypeError` naming its key path.
    """
    from torch.distributed.checkpoint.stateful import Stateful

    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, not {type(state_dict).__name__}")
    tensors: list[torch.Tensor] = []
    paths: list[str] = []
    dtensor_cls = _dtensor_class()

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            if dtensor_cls is not None and isinstance(value, dtensor_cls):
                local = value.to_local()  # type: ignore[attr-defined]
                tensors.append(local)
                paths.append(path)
                mesh = value.device_mesh  # type: ignore[attr-defined]
                return DTensorSlot(
                    index=len(tensors) - 1,
                    mesh=MeshSpec(mesh.device_type, mesh.mesh.tolist(), mesh.mesh_dim_names),
                    placements=tuple(value.placements),  # type: ignore[attr-defined]
                    shape=tuple(value.shape),
                    stride=tuple(value.stride()),
                )
            if type(value) is not torch.Tensor and not isinstance(value, torch.nn.Parameter):
                raise TypeError(
                    f"{path}: tensor subclass {type(value).__name__} is not supported "
                    "(plain tensors and DTensor are)"
                )
            if value.is_quantized or value.is_sparse or value.layout != torch.strided:
                raise TypeError(f"{path}: only dense strided tensors can be staged")
            tensors.append(value.detach())
            paths.append(path)
            return TensorSlot(len(tensors) - 1)
        if isinstance(value, Mapping):
            out = {k: walk(v, _path(path, k)) for k, v in value.items()}
            return out if type(value) is dict else _rebuild_container(value, out)
        if isinstance(value, list) and not _dcp_terminal(value):
            return [walk(v, _path(path, i)) for i, v in enumerate(value)]
        # Anything else is one DCP leaf, written as torch.save bytes -- exactly the
        # values DCP's own traversal stops at (tuples, lists holding no tensor/dict).
        buf = io.BytesIO()
        try:
            torch.save(value, buf)
        except Exception as exc:
            raise TypeError(
                f"{path} ({type(value).__name__}) cannot be sent to the checkpoint daemon: {exc}"
            ) from exc
        return PickledLeaf(buf.getvalue())

    skeleton: dict[str, Any] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be str, got {key!r}")
        if isinstance(value, Stateful) and not isinstance(value, torch.Tensor):
            value = value.state_dict()
        skeleton[key] = walk(value, f"state_dict[{key!r}]")
    flat = Flat(skeleton, tensors, paths)
    flat.specs, flat.nbytes, flat.fingerprint = layout_of(flat)
    return flat


def _dcp_terminal(value: Any) -> bool:
    """DCP's rule (``_traverse.traverse_state_dict``) for where traversal stops."""
    if isinstance(value, Mapping):
        return False
    if not isinstance(value, list):
        return True
    for entry in value:
        if isinstance(entry, (Mapping, list)) and not _dcp_terminal(entry):
            return False
        if isinstance(entry, torch.Tensor):
            return False
    return True


def _rebuild_container(original: Mapping[str, Any], items: dict[str, Any]) -> Any:
    try:
        return type(original)(items)  # type: ignore[call-arg]
    except Exception:
        return items


def _dtensor_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def layout_of(flat: Flat) -> tuple[tuple[TensorSpec, ...], int, str]:
    """Pack the tensors at ``ALIGN``-byte offsets; return specs, arena size, fingerprint."""
    specs = []
    offset = 0
    h = hashlib.blake2b(digest_size=16)
    for t, p in zip(flat.tensors, flat.paths, strict=True):
        nbytes = t.numel() * t.element_size()
        specs.append(TensorSpec(offset, nbytes, str(t.dtype), tuple(t.shape)))
        h.update(repr((p, str(t.dtype), tuple(t.shape), nbytes)).encode())
        offset += -(-nbytes // ALIGN) * ALIGN
    return tuple(specs), offset, h.hexdigest()


def dumps_skeleton(skeleton: dict[str, Any]) -> bytes:
    return pickle.dumps(skeleton, protocol=pickle.HIGHEST_PROTOCOL)


# ---------------------------------------------------------------------- arena
class Arena:
    """A shared-memory buffer (an anonymous ``memfd``) the parent stages into.

    It has no name in any filesystem, so nothing is ever left in ``/dev/shm``:
    its memory is freed when the last mapping and descriptor (the parent's and
    the daemon's) are gone, including when either process is killed.
    """

    _ids = iter(range(1, 1 << 62))
    _ids_lock = threading.Lock()

    def __init__(self, nbytes: int, fingerprint: str) -> None:
        with Arena._ids_lock:
            self.arena_id = next(Arena._ids)
        self.nbytes = nbytes
        self.fingerprint = fingerprint
        size = max(nbytes, mmap.PAGESIZE)
        self.fd = os.memfd_create(f"aiodcp-arena-{self.arena_id}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._mm: mmap.mmap | None = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        _populate(self._mm, _MADV_POPULATE_WRITE)
        self.base = torch.frombuffer(self._mm, dtype=torch.uint8)
        self.pinned = False

    def view(self, spec: TensorSpec) -> torch.Tensor:
        dtype = dtype_from_name(spec.dtype)
        raw = self.base[spec.offset : spec.offset + spec.nbytes]
        return raw.view(dtype).view(spec.shape)

    def pin(self) -> None:
        """Page-lock the arena for asynchronous device-to-host copies (CUDA)."""
        if not self.pinned and torch.cuda.is_available():
            cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
            if cudart is None:
                raise RuntimeError("CUDA runtime is unavailable: cannot pin the arena")
            rc = cudart.cudaHostRegister(self.base.data_ptr(), self.base.numel(), 0)
            if int(rc) != 0:
                raise RuntimeError(f"cudaHostRegister failed with {rc}")
            self.pinned = True

    def stage(self, flat: Flat, *, stream: Any = None) -> None:
        """Copy ``flat``'s tensors into the arena (blocking; call from a worker thread).

        CPU tensors are copied directly. CUDA tensors go through a side stream
        into pinned memory with non-blocking copies; the call returns once the
        copies' event has completed, so the caller may then mutate the sources.
        """
        if flat.nbytes > self.nbytes:
            raise ValueError("layout does not fit this arena")
        cuda = [i for i, t in enumerate(flat.tensors) if t.device.type == "cuda"]
        for i, (t, spec) in enumerate(zip(flat.tensors, flat.specs, strict=True)):
            if spec.nbytes and i not in cuda:
                self.view(spec).copy_(t)
        if cuda:
            self._stage_cuda(flat, cuda, stream)

    def _stage_cuda(self, flat: Flat, indices: list[int], stream: Any) -> None:
        self.pin()
        side = torch.cuda.Stream(  # type: ignore[no-untyped-call]
            device=flat.tensors[indices[0]].device
        )
        if stream is not None:
            side.wait_stream(stream)
        with torch.cuda.stream(side):
            for i in indices:
                spec = flat.specs[i]
                if spec.nbytes:
                    self.view(spec).copy_(flat.tensors[i], non_blocking=True)
            done = side.record_event()
        done.synchronize()

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(  # type: ignore[no-untyped-call]
                self.base.data_ptr()
            )
            self.pinned = False
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        del self.base
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view is still alive somewhere; GC unmaps it
                pass


_MADV_POPULATE_READ = 22  # Linux >= 5.14: fault the pages in now, in one call
_MADV_POPULATE_WRITE = 23


def _populate(mm: mmap.mmap, advice: int) -> None:
    """Fault a whole mapping in at once. Through ctypes, which releases the GIL
    (``mmap.madvise`` holds it, and would stall the event loop's thread meanwhile)."""
    global _madvise
    if _madvise is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _madvise = libc.madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    except TypeError:  # a read-only mapping (the daemon's)
        addr = torch.frombuffer(mm, dtype=torch.uint8).data_ptr()
    _madvise(addr, len(mm), advice)  # older kernels: EINVAL; the first touch faults instead


_madvise: Any = None


# --------------------------------------------------------------- daemon side
_DTYPES = {str(v): v for v in vars(torch).values() if isinstance(v, torch.dtype)}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}") from None


def map_arena(fd: int, nbytes: int) -> mmap.mmap:
    """Map an arena the parent sent (read-only: the daemon never writes to it)."""
    mm = mmap.mmap(fd, max(nbytes, mmap.PAGESIZE), prot=mmap.PROT_READ)
    _populate(mm, _MADV_POPULATE_READ)
    return mm


def tensor_in(mm: mmap.mmap, spec: TensorSpec) -> torch.Tensor:
    """A tensor whose storage is exactly ``spec``'s bytes of ``mm`` (no copy).

    Its storage is exactly ``nbytes`` long, so DCP's writer does not clone it.
    """
    dtype = dtype_from_name(spec.dtype)
    numel = 1
    for d in spec.shape:
        numel *= d
    if numel == 0:
        return torch.empty(spec.shape, dtype=dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if numel * itemsize != spec.nbytes or spec.offset + spec.nbytes > len(mm):
        raise ValueError(f"tensor spec {spec} does not fit arena of {len(mm)} bytes")
    return torch.frombuffer(mm, dtype=dtype, count=numel, offset=spec.offset).view(spec.shape)


def rebuild(
    skeleton: dict[str, Any],
    specs: tuple[TensorSpec, ...],
    mm: mmap.mmap,
    mesh_factory: Callable[[MeshSpec], Any] | None = None,
) -> dict[str, Any]:
    """Turn a skeleton back into a state dict whose tensors view ``mm``."""

    def walk(value: Any) -> Any:
        if isinstance(value, TensorSlot):
            return tensor_in(mm, specs[value.index])
        if isinstance(value, DTensorSlot):
            from torch.distributed.tensor import DTensor

            if mesh_factory is None:
                raise ValueError("a DTensor needs a process group in the daemon")
            local = tensor_in(mm, specs[value.index])
            return DTensor.from_local(
                local,
                mesh_factory(value.mesh),
                list(value.placements),
                run_check=False,
                shape=torch.Size(value.shape),
                stride=value.stride,
            )
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, tuple):
            return tuple(walk(v) for v in value)
        return value

    return {k: walk(v) for k, v in skeleton.items()}
