"""GPU staging benchmark for aiodcp (standalone; no pytest).

On a CUDA machine it measures, per size (default 2 and 8 GiB of bf16):

* the floor: one device-to-host ``copy_(non_blocking=True)`` into a
  ``pin_memory()`` tensor of the same size (GiB/s);
* aiodcp's D2H staging: ``result.stage_seconds`` of ``ckpt.save(state)`` after
  ``ckpt.prepare(state)`` (the first save also page-locks the arena: shown apart),
  and its ratio to the floor (target >= 0.8x);
* overlap: a CUDA matmul training step's time alone and while an
  ``overlap=True`` save of the state is staging (1.0x = fully overlapped);
* pinning cost: ``cudaHostRegister`` of an aiodcp arena (``Arena.pin``) against
  allocating ``torch.empty(..., pin_memory=True)``.

Without CUDA it prints ``no CUDA: skipped`` and exits 0.

    python scripts/gpu_bench.py [--sizes 2,8] [--root DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

try:
    import aiodcp
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import aiodcp
from aiodcp._staging._arena import Arena

GIB = 1 << 30
CHUNK = 256 << 20  # bytes per tensor of the saved state


def sync() -> None:
    torch.cuda.synchronize()


def gibps(nbytes: int, seconds: float) -> float:
    return nbytes / GIB / seconds if seconds > 0 else float("inf")


def make_state(nbytes: int) -> dict[str, torch.Tensor]:
    """``nbytes`` of bf16 CUDA tensors, CHUNK bytes each."""
    state = {}
    for i in range(max(1, nbytes // CHUNK)):
        state[f"t{i:03d}"] = torch.full(
            (CHUNK // 2,), float(i), dtype=torch.bfloat16, device="cuda"
        )
    return state


def pinned_floor(nbytes: int, repeats: int = 3) -> float:
    """Best seconds of one D2H copy of ``nbytes`` into pinned memory."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty(nbytes // 2, dtype=torch.bfloat16, pin_memory=True)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync()
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return best


def pin_costs(nbytes: int) -> tuple[float, float]:
    """(seconds of Arena.pin(), i.e. cudaHostRegister of a populated memfd arena;
    seconds of torch.empty(pin_memory=True)), for ``nbytes``."""
    arena = Arena(((torch.uint8, torch.Size([nbytes])),))
    try:
        t0 = time.perf_counter()
        arena.pin()
        register = time.perf_counter() - t0
    finally:
        arena.close()
    t0 = time.perf_counter()
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    allocate = time.perf_counter() - t0
    del pinned
    return register, allocate


class Trainer:
    """A CUDA training step: a few bf16 matmul layers, forward + backward + SGD."""

    def __init__(self, width: int = 8192, layers: int = 4) -> None:
        self.ws = [
            (
                torch.randn(width, width, device="cuda", dtype=torch.bfloat16) / width**0.5
            ).requires_grad_()
            for _ in range(layers)
        ]
        self.x = torch.randn(4096, width, device="cuda", dtype=torch.bfloat16)

    def step(self) -> None:
        h = self.x
        for w in self.ws:
            h = torch.relu(h @ w)
        h.float().pow(2).mean().backward()
        with torch.no_grad():
            for w in self.ws:
                assert w.grad is not None
                w -= 1e-3 * w.grad
                w.grad = None

    def timed_steps(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            self.step()
            sync()
            out.append(time.perf_counter() - t0)
        return out


async def bench_size(root: Path, nbytes: int, trainer: Trainer) -> dict[str, Any]:
    row: dict[str, Any] = {"size": nbytes / GIB}
    row["floor_s"] = pinned_floor(nbytes)
    state = make_state(nbytes)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    sync()
    async with aiodcp.AsyncCheckpointer(root / f"{nbytes}", keep_last=1) as ckpt:
        await ckpt.prepare(state)
        first = await (await ckpt.save(state))
        row["first_stage_s"] = first.stage_seconds  # includes cudaHostRegister of the arena
        stages = []
        for _ in range(2):
            stages.append((await (await ckpt.save(state))).stage_seconds)
        row["stage_s"] = min(stages)

        baseline = statistics.median(trainer.timed_steps(5))
        handle = await ckpt.save(state, overlap=True)
        during = []
        t0 = time.perf_counter()
        while not handle.is_staged():
            await asyncio.sleep(0)  # an async training loop yields once per step
            during.extend(trainer.timed_steps(1))
        staged_after = time.perf_counter() - t0
        await handle
    row["step_s"] = baseline
    row["step_during_s"] = statistics.median(during) if during else float("nan")
    row["steps_during"] = len(during)
    row["overlap_stage_s"] = staged_after
    row["nbytes"] = nbytes
    del state
    torch.cuda.empty_cache()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2,8", help="GiB of bf16 state per run (comma list)")
    parser.add_argument("--root", type=Path, default=None, help="checkpoint directory")
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",") if s]
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA: skipped")
        return 0
    device = f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    print(f"gpu_bench: {device}, torch {torch.__version__}")
    trainer = Trainer()
    trainer.timed_steps(3)  # warm up
    rows = []
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        for gib in sizes:
            row = asyncio.run(bench_size(Path(tmp), int(gib * GIB), trainer))
            row["register_s"], row["pin_alloc_s"] = pin_costs(int(gib * GIB))
            rows.append(row)

    print(
        f"\n{'GiB':>5} {'floor':>8} {'aiodcp':>8} {'ratio':>6} {'1st save':>9} "
        f"{'step':>8} {'step+save':>10} {'slowdown':>8} {'register':>9} {'pin alloc':>9}"
    )
    print(
        f"{'':>5} {'GiB/s':>8} {'GiB/s':>8} {'':>6} {'stage ms':>9} {'ms':>8} {'ms':>10} "
        f"{'x':>8} {'ms':>9} {'ms':>9}"
    )
    verdicts = []
    for r in rows:
        floor = gibps(r["nbytes"], r["floor_s"])
        staged = gibps(r["nbytes"], r["stage_s"])
        slowdown = r["step_during_s"] / r["step_s"]
        print(
            f"{r['size']:>5.1f} {floor:>8.2f} {staged:>8.2f} {staged / floor:>6.2f} "
            f"{r['first_stage_s'] * 1e3:>9.0f} {r['step_s'] * 1e3:>8.1f} "
            f"{r['step_during_s'] * 1e3:>10.1f} {slowdown:>8.2f} "
            f"{r['register_s'] * 1e3:>9.0f} {r['pin_alloc_s'] * 1e3:>9.0f}"
        )
        verdicts.append(
            f"{r['size']:g} GiB: staging at {staged / floor:.2f}x the pinned floor "
            f"({'meets' if staged / floor >= 0.8 else 'BELOW'} the 0.8x target); "
            f"{r['steps_during']} training step(s) ran while an overlapped save staged "
            f"({r['overlap_stage_s'] * 1e3:.0f} ms), each {slowdown:.2f}x a step alone "
            f"({'fully overlapped' if slowdown <= 1.1 else 'NOT fully overlapped'})"
        )
    print("\n" + "\n".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
