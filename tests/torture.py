"""Seeded random schedules of calls and faults against real daemons (issue 10).

One *schedule* is 3-6 random operations on an open checkpointer -- ``save`` (of one
of several layouts, overlapped or not), ``prepare``, ``cancel``, awaiting or not,
``wait``, SIGKILL and SIGSTOP/SIGCONT of the daemon, a raising ``on_event`` -- and
then the invariants: every handle resolves within a bound; every step reported
committed loads bit-exact to the values passed to its ``save``; the disk lists no
step that was not committed. The checkpointer is reopened every few schedules, and
at every close nothing may be left: no daemon process, no arena memfd, no stray
file descriptor or thread. Run by ``tests/test_torture.py`` (1 rank) and under
torchrun (2 ranks: the same seed drives both, faults hit one rank).

    python tests/torture.py ROOT --seed 7 --schedules 2000   # a long run
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import torch

import aiodcp
from aiodcp import CheckpointError

LAYOUTS = [
    [(64,), (32, 32), (3,)],
    [(200,)],
    [(16,)] * 24,
    [(8, 8), (0,), (5,)],
]
BOUND = 60.0  # seconds any handle may take to resolve, faults included
PER_OPEN = 25


def _memfds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += "aiodcp-" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return n


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


class Torture:
    def __init__(self, root: Path, seed: int, rank: int = 0, world: int = 1) -> None:
        self.root = root
        self.seed = seed
        self.rng = random.Random(seed)
        self.rank = rank
        self.world = world
        self.committed: dict[int, dict[str, torch.Tensor]] = {}
        self.pids: set[int] = set()
        self.stopped: set[int] = set()
        self.schedules = 0
        self.stats = {"saves": 0, "committed": 0, "failed": 0, "kills": 0, "stops": 0}

    def state(self) -> dict[str, torch.Tensor]:
        shapes = self.rng.choice(LAYOUTS)
        base = self.rng.randrange(1 << 20)
        return {
            f"t{i}": torch.arange(base + i, base + i + max(1, torch.Size(s).numel()))[
                : torch.Size(s).numel()
            ]
            .reshape(s)
            .float()
            for i, s in enumerate(shapes)
        }

    async def run(self, schedules: int) -> None:
        while self.schedules < schedules:
            await self.session(min(PER_OPEN, schedules - self.schedules))

    async def session(self, n: int) -> None:
        fds, memfds = _fds(), _memfds()
        threads = {t for t in threading.enumerate() if not t.name.startswith(("AnyIO", "asyncio"))}
        raising = self.rng.random() < 0.3

        def on_event(event: aiodcp.SaveEvent) -> None:
            if raising and event.phase == "staged":
                raise RuntimeError("a callback bug")

        async with aiodcp.AsyncCheckpointer(
            self.root,
            max_inflight=self.rng.choice([1, 2]),
            shutdown_timeout=2,
            collective_timeout=30,
            on_event=on_event,
        ) as ckpt:
            for _ in range(n):
                await self.schedule(ckpt)
                self.schedules += 1
        for pid in self.pids:
            assert not _alive(pid), f"daemon {pid} outlived its checkpointer (seed {self.seed})"
        assert _memfds() == memfds, f"memfd leaked (seed {self.seed})"
        assert _fds() <= fds + 2, f"fds {fds} -> {_fds()} (seed {self.seed})"
        left = {
            t
            for t in threading.enumerate()
            if not t.name.startswith(("AnyIO", "asyncio")) and t not in threads
        }
        assert not left, f"threads left: {left} (seed {self.seed})"

    def fault_here(self) -> bool:
        """Faults hit one rank, chosen by the shared random stream."""
        return self.rng.randrange(self.world) == self.rank

    async def schedule(self, ckpt: aiodcp.AsyncCheckpointer) -> None:
        handles: list[tuple[aiodcp.SaveHandle, dict[str, torch.Tensor]]] = []
        async with anyio.create_task_group() as tg:
            for _ in range(self.rng.randint(3, 6)):
                op = self.rng.choices(
                    ["save", "prepare", "cancel", "await", "wait", "kill", "stop", "sleep"],
                    weights=[10, 2, 2, 3, 1, 0.35, 0.5, 2],
                )[0]
                if op == "save":
                    values = self.state()
                    overlap = self.rng.random() < 0.4
                    handle = await ckpt.save(values, overlap=overlap)
                    handles.append((handle, {k: v.clone() for k, v in values.items()}))
                    self.stats["saves"] += 1
                elif op == "prepare":
                    await ckpt.prepare(self.state())
                elif op == "cancel" and handles:
                    handle = self.rng.choice(handles)[0]
                    if self.fault_here() or self.world == 1:
                        handle.cancel()
                elif op == "await" and handles:
                    handle = self.rng.choice(handles)[0]
                    with anyio.fail_after(BOUND):
                        try:
                            await handle
                        except CheckpointError:
                            pass
                elif op == "wait":
                    with anyio.fail_after(BOUND):
                        try:
                            await ckpt.wait()
                        except CheckpointError:
                            pass
                elif op == "kill":
                    pid = ckpt.worker_pid
                    if self.fault_here() and pid is not None:
                        os.kill(pid, signal.SIGKILL)
                        self.stats["kills"] += 1
                elif op == "stop":
                    pid = ckpt.worker_pid
                    here, seconds = self.fault_here(), self.rng.uniform(0.02, 0.3)
                    if here and pid is not None:
                        tg.start_soon(self.stop_for_a_while, pid, seconds)
                else:
                    await anyio.sleep(self.rng.uniform(0, 0.05))
                if ckpt.worker_pid is not None:
                    self.pids.add(ckpt.worker_pid)
        await self.settle(ckpt, handles)

    async def stop_for_a_while(self, pid: int, seconds: float) -> None:
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return
        self.stats["stops"] += 1
        try:
            await anyio.sleep(seconds)
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    async def settle(
        self,
        ckpt: aiodcp.AsyncCheckpointer,
        handles: list[tuple[aiodcp.SaveHandle, dict[str, torch.Tensor]]],
    ) -> None:
        fresh: list[int] = []
        for handle, values in handles:
            t0 = time.monotonic()
            try:
                with anyio.fail_after(BOUND):
                    result = await handle
            except CheckpointError:
                self.stats["failed"] += 1
                continue
            except TimeoutError:
                raise AssertionError(
                    f"handle of step {handle.step} unresolved after {BOUND}s (seed {self.seed}, "
                    f"schedule {self.schedules})"
                ) from None
            assert time.monotonic() - t0 < BOUND
            assert not result.skipped
            self.committed[result.step] = values
            fresh.append(result.step)
            self.stats["committed"] += 1
        try:
            await ckpt.wait()
        except CheckpointError:
            pass
        if self.world > 1:  # a step's outcome is the same on every rank
            outcomes = await anyio.to_thread.run_sync(_gather, fresh)
            assert all(o == outcomes[0] for o in outcomes), (
                f"ranks disagree on committed steps: {outcomes} (seed {self.seed}, "
                f"schedule {self.schedules})"
            )
        listed = set(await ckpt.steps())
        assert listed <= set(self.committed), (
            f"listed but never committed: {sorted(listed - set(self.committed))} "
            f"(seed {self.seed}, schedule {self.schedules})"
        )
        for step in fresh:
            assert step in listed, f"committed step {step} not listed (seed {self.seed})"
            expected = self.committed[step]
            out = {k: torch.full_like(v, -1.0) for k, v in expected.items()}
            await ckpt.load(out, step=step)
            for k in expected:
                assert torch.equal(out[k], expected[k]), (
                    f"step {step} tensor {k} differs from what was saved (seed {self.seed})"
                )


def _gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--seed", type=int, default=int(os.environ.get("AIODCP_TORTURE_SEED", 1)))
    parser.add_argument("--schedules", type=int, default=200)
    parser.add_argument("--backend", default="asyncio")
    parser.add_argument("--verbose", action="store_true", help="show aiodcp's log lines")
    args = parser.parse_args()
    if not args.verbose:  # the faults are on purpose: their warnings are noise here
        logging.getLogger("aiodcp").setLevel(logging.CRITICAL)
    rank, world = 0, 1
    if "RANK" in os.environ:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ.get("AIODCP_TORTURE_DUMP", 1e9)))
    torture = Torture(Path(args.root), args.seed, rank, world)
    print(f"torture seed {args.seed} rank {rank}/{world}", flush=True)
    t0 = time.monotonic()
    try:
        anyio.run(torture.run, args.schedules, backend=args.backend)
    finally:
        for pid in torture.pids:  # never leave a stopped daemon behind
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    print(
        f"OK {torture.schedules} schedules in {time.monotonic() - t0:.0f}s, seed {args.seed}, "
        f"rank {rank}: {torture.stats}",
        flush=True,
    )
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    sys.exit(0)


if __name__ == "__main__":
    main()
