"""Side-by-side benchmark: sync ``dcp.save``, ``dcp.async_save`` (THREAD, PROCESS), aiodcp.

``python -m aiodcp bench --shape big16,dense,moe,small100k [--mib M] [--rounds 3]`` saves
one state per shape with every method, in interleaved rounds (round 1: A B C D, round 2:
B C D A, ...) so that the machine's noise hits every method alike, and prints medians,
the two floors (copy into a preallocated buffer; sequential write + fdatasync in the same
directory) and ratios. ``--train`` measures training throughput instead (``_bench_train``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch

from ._bench_train import interleaved

MiB = 1 << 20
SHAPES = ("big16", "dense", "moe", "small100k")
DEFAULT_MIB = {"big16": 256, "dense": 256, "moe": 256, "small100k": 64, "tensors": 256}
METHODS = {
    "sync": "dcp.save (sync)",
    "thread": "dcp.async_save THREAD",
    "process": "dcp.async_save PROCESS",
    "aiodcp": "aiodcp",
    "overlap": "aiodcp overlap=True",
}
# stall, end-to-end, max loop lag until staged, staged, max loop lag after (persisting)
Sample = tuple[float, float, float, float, float]
Measure = Callable[[], Awaitable[tuple[float, float, float]]]  # stall, end-to-end, staged


def _adamw(params: dict[str, torch.Tensor]) -> dict[str, Any]:
    """An AdamW state the way ``optimizer.state_dict()`` keyed by FQN looks."""
    state = {
        k: {
            "step": torch.tensor(10.0),
            "exp_avg": torch.randn_like(v),
            "exp_avg_sq": torch.rand_like(v),
        }
        for k, v in params.items()
    }
    groups = [{"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": 0.1, "params": list(params)}]
    return {"model": params, "optim": {"state": state, "param_groups": groups}}


def _attention(params: dict[str, torch.Tensor], p: str, d: int) -> str:
    params[p + "attn_norm.weight"] = torch.ones(d)
    params.update({p + f"attn.w{w}.weight": torch.randn(d, d) for w in "qkvo"})
    return p


def _dense(mib: int, layers: int = 32) -> tuple[dict[str, Any], str]:
    # per layer: q/k/v/o (d x d), mlp up/down (d x 4d), two norms; x3 with AdamW state
    d = max(8, round(math.sqrt(mib * MiB / (3 * 4 * layers * 12))))
    params: dict[str, torch.Tensor] = {}
    for i in range(layers):
        p = _attention(params, f"layers.{i}.", d)
        params[p + "mlp_norm.weight"] = torch.ones(d)
        params[p + "mlp.up.weight"] = torch.randn(4 * d, d)
        params[p + "mlp.down.weight"] = torch.randn(d, 4 * d)
    return _adamw(params), f"{layers} layers, d={d}, AdamW state"


def _moe(mib: int, layers: int = 24, experts: int = 100) -> tuple[dict[str, Any], str]:
    # per layer: attention (4 d x d), router, `experts` x (w1, w2, w3) of d x d; x3 with AdamW
    d = max(8, round(math.sqrt(mib * MiB / (3 * 4 * layers * (3 * experts + 4)))))
    params: dict[str, torch.Tensor] = {}
    for i in range(layers):
        p = _attention(params, f"layers.{i}.", d)
        params[p + "moe_norm.weight"] = torch.ones(d)
        params[p + "moe.router.weight"] = torch.randn(experts, d)
        for e in range(experts):
            for w in ("w1", "w2", "w3"):
                params[p + f"moe.experts.{e}.{w}.weight"] = torch.randn(d, d)
    return _adamw(params), f"{layers} layers x {experts} experts, d={d}, AdamW state"


def make_state(shape: str, mib: int, tensors: int | None = None) -> tuple[dict[str, Any], str]:
    """The state to save for ``shape`` (or ``tensors`` equal tensors) and its description."""
    if tensors is not None or shape in ("big16", "small100k"):
        n = tensors if tensors is not None else (16 if shape == "big16" else 100_000)
        numel = max(1, mib * MiB // 4 // n)
        state = {f"t{i}": torch.randn(numel) for i in range(n)}
        return state, f"{n} float32 tensors of {numel * 4} bytes"
    if shape == "dense":
        return _dense(mib)
    if shape == "moe":
        return _moe(mib)
    raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")


def tensors_of(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in tensors_of(v)]
    return []


def _floors(state: Any, directory: Path) -> tuple[float, float]:
    """Seconds to copy the state into preallocated memory; bytes/s of write + fdatasync."""
    src = tensors_of(state)
    dst = [torch.empty_like(t) for t in src]
    for d, s in zip(dst, src, strict=True):
        d.copy_(s)  # fault the pages in first
    t = time.perf_counter()
    for d, s in zip(dst, src, strict=True):
        d.copy_(s)
    copy = time.perf_counter() - t
    del dst
    nbytes = sum(t.nbytes for t in src)
    block = bytes(MiB)
    path = directory / "floor.bin"
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes // MiB)):
            f.write(block)
        f.flush()
        os.fdatasync(f.fileno())
    write = time.perf_counter() - t
    path.unlink()
    return copy, max(nbytes, MiB) / write


async def _lagged(fn: Measure) -> Sample:
    """Run ``fn`` (-> stall, end-to-end, staged) while a ticker measures the loop's worst
    lag, separately until the state is staged and after (while the daemon persists)."""
    ticks: list[tuple[float, float]] = []  # (when it ended, lag)
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            ticks.append((now, now - t - 0.001))

    task = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    try:
        stall, e2e, staged = await fn()
    finally:
        done.set()
        await task
    cut = t0 + staged + 0.002  # a tick that began before the state was staged
    early = [lag for when, lag in ticks if when <= cut]
    late = [lag for when, lag in ticks if when > cut]
    return stall, e2e, max(early, default=0.0), staged, max(late, default=0.0)


@contextlib.contextmanager
def children_log(directory: Path) -> Iterator[None]:
    """Child processes started meanwhile (DCP PROCESS's background process, which sets up
    INFO logging to its stderr) write their stderr to ``directory/children.log``, not
    between the table's lines; this process's own ``sys.stderr`` stays where it was."""
    sys.stderr.flush()
    saved = os.dup(2)
    own = sys.stderr
    sys.stderr = open(saved, "w", closefd=False)  # restored below
    with open(directory / "children.log", "ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = own
        os.dup2(saved, 2)
        os.close(saved)


def _medians(samples: list[Sample]) -> Sample:
    stall, e2e, lag, staged, late = (statistics.median(x) for x in zip(*samples, strict=True))
    return stall, e2e, lag, staged, late


def _pss(pid: int) -> int:
    """Proportional set size in bytes (shared pages split between their users)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


async def _clear(directory: Path) -> None:
    dirs = await asyncio.to_thread(lambda: list(directory.glob("dcp-*")))
    for entry in dirs:
        await asyncio.to_thread(shutil.rmtree, entry, ignore_errors=True)


class _Abandon(Exception):
    pass


async def _run(
    state: Any,
    methods: list[str],
    rounds: int,
    mem_saves: int,
    directory: Path,
    save_timeout: float,
    options: dict[str, Any],
) -> tuple[list[tuple[str, Sample | str]], str | None]:
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, async_save
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    import aiodcp

    counter = iter(range(1_000_000))

    def ckpt_dir() -> Path:
        return directory / f"dcp-{next(counter)}"

    async def sync_save() -> tuple[float, float, float]:
        t = time.perf_counter()
        dcp_save(state, checkpoint_id=ckpt_dir())
        d = time.perf_counter() - t
        return d, d, d

    def async_kind(kind: AsyncCheckpointerType) -> Measure:
        async def run() -> tuple[float, float, float]:
            t = time.perf_counter()
            with children_log(directory):
                fut: Any = async_save(state, checkpoint_id=ckpt_dir(), async_checkpointer_type=kind)
            stall = time.perf_counter() - t
            await asyncio.wrap_future(fut)
            return stall, time.perf_counter() - t, stall

        return run

    def ours_in(ckpt: aiodcp.AsyncCheckpointer, overlap: bool = False) -> Measure:
        async def run() -> tuple[float, float, float]:
            t = time.perf_counter()
            handle = await ckpt.save(state, overlap=overlap)
            stall = time.perf_counter() - t
            await handle.staged()
            staged = time.perf_counter() - t
            await handle
            return stall, time.perf_counter() - t, staged

        return run

    first: dict[str, Sample] = {}
    failed: dict[str, str] = {}
    samples: dict[str, list[Sample]] = {m: [] for m in methods}
    fns: dict[str, Measure] = {
        "sync": sync_save,
        "thread": async_kind(AsyncCheckpointerType.THREAD),
        "process": async_kind(AsyncCheckpointerType.PROCESS),
    }

    async def attempt(m: str) -> Sample | None:
        """One measured save; a method that fails once is reported and dropped."""
        if m in failed:
            return None
        try:
            async with asyncio.timeout(save_timeout):
                return await _lagged(fns[m])
        except TimeoutError:
            failed[m] = f"no result within {save_timeout:.0f}s (hung?)"
        except Exception as exc:  # e.g. PROCESS: one fd per tensor, EMFILE
            msg = " ".join(str(exc).split())
            msg = msg if len(msg) < 100 else f"{msg[:30]} ... {msg[-60:]}"
            failed[m] = f"{type(exc).__name__}: {msg}"
            gc.collect()  # what the failed method still maps (PROCESS: one map per tensor)
        return None

    try:
        async with aiodcp.AsyncCheckpointer(directory / "aiodcp", keep_last=2, **options) as ckpt:
            fns["aiodcp"] = ours_in(ckpt)
            fns["overlap"] = ours_in(ckpt, overlap=True)
            # warm-up: aiodcp maps its arena, PROCESS spawns its daemon (aiodcp first: a
            # PROCESS that fails on many tensors can leave this process out of mappings)
            for m in sorted(methods, key=lambda m: m != "aiodcp"):
                if m in ("process", "aiodcp") and (sample := await attempt(m)) is not None:
                    first[m] = sample
            for order in interleaved(methods, rounds):
                for m in order:
                    if (sample := await attempt(m)) is not None:
                        samples[m].append(sample)
                await _clear(directory)
            if "aiodcp" in failed or "overlap" in failed:
                raise _Abandon  # leaving by an exception cancels a stuck save, not awaits it
    except _Abandon:
        pass
    rows: list[tuple[str, Sample | str]] = [
        (METHODS[m], f"failed: {failed[m]}" if m in failed else _medians(samples[m]))
        for m in methods
    ]
    memory = None
    if "aiodcp" in methods and "aiodcp" not in failed:
        rows.append(("aiodcp first save", first["aiodcp"]))
        async with aiodcp.AsyncCheckpointer(
            directory / "aiodcp-prepared", keep_last=1, **options
        ) as ckpt:
            await ckpt.prepare(state)
            rows.append(("aiodcp first, prepare()d", await _lagged(ours_in(ckpt))))
        if mem_saves:
            memory = await _memory(state, mem_saves, directory / "aiodcp-mem")
    return rows, memory


async def _memory(state: Any, saves: int, root: Path) -> str:
    """PSS of trainer + daemon above the state after the first and after ``saves`` saves."""
    import aiodcp

    nbytes = sum(t.nbytes for t in tensors_of(state))
    async with aiodcp.AsyncCheckpointer(root, keep_last=2) as ckpt:
        assert ckpt.daemon_pid is not None
        pids = (os.getpid(), ckpt.daemon_pid)
        before = sum(map(_pss, pids))
        await (await ckpt.save(state))
        after_one = sum(map(_pss, pids)) - before
        for _ in range(saves - 1):
            await (await ckpt.save(state))
        after_n = sum(map(_pss, pids)) - before
    return (
        f"  aiodcp host memory (PSS, trainer + daemon) above the state: "
        f"{after_one / nbytes:.2f}x state ({after_one / MiB:.0f} MiB) after 1 save, "
        f"{after_n / nbytes:.2f}x ({after_n / MiB:.0f} MiB) after {saves} saves"
    )


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b and b > 0 else "n/a"


def _report(
    title: str, nbytes: int, floors: tuple[float, float], rows: list[tuple[str, Sample | str]]
) -> None:
    copy, write_bps = floors
    print(f"\n{title}")
    print(
        f"  floors: copy into preallocated {copy:.3f}s, write+fdatasync {write_bps / MiB:.0f} MiB/s"
    )
    print(
        f"  {'':<26}{'':>9}{'':>10}{'':>14}{'max loop lag ms':^20}"
        f"\n  {'method':<26}{'stall s':>9}{'staged s':>10}{'end-to-end s':>14}"
        f"{'staging':>10}{'persist':>10}{'persist MiB/s':>15}"
    )
    for name, row in rows:
        if isinstance(row, str):
            print(f"  {name:<26}{row}")
            continue
        stall, e2e, lag, staged, late = row
        persist = f"{nbytes / (e2e - staged) / MiB:.0f}" if e2e - staged > 1e-3 else "-"
        after = f"{late * 1e3:.1f}" if e2e - staged > 1e-3 else "-"
        print(
            f"  {name:<26}{stall:>9.3f}{staged:>10.3f}{e2e:>14.3f}{lag * 1e3:>10.1f}"
            f"{after:>10}{persist:>15}"
        )
    by = {name: row for name, row in rows if not isinstance(row, str)}
    ours, proc, sync = by.get("aiodcp"), by.get("dcp.async_save PROCESS"), by.get("dcp.save (sync)")
    ours_bps = nbytes / (ours[1] - ours[3]) if ours and ours[1] - ours[3] > 1e-3 else None
    over = by.get(METHODS["overlap"])
    print(
        f"  ratios: aiodcp stall / PROCESS stall {_ratio(ours and ours[0], proc and proc[0])}, "
        f"aiodcp overlap=True stall / PROCESS stall {_ratio(over and over[0], proc and proc[0])}, "
        f"aiodcp stall / copy floor {_ratio(ours and ours[0], copy)}, "
        f"aiodcp persist / fdatasync floor {_ratio(ours_bps, write_bps)}, "
        f"aiodcp end-to-end / sync {_ratio(ours and ours[1], sync and sync[1])}"
    )


def _sharing_strategy(count: int) -> str | None:
    """DCP PROCESS passes one fd per tensor; past the fd limit use torch's file_system."""
    import resource

    import torch.multiprocessing as mp

    set_strategy: Any = mp.set_sharing_strategy  # untyped in torch
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if count < soft // 2:
        set_strategy("file_descriptor")
        return None
    set_strategy("file_system")
    return (
        f"  note: {count} tensors vs RLIMIT_NOFILE {soft}: DCP PROCESS ran with "
        f"torch.multiprocessing sharing strategy 'file_system' (one fd per tensor fails)"
    )


def main(args: argparse.Namespace, error: Callable[[str], NoReturn]) -> int:
    """``aiodcp bench`` (its arguments are declared in ``_cli``; ``error`` is usage error)."""
    import torch.distributed as dist

    methods = [m for m in (args.methods or ",".join(METHODS)).split(",") if m]
    if not args.train and (bad := [m for m in methods if m not in METHODS]):
        error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    if args.shape and args.sizes:
        error("--sizes is big16 at several sizes; use --shape with --mib")
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="aiodcp-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    if not dist.is_initialized():  # DCP's PROCESS mode needs a process group
        dist.init_process_group(
            "gloo",
            init_method=f"file://{base / f'.process-group-{os.getpid()}'}",
            rank=0,
            world_size=1,
        )
    print(f"aiodcp benchmark, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, dir {base}")
    with children_log(base):  # DCP's INFO lines (its PROCESS child) not into the table
        try:
            if args.train:
                from ._bench_train import main as train

                return train(args, base)
            if args.tensors is not None:
                jobs = [("tensors", args.mib or DEFAULT_MIB["tensors"])]
            elif args.sizes:
                jobs = [("big16", int(s)) for s in args.sizes.split(",")]
            else:
                shapes = (args.shape or "big16").split(",")
                if bad := [s for s in shapes if s not in SHAPES]:
                    error(f"unknown shape(s) {bad}; choose from {', '.join(SHAPES)}")
                jobs = [(s, args.mib or DEFAULT_MIB[s]) for s in shapes]
            for shape, mib in jobs:
                directory = base / f"{shape}-{mib}MiB"
                directory.mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                state, what = make_state(shape, mib, args.tensors)
                nbytes = sum(t.nbytes for t in tensors_of(state))
                floors = _floors(state, directory)
                count = len(tensors_of(state))
                note = _sharing_strategy(count) if "process" in methods else None
                rows, memory = asyncio.run(
                    _run(
                        state,
                        methods,
                        args.rounds,
                        args.rss_saves if args.mem else 0,
                        directory,
                        args.save_timeout,
                        {}
                        if args.daemon_niceness is None
                        else {"daemon_niceness": args.daemon_niceness},
                    )
                )
                title = (
                    f"{shape}: {nbytes / MiB:.0f} MiB in {count} tensors ({what}); "
                    f"median of {args.rounds} interleaved rounds"
                )
                _report(title, nbytes, floors, rows)
                if note:
                    print(note)
                if memory:
                    print(memory)
                print(f"  ({time.perf_counter() - t0:.0f}s for this shape)")
                del state
                shutil.rmtree(directory, ignore_errors=True)
        finally:
            dist.destroy_process_group()
            if not args.dir:
                shutil.rmtree(base, ignore_errors=True)
    return 0
