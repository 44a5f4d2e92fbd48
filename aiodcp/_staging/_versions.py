"""Sealed versions: the shared memory of live publication, both sides of it.

A version is a new anonymous memfd made with ``MFD_ALLOW_SEALING``: the tensors at
the offsets of :func:`aiodcp._staging._staging.specs_of`, then, page-aligned, a *header*
(the specs and the skeleton). The publisher fills it through a writable mapping,
unmaps that, and seals it (``F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW |
F_SEAL_SEAL``) before any reader can learn its number. A reader refuses a
descriptor without those seals, so what it maps can never change under it: a torn
or half-written version is impossible by construction, not merely unlikely.

The header is a pickle of builtins only (dicts, lists, tuples, ints, strings,
bytes), read back with an unpickler that admits no global but ``dict`` and
``list``; non-tensor values inside are ``torch.save`` bytes, loaded with
``torch.load(weights_only=True)``. Functions here block (copies, page faults);
callers run them in worker threads.
"""

from __future__ import annotations

import ctypes
import fcntl
import io
import mmap
import os
import pickle
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .._errors import CheckpointError, CheckpointMismatchError
from ._arena import Arena, _libc, _madvise_addr, dtype_from_name
from ._staging import (
    DTensorSlot,
    Flat,
    PickledLeaf,
    TensorSpec,
    _is_stateful,
    _Items,
    _List,
    flatten,
    gc_paused,
    quick_switching,
    specs_of,
)

__all__ = ["SEALS", "Mapped", "Sealed", "Spare", "copy_into", "seal_from_arena", "seal_from_state"]

SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
_MADV_POPULATE_READ = 22
_MADV_POPULATE_WRITE = 23
_COPY_CHUNK = 512
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_FIXED = 0x10


@dataclass
class Sealed:
    """A filled and sealed version, as the publisher holds it (it owns ``fd``)."""

    fd: int
    nbytes: int
    header_offset: int
    header_nbytes: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ------------------------------------------------------------ publisher side
def _public(value: Any) -> Any:
    """A skeleton in builtins only: tensor slots are ints (a DTensor: its local shard),
    non-tensor values their ``torch.save`` bytes, every mapping a dict."""
    if type(value) is int:
        return value
    if isinstance(value, DTensorSlot):
        return value.index
    if isinstance(value, PickledLeaf):
        return value.data
    if isinstance(value, Mapping):
        out: dict[Any, Any] = _Items() if len(value) > 1024 else {}
        for k, v in value.items():
            out[k] = _public(v)
        return out
    if isinstance(value, list):
        items: list[Any] = _List() if len(value) > 1024 else []
        items.extend(_public(v) for v in value)
        return items
    raise TypeError(f"unexpected skeleton value {type(value).__name__}")  # pragma: no cover


def _header(specs: tuple[TensorSpec, ...], skeleton: dict[str, Any]) -> bytes:
    table = _List((s.offset, s.nbytes, s.dtype, s.shape) for s in specs)
    return pickle.dumps((table, _public(skeleton)), protocol=pickle.HIGHEST_PROTOCOL)


class Spare:
    """One new memfd made ahead of time, mapped and pre-faulted (any thread may use it).

    Allocating and zeroing fresh pages costs about as much as the copy itself; with a
    spare ready, a publish only copies and seals. It costs one version of memory while
    it waits; the publisher makes the next one after each publish.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready: tuple[int, int, int, int, int] | None = None  # fd, addr, size, hoff, n
        self.closed = False

    def _fits(self, nbytes: int, header_nbytes: int) -> bool:
        ready = self._ready
        return ready is not None and ready[4] == nbytes and ready[2] - ready[3] >= header_nbytes

    def take(self, nbytes: int, header_nbytes: int) -> tuple[int, int, int, int] | None:
        with self._lock:
            if not self._fits(nbytes, header_nbytes):
                return None
            ready, self._ready = self._ready, None
        assert ready is not None
        return ready[:4]

    def make(self, nbytes: int, header_nbytes: int) -> None:
        """Blocking: make a spare for versions of ``nbytes`` (and a header of about
        ``header_nbytes``) now, unless one that fits is ready. One that does not fit
        (the state changed size) is dropped first: it would never be taken."""
        with self._lock:
            if self.closed or self._fits(nbytes, header_nbytes):
                return
            stale, self._ready = self._ready, None
        if stale is not None:
            _drop(*stale[:3])
        made = _create(nbytes, bytes(max(2 * header_nbytes, 4096)), "aiodcp-version")
        with self._lock:
            if self._ready is None and not self.closed:
                self._ready = (*made, nbytes)
                return
        _drop(*made)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            ready, self._ready = self._ready, None
        if ready is not None:
            _drop(*ready[:3])


def _drop(fd: int, addr: int, size: int, *_: int) -> None:
    _libc().munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    os.close(fd)


def _create(
    nbytes: int, header: bytes, name: str, spare: Spare | None = None
) -> tuple[int, int, int, int]:
    """A memfd of ``nbytes`` + header, header written, mapped writable and pre-faulted
    (``spare``'s, when it has one that fits). Returns (fd, address, size, header offset)."""
    ready = spare.take(nbytes, len(header)) if spare is not None else None
    if ready is not None:
        fd, addr, size, header_offset = ready
        os.pwrite(fd, header, header_offset)
        return ready
    header_offset = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    size = max(header_offset + len(header), mmap.PAGESIZE)
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, header, header_offset)
        libc = _libc()
        addr = libc.mmap(None, size, _PROT_RW, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of a new version failed: {os.strerror(err)}")
    except BaseException:
        os.close(fd)
        raise
    if nbytes:
        _madvise_addr(addr, nbytes, _MADV_POPULATE_WRITE)
    return fd, addr, size, header_offset


def _seal(fd: int, addr: int, size: int) -> None:
    """Unmap the writable mapping (F_SEAL_WRITE refuses while one exists), then seal."""
    _libc().munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)


def _base(addr: int, nbytes: int) -> torch.Tensor:
    buf = (ctypes.c_char * max(nbytes, 1)).from_address(addr)
    return torch.frombuffer(buf, dtype=torch.uint8)[:nbytes]


def seal_from_state(
    state_dict: Mapping[str, Any], version: int, spare: Spare | None = None
) -> Sealed:
    """Flatten ``state_dict`` and copy it into a new sealed version (blocking)."""
    with gc_paused(), quick_switching():
        flat = flatten(state_dict)
        specs, nbytes = specs_of(flat.layout)
        header = _header(specs, flat.skeleton)
        fd, addr, size, header_offset = _create(nbytes, header, f"aiodcp-version-{version}", spare)
        try:
            base = _base(addr, nbytes)
            dst: list[torch.Tensor] = []
            src: list[torch.Tensor] = []
            with torch.no_grad():
                for spec, t in zip(specs, flat.tensors, strict=True):
                    if not spec.nbytes:
                        continue
                    view = base[spec.offset : spec.offset + spec.nbytes]
                    view = view.view(dtype_from_name(spec.dtype)).view(spec.shape)
                    if t.device.type == "cpu":
                        dst.append(view)
                        src.append(t)
                    else:
                        view.copy_(t)  # synchronous device-to-host copy
                for lo in range(0, len(src), _COPY_CHUNK):
                    torch._foreach_copy_(dst[lo : lo + _COPY_CHUNK], src[lo : lo + _COPY_CHUNK])
            del base, dst, src
            _seal(fd, addr, size)
        except BaseException:
            os.close(fd)
            raise
    return Sealed(fd, nbytes, header_offset, len(header))


def seal_from_arena(arena: Arena, flat: Flat, version: int, spare: Spare | None = None) -> Sealed:
    """Copy a staged arena's tensor bytes into a new sealed version (blocking)."""
    header = _header(arena.specs, flat.skeleton)
    nbytes = arena.nbytes
    fd, addr, size, header_offset = _create(nbytes, header, f"aiodcp-version-{version}", spare)
    try:
        if nbytes:
            with torch.no_grad():
                _base(addr, nbytes).copy_(arena.base[:nbytes])
        _seal(fd, addr, size)
    except BaseException:
        os.close(fd)
        raise
    return Sealed(fd, nbytes, header_offset, len(header))


# ---------------------------------------------------------------- reader side
class _HeaderUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in ("dict", "list"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a version header may not name {module}.{name}")


class Mapped:
    """A reader's copy-on-write mapping of one sealed version, with its tensor views.

    The mapping is ``MAP_PRIVATE``: the views share the publisher's pages for reading,
    and a write into one (a mistake, but not a crash) changes only this process's copy.
    :meth:`unmap` replaces the whole range with anonymous zero pages at once
    (``MAP_FIXED``), so the version's memory is given back whatever views the caller
    kept: a view used after the lease ended reads zeros instead of faulting.
    """

    def __init__(self, fd: int, nbytes: int, header_offset: int, header_nbytes: int) -> None:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if seals & SEALS != SEALS:
            raise CheckpointError(
                f"a published version is not sealed (seals {seals:#x}): refusing to map it"
            )
        size = os.fstat(fd).st_size
        if nbytes > header_offset or header_offset + header_nbytes > size:
            raise CheckpointError(
                f"a published version's header ({header_offset}+{header_nbytes}) does not "
                f"fit its memfd of {size} bytes"
            )
        self.size = size
        self.nbytes = nbytes
        # An anonymous placeholder owns the address range (Python's mmap of a file would
        # keep a dup of the descriptor open as long as a view lives); the version is
        # mapped over it.
        self._mm: mmap.mmap | None = mmap.mmap(-1, size, mmap.MAP_PRIVATE, _PROT_RW)
        try:
            base = torch.frombuffer(self._mm, dtype=torch.uint8)
            self._addr = base.data_ptr()
            addr = _libc().mmap(
                ctypes.c_void_p(self._addr), size, _PROT_RW, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0
            )
            if addr != self._addr:
                err = ctypes.get_errno()
                raise OSError(err, f"mmap of a version failed: {os.strerror(err)}")
            header = self._mm[header_offset : header_offset + header_nbytes]
            table, self.skeleton = _HeaderUnpickler(io.BytesIO(header)).load()
            if nbytes:
                _madvise_addr(self._addr, nbytes, _MADV_POPULATE_READ)
            self.views: list[torch.Tensor] | None = []
            for offset, n, dtype_name, shape in table:
                dtype = dtype_from_name(dtype_name)
                numel = 1
                for d in shape:
                    numel *= d
                if numel * dtype.itemsize != n or offset < 0 or offset + n > nbytes:
                    raise CheckpointError(f"a published tensor ({offset}+{n}) is malformed")
                self.views.append(base[offset : offset + n].view(dtype).view(shape))
            del base
        except BaseException:
            self.unmap()
            raise

    def unmap(self) -> None:
        """Give the version's pages back now (idempotent); see the class docstring."""
        mm, self._mm = self._mm, None
        self.views = None
        if mm is None:
            return
        libc = _libc()
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED
        if hasattr(self, "_addr"):
            libc.mmap(ctypes.c_void_p(self._addr), self.size, _PROT_RW, flags, -1, 0)
        # Never mm.close(): torch.frombuffer keeps a reference to ``mm`` but no buffer
        # export, so close() would unmap under a view the caller kept. The mapping (zero
        # pages now) goes when the last view does; at once if there is none.
        del mm


# ------------------------------------------------------------------ copy_into
def _load_leaf(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def _new(skel: Any, views: list[torch.Tensor]) -> Any:
    """A value built from the version (a copy: it outlives the lease)."""
    if type(skel) is int:
        return views[skel].clone()
    if isinstance(skel, bytes):
        return _load_leaf(skel)
    if isinstance(skel, dict):
        return {k: _new(v, views) for k, v in skel.items()}
    return [_new(v, views) for v in skel]


def views_state_dict(skeleton: dict[str, Any], views: list[torch.Tensor]) -> dict[str, Any]:
    """The version as a state dict of zero-copy views (non-tensor values loaded)."""

    def walk(skel: Any) -> Any:
        if type(skel) is int:
            return views[skel]
        if isinstance(skel, bytes):
            return _load_leaf(skel)
        if isinstance(skel, dict):
            return {k: walk(v) for k, v in skel.items()}
        return [walk(v) for v in skel]

    return {k: walk(v) for k, v in skeleton.items()}


def copy_into(
    state_dict: Mapping[str, Any], skeleton: dict[str, Any], views: list[torch.Tensor], version: int
) -> None:
    """Load a version into ``state_dict`` in place, as ``dcp.load`` would (blocking).

    Every key of ``state_dict`` must be in the version, tensors of the same shape
    (dtype is converted); top-level ``Stateful`` values get ``load_state_dict``.
    Nothing is changed unless everything fits.
    """
    dst: list[torch.Tensor] = []
    src: list[torch.Tensor] = []
    sets: list[tuple[Any, Any, Any]] = []
    missing: list[str] = []
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...] | None]] = {}

    def one(container: Any, key: Any, s: Any, where: str) -> None:
        d = container[key]
        if type(s) is int:
            view = views[s]
            if isinstance(d, torch.Tensor):
                local = d.to_local() if hasattr(d, "to_local") else d
                if tuple(local.shape) != tuple(view.shape):
                    mismatched[where] = (tuple(local.shape), tuple(view.shape))
                elif view.numel():
                    dst.append(local)
                    src.append(view)
            else:
                sets.append((container, key, s))
        elif isinstance(s, bytes):
            if isinstance(d, torch.Tensor):
                mismatched[where] = (tuple(d.shape), None)
            else:
                sets.append((container, key, s))
        elif isinstance(d, (Mapping, list)):
            walk(d, s, where)
        else:
            sets.append((container, key, s))

    def walk(container: Any, skel: Any, path: str) -> None:
        keys = container.keys() if isinstance(container, Mapping) else range(len(container))
        for key in list(keys):
            where = f"{path}.{key}"
            try:
                s = skel[key]
            except (KeyError, IndexError, TypeError):
                missing.append(where)
                continue
            one(container, key, s, where)

    stateful: list[tuple[Any, dict[str, Any]]] = []
    for key, value in state_dict.items():
        if key not in skeleton:
            missing.append(key)
        elif _is_stateful(value):
            sd = value.state_dict()
            stateful.append((value, sd))
            walk(sd, skeleton[key], key)
        else:
            one(state_dict, key, skeleton[key], key)
    if missing or mismatched:
        raise CheckpointMismatchError(
            f"version {version} does not fit the state dict: "
            + (f"keys missing from the version: {missing[:8]}; " if missing else "")
            + (f"shape mismatch: {dict(list(mismatched.items())[:8])}" if mismatched else ""),
            step=version,
            missing=tuple(missing),
            mismatched=mismatched,
        )
    with torch.no_grad():
        for lo in range(0, len(src), _COPY_CHUNK):
            torch._foreach_copy_(dst[lo : lo + _COPY_CHUNK], src[lo : lo + _COPY_CHUNK])
    for container, key, s in sets:
        container[key] = _new(s, views)
    for obj, sd in stateful:
        obj.load_state_dict(sd)
