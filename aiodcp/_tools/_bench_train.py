"""Training-throughput benchmark: ``python -m aiodcp bench --train``.

A real CPU training loop (a residual MLP with AdamW; state = params + AdamW moments) runs
``--steps`` synchronous steps inside an ``async def``, the way a user writes it, saving
every K steps with each method in turn. Methods run in interleaved rounds (rotated
order), each into its own directory (cleaned between rounds), and each gets one untimed
warm-up save first, so that one-time set-up (daemon spawn, staging buffers) is not
counted. "loop s" is from the first step until the last step returned; "durable s" adds
the wait for the last save to be durable. Numbers are medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import statistics
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

MiB = 1 << 20
BLOCKS = 8
METHODS = {
    "none": "no checkpointing",
    "sync": "dcp.save (sync)",
    "thread": "dcp.async_save THREAD",
    "process": "dcp.async_save PROCESS",
    "stager": "PROCESS + DefaultStager(async)",
    "aiodcp": "aiodcp",
    "overlap": "aiodcp overlap=True + guard",
    "nice": "aiodcp daemon_niceness=10",
    "thread1": "aiodcp thread_count=1",
    "buffered": "aiodcp direct_io=False",
}
DEFAULT_METHODS = ("none", "sync", "thread", "process", "stager", "aiodcp", "overlap")
_OPTIONS: dict[str, dict[str, Any]] = {
    "nice": {"daemon_niceness": 10},
    "thread1": {"thread_count": 1},
    "buffered": {"direct_io": False},
}


class _Block(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.up = torch.nn.Linear(d, 4 * d)
        self.down = torch.nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))
        return out


def interleaved(names: list[str], rounds: int) -> list[list[str]]:
    """Round r runs the methods rotated by r: A B C, B C A, C A B, ..."""
    return [names[r % len(names) :] + names[: r % len(names)] for r in range(rounds)]


def make_model(mib: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    """A residual MLP whose params + AdamW moments are about ``mib`` MiB; one step taken."""
    d = max(32, round(math.sqrt(mib * MiB / (3 * 4 * BLOCKS * 8)) / 32) * 32)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(_Block(d) for _ in range(BLOCKS)), torch.nn.LayerNorm(d))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    _train_step(model, opt, torch.randn(2, d))
    opt.step()  # AdamW creates its state on the first step
    return model, opt, d


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    loss = (model(x) - x).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()


class _Saver:
    """One method's save hooks; the loop calls ``save`` after a step's update."""

    async def save(self, step: int) -> None:
        pass

    async def before_update(self) -> None:
        """Called before ``optimizer.step()``: wait here if the state may not change yet."""

    async def drain(self) -> None:
        """Wait until every save is durable."""

    def helper_cpu(self) -> float | None:
        """CPU seconds used so far by the process that persists (aiodcp: its daemon)."""
        return None


class _Dcp(_Saver):
    def __init__(self, state: dict[str, Any], root: Path, kind: str, stager: Any = None) -> None:
        self.state, self.root, self.kind, self.stager = state, root, kind, stager
        self.upload: Future[Any] | None = None
        self.staging: Future[Any] | None = None

    async def save(self, step: int) -> None:
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType as T
        from torch.distributed.checkpoint.state_dict_saver import async_save
        from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

        path = self.root / f"step_{step}"
        if self.kind == "sync":
            dcp_save(self.state, checkpoint_id=path)
            return
        await self.drain()  # one save in flight, as aiodcp's default
        kind = T.PROCESS if self.kind in ("process", "stager") else T.THREAD
        result: Any = async_save(
            self.state, checkpoint_id=path, async_checkpointer_type=kind, async_stager=self.stager
        )
        if self.stager is not None:
            self.staging, self.upload = result.staging_completion, result.upload_completion
        else:
            self.upload = result

    async def before_update(self) -> None:
        if self.staging is not None:
            self.staging.result()  # as DefaultStager's docs ask: staged before mutating
            self.staging = None

    async def drain(self) -> None:
        await self.before_update()
        if self.upload is not None:
            await asyncio.wrap_future(self.upload)
            self.upload = None


class _Ours(_Saver):
    def __init__(self, ckpt: Any, state: dict[str, Any], overlap: bool) -> None:
        self.ckpt, self.state, self.overlap = ckpt, state, overlap

    async def save(self, step: int) -> None:
        if self.overlap:
            await self.ckpt.save(self.state, step=step, overlap=True)
        else:
            await self.ckpt.save(self.state, step=step)

    async def drain(self) -> None:
        await self.ckpt.wait()

    def helper_cpu(self) -> float | None:
        pid = self.ckpt.daemon_pid
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, TypeError):
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def _saver(method: str, state: dict[str, Any], root: Path) -> AsyncIterator[_Saver]:
    """The method's saver, after one untimed warm-up save (step 0)."""
    if method == "none":
        yield _Saver()
        return
    if method in ("aiodcp", "overlap", *_OPTIONS):
        from .._parent._checkpointer import AsyncCheckpointer

        async with AsyncCheckpointer(root, keep_last=2, **_OPTIONS.get(method, {})) as ckpt:
            ours = _Ours(ckpt, state, overlap=method == "overlap")
            await ours.save(0)
            await ours.drain()
            opened: Any = ckpt  # guard() is newer than this benchmark's type-check
            guard = opened.guard(state["optim"]) if method == "overlap" else None
            try:
                yield ours
            finally:
                if guard is not None:
                    guard.remove()
        return
    stager = None
    if method == "stager":
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        cuda = torch.cuda.is_available()  # pinned memory and non-blocking copies need CUDA
        stager = DefaultStager(
            StagingOptions(
                use_pinned_memory=cuda, use_async_staging=True, use_non_blocking_copy=cuda
            )
        )
    dcp = _Dcp(state, root, method, stager)
    try:
        await dcp.save(0)
        await dcp.drain()
        yield dcp
    finally:
        if stager is not None:
            stager.close()


async def run_one(
    method: str,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    d: int,
    args: argparse.Namespace,
    every: int,
    root: Path,
) -> tuple[float, float, float]:
    """(seconds until the last step returned, until the last save was durable, CPU
    seconds of aiodcp's daemon meanwhile: NaN for the other methods)."""
    state = {"model": model, "optim": opt}
    torch.manual_seed(1)
    xs = [torch.randn(args.batch, d) for _ in range(4)]
    async with _saver(method, state, root) as saver:
        cpu0 = saver.helper_cpu()
        t0 = time.perf_counter()
        for step in range(1, args.steps + 1):
            _train_step(model, opt, xs[step % len(xs)])
            await saver.before_update()
            opt.step()
            if step % every == 0:
                await saver.save(step)
        loop = time.perf_counter() - t0
        await saver.drain()
        durable = time.perf_counter() - t0
        cpu1 = saver.helper_cpu()
    helper = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else math.nan
    return loop, durable, helper


def main(args: argparse.Namespace, base: Path) -> int:

    model, opt, d = make_model(args.mib or 250)
    nbytes = sum(p.nbytes for p in model.parameters()) + sum(
        t.nbytes for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    )
    wanted = args.methods.split(",") if args.methods else DEFAULT_METHODS
    if bad := [m for m in wanted if m not in METHODS]:
        raise SystemExit(f"unknown training method(s) {bad}; choose from {', '.join(METHODS)}")
    methods = [m for m in METHODS if m in wanted]
    if "none" not in methods:
        methods.insert(0, "none")
    x = torch.randn(args.batch, d)
    for _ in range(3):  # warm-up: AdamW's state exists before the first save
        _train_step(model, opt, x)
        opt.step()
    for every in (int(k) for k in args.every.split(",")):
        saves = args.steps // every
        print(
            f"\ntrain: MLP {BLOCKS} blocks d={d}, {nbytes / MiB:.0f} MiB state (params + AdamW)"
            f", batch {args.batch}, {args.steps} steps, save every "
            f"{every} ({saves} save{'s' if saves != 1 else ''}); "
            f"median of {args.rounds} interleaved rounds"
        )
        asyncio.run(run_one("none", model, opt, d, args, every, base / "warm-up"))
        samples: dict[str, list[tuple[float, float, float]]] = {m: [] for m in methods}
        for order in interleaved(methods, args.rounds):
            for m in order:
                root = base / f"train-{m}"
                samples[m].append(asyncio.run(run_one(m, model, opt, d, args, every, root)))
                shutil.rmtree(root, ignore_errors=True)
        med = {
            m: tuple(statistics.median(c) for c in zip(*s, strict=True)) for m, s in samples.items()
        }
        none = med["none"][0]
        noise = 0.05 * none  # overheads below 5% of the run are not told apart here
        print(f"  training alone (none): {none / args.steps:.2f} s/step, measured in these runs")
        print(
            f"  {'method':<32}{'loop s':>8}{'vs none':>9}{'overhead s':>12}{'durable s':>11}"
            f"{'daemon CPU s/save':>19}"
        )
        over: dict[str, float | None] = {}
        for m, name in METHODS.items():
            if m not in wanted and m != "none":
                over[m] = None
                continue
            if m not in med:
                print(f"  {name:<32}{'n/a':>8}   (AsyncCheckpointer.save has no overlap= yet)")
                over[m] = None
                continue
            loop, durable, helper = med[m]
            per_save = "-" if math.isnan(helper) else f"{helper / saves:.2f}"
            over[m] = loop - none
            print(
                f"  {name:<32}{loop:>8.2f}{loop / none:>8.2f}x{loop - none:>12.2f}{durable:>11.2f}"
                f"{per_save:>19}"
            )
        print(
            f"  ratios: aiodcp overhead / DefaultStager overhead "
            f"{_ratio(over['aiodcp'], over['stager'], noise)}"
            f", aiodcp overhead / PROCESS overhead {_ratio(over['aiodcp'], over['process'], noise)}"
            f", aiodcp overlap overhead / DefaultStager overhead "
            f"{_ratio(over['overlap'], over['stager'], noise)}"
        )
        for m in _OPTIONS:
            if over[m] is not None:
                print(
                    f"  {METHODS[m]} overhead / aiodcp overhead "
                    f"{_ratio(over[m], over['aiodcp'], noise)}"
                )
    return 0


def _ratio(a: float | None, b: float | None, noise: float) -> str:
    """a / b, unless either overhead is within ``noise`` seconds of none (then n/a)."""
    if a is None or b is None:
        return "n/a"
    if b < noise or a < -noise:
        return "n/a (within noise)"
    return f"{max(a, 0.0) / b:.2f}x"
