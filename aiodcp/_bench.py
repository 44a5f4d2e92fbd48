"""Side-by-side benchmark: sync ``dcp.save``, ``dcp.async_save`` (THREAD, PROCESS), aiodcp.

Run ``python -m aiodcp bench [--sizes 256,1024] [--saves 3] [--dir DIR]``. Everything is
measured in one run on the same state, plus the two floors (copy into a preallocated
buffer; sequential write + fdatasync in the same directory). Numbers are medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch

MiB = 1 << 20


def _state(size_mib: int) -> dict[str, torch.Tensor]:
    n = size_mib * MiB // 4 // 16
    return {f"layer{i}": torch.randn(n) for i in range(16)}


def _floors(state: dict[str, torch.Tensor], directory: Path) -> tuple[float, float]:
    dst = {k: torch.empty_like(v) for k, v in state.items()}
    for k in state:
        dst[k].copy_(state[k])  # fault the pages in first
    t = time.perf_counter()
    for k in state:
        dst[k].copy_(state[k])
    copy = time.perf_counter() - t
    nbytes = sum(v.nbytes for v in state.values())
    block = bytes(MiB)
    path = directory / "floor.bin"
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes // MiB):
            f.write(block)
        f.flush()
        os.fdatasync(f.fileno())
    write = time.perf_counter() - t
    path.unlink()
    return copy, nbytes / write


async def _lagged(fn: Callable[[], Awaitable[tuple[float, float]]]) -> tuple[float, float, float]:
    """Run ``fn`` (-> stall, end-to-end) while a ticker measures the loop's worst lag."""
    lag = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal lag
        while not done.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lag = max(lag, time.perf_counter() - t - 0.001)

    task = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.01)
    try:
        stall, e2e = await fn()
    finally:
        done.set()
        await task
    return stall, e2e, lag


async def _run(
    size: int, saves: int, rss_saves: int, directory: Path
) -> list[tuple[str, float, float, float]]:
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, async_save
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    import aiodcp

    state = _state(size)
    rows: list[tuple[str, float, float, float]] = []
    counter = iter(range(1_000_000))

    def ckpt_dir() -> Path:
        return directory / f"dcp-{next(counter)}"

    async def sync_save() -> tuple[float, float]:
        t = time.perf_counter()
        dcp_save(state, checkpoint_id=ckpt_dir())
        d = time.perf_counter() - t
        return d, d

    def async_kind(kind: AsyncCheckpointerType) -> Callable[[], Awaitable[tuple[float, float]]]:
        async def run() -> tuple[float, float]:
            t = time.perf_counter()
            fut: Any = async_save(state, checkpoint_id=ckpt_dir(), async_checkpointer_type=kind)
            stall = time.perf_counter() - t
            await asyncio.wrap_future(fut)
            return stall, time.perf_counter() - t

        return run

    methods: list[tuple[str, Callable[[], Awaitable[tuple[float, float]]]]] = [
        ("dcp.save (sync)", sync_save),
        ("dcp.async_save THREAD", async_kind(AsyncCheckpointerType.THREAD)),
        ("dcp.async_save PROCESS", async_kind(AsyncCheckpointerType.PROCESS)),
    ]
    for name, fn in methods:
        await fn()  # warm-up (PROCESS: spawns its daemon)
        samples = [await _lagged(fn) for _ in range(saves)]
        rows.append((name, *_medians(samples)))
        await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)

    nbytes = sum(v.nbytes for v in state.values())
    for prepared in (False, True):
        async with aiodcp.AsyncCheckpointer(directory / "aiodcp", keep_last=2) as ckpt:

            async def ours() -> tuple[float, float]:
                t = time.perf_counter()
                handle = await ckpt.save(state)
                stall = time.perf_counter() - t
                await handle
                return stall, time.perf_counter() - t

            assert ckpt.worker_pid is not None
            before = _pss(os.getpid()) + _pss(ckpt.worker_pid)
            if prepared:
                await ckpt.prepare(state)
                rows.append(("aiodcp first, prepare()d", *await _lagged(ours)))
                continue
            rows.append(("aiodcp first save", *await _lagged(ours)))
            after_one = _pss(os.getpid()) + _pss(ckpt.worker_pid)
            samples = [await _lagged(ours) for _ in range(max(saves, rss_saves))]
            after_n = _pss(os.getpid()) + _pss(ckpt.worker_pid)
            rows.append(("aiodcp", *_medians(samples)))
            print(
                f"  aiodcp host memory (PSS, trainer + daemon) above the state: "
                f"{(after_one - before) / nbytes:.2f}x state after 1 save, "
                f"{(after_n - before) / nbytes:.2f}x after {1 + len(samples)} saves"
            )
    return rows


def _medians(samples: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    stall, e2e, lag = (statistics.median(x) for x in zip(*samples, strict=True))
    return stall, e2e, lag


def _pss(pid: int) -> int:
    """Proportional set size in bytes (shared pages split between their users)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aiodcp bench", description=__doc__)
    parser.add_argument("--sizes", default="256", help="MiB, comma-separated (e.g. 256,1024)")
    parser.add_argument("--saves", type=int, default=3, help="measured saves per method")
    parser.add_argument("--rss-saves", type=int, default=20, help="aiodcp saves for memory")
    parser.add_argument("--dir", default=None, help="directory to write in (default: a temp dir)")
    args = parser.parse_args(argv)
    import torch.distributed as dist

    if not dist.is_initialized():  # DCP's PROCESS mode needs a process group
        dist.init_process_group(
            "gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1
        )
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="aiodcp-bench-"))
    print(f"aiodcp benchmark, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, dir {base}")
    for size in (int(s) for s in args.sizes.split(",")):
        directory = base / f"{size}MiB"
        directory.mkdir(parents=True, exist_ok=True)
        state = _state(size)
        copy, write_bps = _floors(state, directory)
        del state
        rows = asyncio.run(_run(size, args.saves, args.rss_saves, directory))
        nbytes = size * MiB
        proc = next(r for r in rows if r[0] == "dcp.async_save PROCESS")
        ours = next(r for r in rows if r[0] == "aiodcp")
        print(f"\n{size} MiB in 16 float32 tensors (median of {args.saves})")
        print(
            f"  floors: copy into preallocated {copy:.3f}s, write+fdatasync "
            f"{write_bps / MiB:.0f} MiB/s"
        )
        print(
            f"  {'method':<26}{'stall s':>9}{'end-to-end s':>14}{'max loop lag ms':>17}"
            f"{'persist MiB/s':>15}"
        )
        for name, stall, e2e, lag in rows:
            persist = f"{nbytes / (e2e - stall) / MiB:.0f}" if e2e - stall > 1e-3 else "-"
            print(f"  {name:<26}{stall:>9.3f}{e2e:>14.3f}{lag * 1e3:>17.1f}{persist:>15}")
        print(
            f"  ratios: stall vs PROCESS {ours[1] / proc[1]:.2f}x, "
            f"stall vs copy floor {ours[1] / copy:.2f}x, "
            f"persist vs fdatasync floor "
            f"{(nbytes / (ours[2] - ours[1])) / write_bps:.2f}x, "
            f"end-to-end vs sync {ours[2] / rows[0][2]:.2f}x"
        )
        shutil.rmtree(directory, ignore_errors=True)
    dist.destroy_process_group()
    return 0
