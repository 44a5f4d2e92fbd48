"""Shared-memory arenas: the parent stages tensors into one, the daemon maps it read-only.

An arena is an anonymous ``memfd``: no name in any filesystem, so nothing is ever
left in ``/dev/shm``, and its memory is freed when the last mapping and descriptor
(the parent's and the daemon's) are gone, also when either process is killed.
Functions here block (copies, page faults); the parent calls them in worker threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import pickle
import threading
from collections.abc import Callable, Collection
from typing import Any

import torch

from ._staging import Flat, Layout, TensorSpec, dumps_specs, specs_of

__all__ = ["Arena", "MappedArena", "dtype_from_name", "memfd_with", "read_fd"]


def memfd_with(data: bytes, name: str) -> int:
    """A new anonymous memfd holding ``data`` (the caller owns the descriptor)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_fd(fd: int, nbytes: int, offset: int = 0) -> bytes:
    """``nbytes`` from ``fd`` at ``offset`` (short read: ValueError)."""
    data = os.pread(fd, nbytes, offset)
    if len(data) != nbytes:
        raise ValueError(f"expected {nbytes} bytes at offset {offset}, got {len(data)}")
    return data


# ---------------------------------------------------------------------- arena
_COPY_CHUNK = 512  # tensors per foreach call: the GIL is free between calls


class Arena:
    """A shared-memory buffer (an anonymous ``memfd``) the parent stages into.

    One arena serves one layout: its tensors' specs are computed once and
    written into the arena's tail (where the daemon reads them once), and the
    destination views are built once, so a save of an unchanged layout does no
    per-tensor Python work beyond one batched copy. It has no name in any
    filesystem, so nothing is ever left in ``/dev/shm``: its memory is freed when
    the last mapping and descriptor (the parent's and the daemon's) are gone,
    including when either process is killed.
    """

    _ids = iter(range(1, 1 << 62))
    _ids_lock = threading.Lock()

    def __init__(self, layout: Layout) -> None:
        with Arena._ids_lock:
            self.arena_id = next(Arena._ids)
        self.layout = layout
        self.specs, self.nbytes = specs_of(layout)
        self.used_bytes = sum(s.nbytes for s in self.specs)
        blob = dumps_specs(self.specs)
        self.layout_offset = -(-self.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        self.layout_nbytes = len(blob)
        size = max(self.layout_offset + len(blob), mmap.PAGESIZE)
        self.fd = os.memfd_create(f"aiodcp-arena-{self.arena_id}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            os.pwrite(self.fd, blob, self.layout_offset)
            self._mm: mmap.mmap | None = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        _populate(self._mm, _MADV_POPULATE_WRITE)
        self.base = torch.frombuffer(self._mm, dtype=torch.uint8)
        self._views: list[torch.Tensor] | None = None
        self.pinned = False

    def fits(self, flat: Flat) -> bool:
        return flat.layout == self.layout

    def view(self, spec: TensorSpec) -> torch.Tensor:
        dtype = dtype_from_name(spec.dtype)
        raw = self.base[spec.offset : spec.offset + spec.nbytes]
        return raw.view(dtype).view(spec.shape)

    @property
    def views(self) -> list[torch.Tensor]:
        """One destination tensor per spec (built on first use, then reused)."""
        if self._views is None:
            self._views = [self.view(s) for s in self.specs]
        return self._views

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

    def stage(
        self,
        flat: Flat,
        *,
        stream: Any = None,
        first: Collection[int] = (),
        on_first: Callable[[], None] | None = None,
    ) -> None:
        """Copy ``flat``'s tensors into the arena (blocking; call from a worker thread).

        CPU tensors are copied in batches (``torch._foreach_copy_``, which releases
        the GIL). CUDA tensors go through a side stream into pinned memory with
        non-blocking copies; the call returns once the copies' event has completed,
        so the caller may then mutate the sources. The tensors indexed by ``first``
        (a guarded module's buffers) are copied before the others, then
        ``on_first()`` is called.
        """
        if not self.fits(flat):
            raise ValueError("layout does not fit this arena")
        views = self.views
        early = set(first)
        batches: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = [([], []), ([], [])]
        cuda: list[int] = []
        for i, t in enumerate(flat.tensors):
            if t.device.type == "cuda":
                cuda.append(i)
            elif t.numel():
                dst, src = batches[0 if i in early else 1]
                dst.append(views[i])
                src.append(t)
        with torch.no_grad():
            for n, (dst, src) in enumerate(batches):
                for lo in range(0, len(src), _COPY_CHUNK):
                    torch._foreach_copy_(dst[lo : lo + _COPY_CHUNK], src[lo : lo + _COPY_CHUNK])
                if n == 0 and on_first is not None and not (early & set(cuda)):
                    on_first()
                    on_first = None
            if cuda:
                self._stage_cuda(flat, cuda, stream)
        if on_first is not None:
            on_first()

    def _stage_cuda(self, flat: Flat, indices: list[int], stream: Any) -> None:
        self.pin()
        views = self.views
        by_device: dict[Any, list[int]] = {}
        for i in indices:
            by_device.setdefault(flat.tensors[i].device, []).append(i)
        events = []
        for device, idx in by_device.items():  # one side stream per device
            side = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
            if stream is not None and stream.device == device:
                side.wait_stream(stream)
            else:
                side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for i in idx:
                    if flat.tensors[i].numel():
                        views[i].copy_(flat.tensors[i], non_blocking=True)
                events.append(side.record_event())
        for done in events:
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
        self._views = None
        self.base = torch.empty(0, dtype=torch.uint8)
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view is still alive somewhere; GC unmaps it
                pass


_MADV_POPULATE_READ = 22  # Linux >= 5.14: fault the pages in now, in one call
_MADV_POPULATE_WRITE = 23
_LIBC: Any = None


def _libc() -> Any:
    """libc through ctypes (calls release the GIL), with mmap/munmap/madvise typed."""
    global _LIBC
    if _LIBC is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _LIBC = libc
    return _LIBC


def _madvise_addr(addr: int, length: int, advice: int) -> None:
    _libc().madvise(addr, length, advice)  # older kernels: EINVAL; first touch faults instead


def _populate(mm: mmap.mmap, advice: int) -> None:
    """Fault a whole mapping in at once. Through ctypes, which releases the GIL
    (``mmap.madvise`` holds it, and would stall the event loop's thread meanwhile)."""
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    _madvise_addr(addr, len(mm), advice)


# --------------------------------------------------------------- daemon side
_DTYPES = {str(v): v for v in vars(torch).values() if isinstance(v, torch.dtype)}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}") from None


_PROT_READ, _MAP_SHARED = mmap.PROT_READ, mmap.MAP_SHARED


class MappedArena:
    """The daemon's read-only mapping of one arena, with its tensor views.

    The mapping is made and unmapped with ``mmap(2)``/``munmap(2)`` directly, so
    :meth:`release` frees it at once -- never left to the garbage collector, which
    a user may have disabled. The protocol guarantees no save still reads it then.
    """

    def __init__(self, fd: int, nbytes: int, layout_offset: int, layout_nbytes: int) -> None:
        self.nbytes = nbytes
        self.size = max(layout_offset + layout_nbytes, nbytes, mmap.PAGESIZE)
        specs = pickle.loads(read_fd(fd, layout_nbytes, layout_offset)) if layout_nbytes else ()
        self.specs: tuple[TensorSpec, ...] = tuple(specs)
        libc = _libc()
        addr = libc.mmap(None, self.size, _PROT_READ, _MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of arena failed: {os.strerror(err)}")
        self.addr: int | None = addr
        _madvise_addr(addr, self.size, _MADV_POPULATE_READ)
        self._views: list[torch.Tensor] | None = None

    @property
    def views(self) -> list[torch.Tensor]:
        """One tensor per spec, each with a storage of exactly its bytes (built once)."""
        if self._views is None:
            self._views = [self.tensor(s) for s in self.specs]
        return self._views

    def tensor(self, spec: TensorSpec) -> torch.Tensor:
        """A tensor whose storage is exactly ``spec``'s bytes (no copy), so DCP's
        writer does not clone it."""
        if self.addr is None:
            raise ValueError("arena is released")
        dtype = dtype_from_name(spec.dtype)
        numel = 1
        for d in spec.shape:
            numel *= d
        if numel == 0:
            return torch.empty(spec.shape, dtype=dtype)
        if numel * dtype.itemsize != spec.nbytes or spec.offset + spec.nbytes > self.nbytes:
            raise ValueError(f"tensor spec {spec} does not fit an arena of {self.nbytes} bytes")
        buf = (ctypes.c_char * spec.nbytes).from_address(self.addr + spec.offset)
        return torch.frombuffer(buf, dtype=dtype).view(spec.shape)

    def release(self) -> None:
        """Unmap now (idempotent)."""
        self._views = None
        addr, self.addr = self.addr, None
        if addr is not None:
            _libc().munmap(ctypes.c_void_p(addr), ctypes.c_size_t(self.size))
