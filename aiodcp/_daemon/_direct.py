"""A write-only file that bypasses the page cache (``O_DIRECT``) where it can.

Why: a buffered write copies every byte into the page cache, and the kernel
then allocates, tracks, writes back and reclaims those pages — about 1.9 s of
CPU per GiB here, taken from the training process on the same cores. With
``O_DIRECT`` the disk reads the bytes straight from our buffer: ~0.2 s per GiB.

``O_DIRECT`` needs the memory address, the file offset and the length of each
write aligned (to the device's logical block; :data:`ALIGN` = 4096 covers the
usual 512 and 4096). DCP's records are 64-byte aligned at best, so every write
goes through one page-aligned bounce buffer: bytes are copied in, and a full
buffer goes to disk in one aligned ``write``. At :meth:`DirectFile.finish` the
aligned part of what is left goes the same way and the tail through the page
cache (``O_DIRECT`` cleared with ``fcntl``); the caller's ``fsync`` makes all of
it durable (``O_DIRECT`` alone promises nothing about the device's cache or the
file's size).

Fallback, never an error: where the filesystem refuses ``O_DIRECT`` at open
(``EINVAL``: tmpfs on older kernels, some overlay and FUSE filesystems) or a
direct write is refused (``EINVAL``: a stricter alignment than ours), the file
continues buffered from where it is. Every other error (``ENOSPC``, ``EFBIG``)
is raised as it comes.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from typing import Any

__all__ = ["ALIGN", "BUFFER_SIZE", "DirectFile"]

ALIGN = 4096
BUFFER_SIZE = 8 << 20
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class DirectFile:
    """``open(path, "wb")`` for large sequential writes: ``write``, ``finish``,
    ``fileno``, ``close``, a context manager. ``direct`` is whether ``O_DIRECT`` is in use now."""

    def __init__(
        self, path: str | os.PathLike[str], *, direct: bool = True, buffer_size: int = BUFFER_SIZE
    ) -> None:
        if buffer_size <= 0 or buffer_size % ALIGN:
            raise ValueError(f"buffer_size must be a positive multiple of {ALIGN}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        self._buf = mmap.mmap(-1, buffer_size)  # page-aligned, as O_DIRECT wants
        self._view = memoryview(self._buf)
        self._fill = 0
        self._error: OSError | None = None  # after a failed write, the file is broken
        self.direct = False
        fd = -1
        if direct and _O_DIRECT:
            try:
                fd = os.open(path, flags | _O_DIRECT, 0o666)
                self.direct = True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        if fd < 0:
            fd = os.open(path, flags, 0o666)
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def write(self, data: Any) -> int:
        """Take all of ``data`` (bytes-like) or raise ``OSError``."""
        src = memoryview(data).cast("B")
        size = len(self._view)
        pos, n = 0, src.nbytes
        while pos < n:
            if self._fill == 0 and not self.direct and n - pos >= size:
                self._write_all(src[pos:])  # buffered: no reason to copy twice
                return n
            take = min(n - pos, size - self._fill)
            self._view[self._fill : self._fill + take] = src[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == size:
                self._flush_aligned()
        return n

    def flush(self) -> None:
        """Nothing: bytes wait for a whole buffer (``torch.save`` flushes after every
        record; writing then would cost a syscall per tensor). See :meth:`finish`."""

    def finish(self) -> None:
        """Write everything buffered: whole blocks direct, the tail through the page
        cache. Call it once, after the last write (then ``fsync``)."""
        self._flush_aligned()
        if self._fill:
            self._go_buffered()
            self._write_all(self._view[: self._fill])
            self._fill = 0

    def close(self) -> None:
        """:meth:`finish` and close. Raises what the writes raise; the descriptor is
        closed either way."""
        self._close(flush=True)

    def _close(self, *, flush: bool) -> None:
        if self._fd < 0:
            return
        try:
            if flush:
                self.finish()
        finally:
            fd, self._fd = self._fd, -1
            os.close(fd)
            try:
                self._view.release()
                self._buf.close()
            except BufferError:  # a failed write's traceback still holds a slice:
                pass  # the mapping goes with the last reference

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._close(flush=exc_type is None)  # after a failed write: just close

    def _flush_aligned(self) -> None:
        """Write the buffer's whole blocks (all of it when buffered) and keep the rest."""
        n = self._fill - self._fill % ALIGN if self.direct else self._fill
        if not n:
            return
        self._write_all(self._view[:n])
        rest = self._fill - n
        if rest:
            self._view[:rest] = self._view[n : self._fill]
        self._fill = rest

    def _write_all(self, view: memoryview) -> None:
        if self._error is not None:  # part of a buffer may be out: never write it twice
            raise self._error
        try:
            self._write_all_once(view)
        except OSError as exc:
            self._error = exc
            raise

    def _write_all_once(self, view: memoryview) -> None:
        done = 0
        while done < view.nbytes:
            try:
                done += os.write(self._fd, view[done:])
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                self._go_buffered()  # refused as direct: the same bytes again, buffered
            # a short direct write leaves an unaligned rest: finish buffered
            if self.direct and done % ALIGN:
                self._go_buffered()

    def _go_buffered(self) -> None:
        if self.direct:
            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~_O_DIRECT)
            self.direct = False
