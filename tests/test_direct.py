"""Direct I/O: checkpoint files bypass the page cache where the filesystem allows, the
bytes are exactly what was written whatever the write sizes, and every way O_DIRECT can
be refused falls back to buffered writing without losing or repeating a byte."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import random
import subprocess
import sys
from pathlib import Path

import anyio.to_thread
import pytest
import torch

import aiodcp
from aiodcp._daemon import _direct
from aiodcp._daemon._direct import ALIGN, DirectFile
from aiodcp._staging import _arena

needs_o_direct = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT")


def _pieces(seed: int, total: int) -> list[bytes]:
    """Writes of every awkward size: 1 byte, 63, just under/over a block and a buffer."""
    rng = random.Random(seed)
    sizes = [1, 63, ALIGN - 1, ALIGN + 1, 3 * ALIGN, 2 * 4096 * 8 + 5]
    out, n = [], 0
    while n < total:
        k = rng.choice([*sizes, rng.randrange(1, 200_000)])
        out.append(rng.randbytes(k))
        n += k
    return out


def _resident_fraction(path: Path) -> float:
    """Share of the file's pages in the page cache: mincore(2) over a fresh mapping."""
    libc = _arena._libc()  # mmap/munmap typed
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            rc = libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec)
            assert rc == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) / pages


@needs_o_direct
@pytest.mark.parametrize("direct", [True, False])
def test_bytes_are_exactly_what_was_written(tmp_path: Path, direct: bool) -> None:
    path = tmp_path / "f"
    pieces = _pieces(1, 5 * (1 << 20))
    with DirectFile(path, direct=direct, buffer_size=16 * ALIGN) as f:
        assert f.direct is direct  # ext4/xfs here: O_DIRECT accepted
        for p in pieces:
            assert f.write(p) == len(p)
            f.flush()  # as torch.save does after every record
            if direct:  # still direct after whole buffers and flushes
                assert fcntl.fcntl(f.fileno(), fcntl.F_GETFL) & os.O_DIRECT
    assert path.read_bytes() == b"".join(pieces)


@needs_o_direct
def test_a_write_refused_as_direct_continues_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EINVAL on a direct write (stricter alignment than ours), then a short direct write:
    the same bytes go out buffered, none lost or doubled."""
    real = os.write
    calls = {"n": 0}

    def flaky(fd: int, data: object) -> int:
        calls["n"] += 1
        direct = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        if direct and calls["n"] == 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(_direct.os, "write", flaky)
    path = tmp_path / "f"
    pieces = _pieces(2, 1 << 20)
    with DirectFile(path, buffer_size=4 * ALIGN) as f:
        for p in pieces:
            f.write(p)
        assert not f.direct
    assert path.read_bytes() == b"".join(pieces)

    def short(fd: int, data: memoryview) -> int:  # the kernel may write less than asked
        return real(fd, data[: max(1, len(data) // 3)])

    monkeypatch.setattr(_direct.os, "write", short)
    with DirectFile(path, buffer_size=4 * ALIGN) as f:
        for p in pieces:
            f.write(p)
    assert path.read_bytes() == b"".join(pieces)


@needs_o_direct
def test_after_a_failed_write_nothing_is_written_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that got one block out and then hit a full disk: the file stays broken
    (every later write and the close raise the same error) instead of writing the
    buffer again from its start."""
    real = os.write
    calls = {"n": 0}

    def half_then_full(fd: int, data: memoryview) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real(fd, data[:ALIGN])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_direct.os, "write", half_then_full)
    path = tmp_path / "f"
    f = DirectFile(path, buffer_size=4 * ALIGN)
    with pytest.raises(OSError) as first:
        f.write(b"x" * (4 * ALIGN))
    assert first.value.errno == errno.ENOSPC
    monkeypatch.setattr(_direct.os, "write", real)  # the disk has room again
    with pytest.raises(OSError) as again:
        f.write(b"y" * (4 * ALIGN))
    assert again.value is first.value
    with pytest.raises(OSError):
        f.close()
    assert path.stat().st_size == ALIGN


def test_a_filesystem_without_o_direct_gets_a_buffered_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.open

    def no_direct(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")  # tmpfs on older kernels
        return real(path, flags, mode)

    monkeypatch.setattr(_direct.os, "open", no_direct)
    path = tmp_path / "f"
    pieces = _pieces(3, 1 << 20)
    with DirectFile(path) as f:
        assert not f.direct
        for p in pieces:
            f.write(p)
    assert path.read_bytes() == b"".join(pieces)


def test_file_too_large_is_raised_not_swallowed(tmp_path: Path) -> None:
    """Errors other than EINVAL (EFBIG here, ENOSPC alike) surface from write or flush."""
    code = f"""
import errno, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ((1 << 20) + 100, resource.RLIM_INFINITY))
from aiodcp._daemon._direct import DirectFile
try:
    with DirectFile({str(tmp_path / "f")!r}, buffer_size=1 << 16) as f:
        for _ in range(64):
            f.write(b"x" * 50_000)
except OSError as exc:
    print("raised", errno.errorcode[exc.errno])
else:
    print("no error")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "raised EFBIG", out.stdout + out.stderr


def _residency(step_dir: Path) -> list[float]:
    files = sorted(step_dir.glob("*.distcp"))
    assert files
    return [_resident_fraction(p) for p in files]


@needs_o_direct
@pytest.mark.asyncio
@pytest.mark.parametrize("direct_io", [True, False])
async def test_a_checkpoints_data_files_stay_out_of_the_page_cache(
    root: Path, direct_io: bool
) -> None:
    """With direct_io (the default) the saved data is on disk, not also held in memory by
    the page cache (mincore); with direct_io=False it is cached, as before. Loads either way."""
    state = {f"w{i}": torch.randn(1 << 20) for i in range(16)}  # 64 MiB
    async with aiodcp.AsyncCheckpointer(root, direct_io=direct_io) as ckpt:
        result = await (await ckpt.save(state, step=1))
        resident = await anyio.to_thread.run_sync(_residency, Path(result.path))
        back = {k: torch.empty_like(v) for k, v in state.items()}
        assert await ckpt.load(back, step=1) == 1
    if direct_io:
        assert max(resident) < 0.05, resident
    else:
        assert min(resident) > 0.9, resident
    assert all(torch.equal(back[k], v) for k, v in state.items())
