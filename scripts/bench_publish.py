"""Live publication vs the disk path vs a torch.save/torch.load handoff, side by side.

    python scripts/bench_publish.py [--sizes-mib 256 1024] [--rounds 3] [--dir DIR]
                                    [--overhead-mib 256] [--steps 8]

One run, rounds interleaved (every path once per size per round). For each size:

* memory: ``ckpt.publish(state)`` in this process; a reader process follows with
  ``aiodcp.follow(source="memory")`` and ``copy_into`` a state dict of its own;
* disk: ``ckpt.save(state)`` in this process; a reader process follows with
  ``aiodcp.follow(source="disk")`` (watch -> hold -> load);
* torch: ``torch.save`` to a file and rename; a reader process sees it (inotify-less
  poll, 1 ms) and ``torch.load``s it;
* memcpy: one ``copy_`` of the same bytes between two warm buffers in this process.

Latency is monotonic time from the call in the learner to the moment the reader holds
the new weights *in its own tensors* (after the copy), and, for memory and disk, to the
moment it holds the lease. Reader bandwidth is bytes / the reader's copy (or load) time.

Then the learner's overhead: a training step (a small MLP's forward, backward and
AdamW step) followed by ``await pub.publish(policy)`` of an ``--overhead-mib`` policy,
``--steps`` steps per round, rounds alternating between a publisher no reader follows
and one that 4 reader processes follow (each ``copy_into`` every version it gets).
The ratio is the median step time with 4 readers over the median with none; the
step's own compute (without the publish) is reported beside it, since on a small
machine the readers' copies take cores from the trainer.

The ratios printed last are the issue's targets: publication's latency over the disk
path's and over the torch handoff's, and each reader copy over a memcpy of the bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import aiodcp

CHUNK_MIB = 16


def make_state(mib: int, value: float = 0.0) -> dict[str, object]:
    n = max(1, mib // CHUNK_MIB)
    numel = CHUNK_MIB * (1 << 20) // 4
    return {"w": {f"t{i}": torch.full((numel,), value) for i in range(n)}, "v": -1}


# ------------------------------------------------------------------ reader side
async def reader(mode: str, root: str, mib: int) -> None:
    mine = make_state(mib)
    print(json.dumps({"ready": True}), flush=True)
    if mode == "torch":
        last = -1
        while True:
            names = [p for p in os.listdir(root) if p.endswith(".pt")]
            newest = max((int(p[:-3]) for p in names), default=-1)
            if newest > last:
                held = time.monotonic()
                t = time.perf_counter()
                state = torch.load(Path(root) / f"{newest}.pt", weights_only=True)
                copy_s = time.perf_counter() - t
                last = newest
                out = {"n": newest, "held": held, "copied": time.monotonic(), "copy_s": copy_s}
                print(json.dumps(out), flush=True)
                del state
            await asyncio.sleep(0.001)
    async with aiodcp.follow(root, source=mode, poll_interval=0.01) as versions:  # type: ignore[arg-type]
        async for version in versions:
            async with version:
                held = time.monotonic()
                t = time.perf_counter()
                await version.copy_into(mine)
                copy_s = time.perf_counter() - t
                copied = time.monotonic()
            out = {"n": version.number, "held": held, "copied": copied, "copy_s": copy_s}
            print(json.dumps(out), flush=True)


# ----------------------------------------------------------------- learner side
class Reader:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def next(self, n: int) -> dict[str, float]:
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), 300)
            if not line:
                raise RuntimeError("reader exited")
            msg = json.loads(line)
            if msg.get("n") == n:
                return msg  # type: ignore[no-any-return]


async def spawn(mode: str, root: str, mib: int) -> Reader:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--reader", mode, root, str(mib), stdout=asyncio.subprocess.PIPE
    )
    r = Reader(proc)
    assert proc.stdout is not None
    await asyncio.wait_for(proc.stdout.readline(), 300)  # ready
    return r


def memcpy_s(mib: int) -> float:
    src = torch.ones(mib << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm
    t = time.perf_counter()
    dst.copy_(src)
    return time.perf_counter() - t


def mlp() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024)
    )
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4), torch.randn(64, 1024)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    t = time.perf_counter()
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    return time.perf_counter() - t


async def overhead(mib: int, rounds: int, steps: int, base: Path) -> dict[str, list[float]]:
    """Step times (train + publish) with no reader and with 4 readers, interleaved."""
    state = make_state(mib)
    model, opt, x = mlp()
    train_step(model, opt, x)  # warm
    out: dict[str, list[float]] = {}
    roots = {0: base / f"ovh0-{mib}", 4: base / f"ovh4-{mib}"}
    async with aiodcp.Publisher(roots[0]) as alone, aiodcp.Publisher(roots[4]) as followed:
        readers = [await spawn("memory", str(roots[4]), mib) for _ in range(4)]
        drains = [asyncio.create_task(drain(r)) for r in readers]
        while followed.readers < 4:  # noqa: ASYNC110  (a count, not an event)
            await asyncio.sleep(0.05)
        version = 0
        for rnd in range(rounds + 1):  # round 0 warms up
            for n, pub in ((0, alone), (4, followed)):
                for _ in range(steps):
                    t = time.perf_counter()
                    compute = train_step(model, opt, x)
                    got = await pub.publish(state, version=version)
                    version += 1
                    if rnd:
                        out.setdefault(f"step{n}", []).append(time.perf_counter() - t)
                        out.setdefault(f"compute{n}", []).append(compute)
                        out.setdefault(f"skipped{n}", []).append(float(got is None))
                await asyncio.sleep(1.0)  # readers finish their copies before the next phase
        for task in drains:
            task.cancel()
        for r in readers:
            r.proc.kill()
            await r.proc.wait()
    return out


async def drain(r: Reader) -> None:
    assert r.proc.stdout is not None
    while await r.proc.stdout.readline():
        pass


async def main(sizes: list[int], rounds: int, base: Path, overhead_mib: int, steps: int) -> None:
    results: dict[tuple[int, str], dict[str, list[float]]] = {}
    for mib in sizes:
        state = make_state(mib)
        nbytes = mib << 20
        mem_root, disk_root, pt_root = base / f"mem{mib}", base / f"disk{mib}", base / f"pt{mib}"
        pt_root.mkdir(parents=True)
        async with (
            aiodcp.AsyncCheckpointer(mem_root) as mem_ckpt,
            aiodcp.AsyncCheckpointer(disk_root, keep_last=2) as disk_ckpt,
        ):
            await mem_ckpt.publisher(ring=2, when_full="wait")
            await disk_ckpt.prepare(state)
            readers = {
                "memory": await spawn("memory", str(mem_root), mib),
                "disk": await spawn("disk", str(disk_root), mib),
                "torch": await spawn("torch", str(pt_root), mib),
            }
            for rnd in range(rounds + 1):  # round 0 warms up (first faults, first arena)
                for path in ("memory", "disk", "torch", "memcpy"):
                    for t in state["w"].values():  # type: ignore[attr-defined]
                        t.fill_(float(rnd))
                    state["v"] = rnd
                    rec = results.setdefault((mib, path), {})
                    if path == "memcpy":
                        s = memcpy_s(mib)
                        if rnd:
                            rec.setdefault("gibs", []).append(nbytes / s / (1 << 30))
                        continue
                    t0 = time.monotonic()
                    if path == "memory":
                        await mem_ckpt.publish(state, version=rnd)
                    elif path == "disk":
                        handle = await disk_ckpt.save(state, step=rnd)
                    else:
                        tmp = pt_root / f"{rnd}.tmp"
                        await asyncio.to_thread(torch.save, state, tmp)
                        os.rename(tmp, pt_root / f"{rnd}.pt")
                    got = await readers[path].next(rnd)
                    if path == "disk":
                        await handle
                    if path == "torch":
                        (pt_root / f"{rnd}.pt").unlink()
                    if rnd:
                        rec.setdefault("held", []).append(got["held"] - t0)
                        rec.setdefault("latency", []).append(got["copied"] - t0)
                        rec.setdefault("gibs", []).append(nbytes / got["copy_s"] / (1 << 30))
            for r in readers.values():
                r.proc.kill()
                await r.proc.wait()
        del state
    ovh = await overhead(overhead_mib, rounds, steps, base) if overhead_mib else {}
    load = os.getloadavg()
    print(
        f"\nrounds: {rounds} (median; interleaved), machine: {os.cpu_count()} CPUs, "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}\n"
    )
    print(
        "| size | path | version latency (call -> weights in reader) | lease held after |"
        " reader copy GiB/s |"
    )
    print("| --- | --- | --- | --- | --- |")
    for (mib, path), rec in results.items():
        med = {k: statistics.median(v) for k, v in rec.items()}
        lat = f"{med['latency'] * 1e3:.0f} ms" if "latency" in med else "-"
        held = f"{med['held'] * 1e3:.0f} ms" if "held" in med and path != "torch" else "-"
        print(f"| {mib} MiB | {path} | {lat} | {held} | {med['gibs']:.2f} |")
    print("\nratios (medians): latency publication/disk, publication/torch; reader copy / memcpy")
    for mib in sizes:
        meds = {
            path: {k: statistics.median(v) for k, v in results[(mib, path)].items()}
            for path in ("memory", "disk", "torch", "memcpy")
        }
        mem = meds["memory"]
        print(
            f"  {mib} MiB: latency {mem['latency'] / meds['disk']['latency']:.2f}x disk "
            f"(target <= 0.1), {mem['latency'] / meds['torch']['latency']:.2f}x torch; "
            f"copy {mem['gibs'] / meds['memcpy']['gibs']:.2f}x memcpy (target >= 0.8), "
            f"disk load {meds['disk']['gibs'] / meds['memcpy']['gibs']:.2f}x, "
            f"torch.load {meds['torch']['gibs'] / meds['memcpy']['gibs']:.2f}x"
        )
    if ovh:
        m = {k: statistics.median(v) for k, v in ovh.items()}
        print(
            f"  learner step + publish of {overhead_mib} MiB: {m['step0'] * 1e3:.0f} ms alone, "
            f"{m['step4'] * 1e3:.0f} ms with 4 readers: {m['step4'] / m['step0']:.2f}x "
            f"(its compute alone {m['compute0'] * 1e3:.0f} -> {m['compute4'] * 1e3:.0f} ms, "
            f"{m['compute4'] / m['compute0']:.2f}x; publishes skipped, ring full: "
            f"{sum(ovh['skipped0']):.0f} / {sum(ovh['skipped4']):.0f} of {len(ovh['step0'])})"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--reader":
        asyncio.run(reader(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    else:
        ap = argparse.ArgumentParser()
        ap.add_argument("--sizes-mib", type=int, nargs="+", default=[256, 1024])
        ap.add_argument("--rounds", type=int, default=3)
        ap.add_argument("--dir", default=None)
        ap.add_argument("--overhead-mib", type=int, default=256, help="0: skip the overhead")
        ap.add_argument("--steps", type=int, default=8, help="training steps per overhead round")
        args = ap.parse_args()
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            asyncio.run(main(args.sizes_mib, args.rounds, Path(d), args.overhead_mib, args.steps))
