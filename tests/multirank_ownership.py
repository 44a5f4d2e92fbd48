"""Run by torchrun with 2 ranks (see test_multirank.py): issue 10's multi-rank observations
and issue 11's 2-rank scale. Prints 'OK <scenario>' per pass (rank 0)."""

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import anyio
import torch
import torch.distributed as dist

import aiodcp
from aiodcp._wire._protocol import MAX_HEADER

root = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()


def ok(name: str) -> None:
    dist.barrier()
    if rank == 0:
        print(f"OK {name}", flush=True)


def gather(obj: object) -> list:
    out = [None, None]
    dist.all_gather_object(out, obj)
    return out


def state(value: float, n: int = 6) -> dict:
    return {f"t{i}": torch.full((1000,), value + i) for i in range(n)}


async def load_equal(ckpt: aiodcp.AsyncCheckpointer, expected: dict, step: int) -> None:
    out = {k: torch.empty_like(v) for k, v in expected.items()}
    assert await ckpt.load(out, step=step) == step
    for k in expected:
        assert torch.equal(out[k], expected[k]), (step, k)


stopped: list[int] = []


async def main() -> None:
    try:
        await scenarios()
    finally:
        for pid in stopped:  # never leave a stopped daemon behind, even on failure
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


async def scenarios() -> None:
    async with aiodcp.AsyncCheckpointer(root + "/a", shutdown_timeout=2) as ckpt:
        # obs 5: one rank's daemon dies while idle; every rank decides together, at
        # the next save, to restart; the trainer's own collectives stay in step.
        await (await ckpt.save(state(1.0), step=0))
        before = ckpt.worker_pid
        if rank == 1:
            os.kill(before, signal.SIGKILL)
            with anyio.fail_after(30):
                while ckpt.worker_pid is not None:  # noqa: ASYNC110  (the parent saw it die)
                    await asyncio.sleep(0.01)
        dist.barrier()
        result = await (await ckpt.save(state(2.0), step=1))
        assert result.step == 1
        pids = gather((before, ckpt.worker_pid))
        assert all(b != a for b, a in pids), pids  # both ranks restarted, together
        t = torch.ones(1)
        dist.all_reduce(t)  # the trainer's group is not desynchronised
        assert t.item() == 2
        await load_equal(ckpt, state(2.0), 1)
        ok("idle-death-restarts-every-rank")

        # obs 13 + obs 4: rank 1's daemon gets SIGTERM mid-save: rank 0 sees a failure
        # (never "cancelled"), rank 1 a death. Rank 0 then SIGSTOPs its own exiting old
        # daemon (a late exit); the next save's handles belong to new daemons and commit
        # exactly the values saved.
        os.environ["AIODCP_TEST_SLOW_WRITE"] = "0.1"
        handle = await ckpt.save(state(3.0), step=2)  # old daemons: no slow writes
        await handle
        # restart daemons with slow writes: kill rank 1's, the agreement restarts both
        if rank == 1:
            os.kill(ckpt.worker_pid, signal.SIGKILL)
            while ckpt.worker_pid is not None:  # noqa: ASYNC110  (the parent saw it die)
                await asyncio.sleep(0.01)
        dist.barrier()
        handle = await ckpt.save(state(4.0, n=40), step=3)  # ~2 s of slow writes
        victim = ckpt.worker_pid
        if rank == 1:
            await asyncio.sleep(0.3)
            os.kill(victim, signal.SIGTERM)
        kind = "none"
        try:
            await handle
        except aiodcp.CheckpointCancelledError:
            kind = "cancelled"
        except aiodcp.WorkerDiedError:
            kind = "died"
        except aiodcp.SaveFailedError as exc:
            kind = "failed"
            assert "rank" in str(exc), exc
            try:
                os.kill(victim, signal.SIGSTOP)  # its exit comes late (or never)
                stopped.append(victim)
            except ProcessLookupError:
                pass
        kinds = gather(kind)
        assert kinds == ["failed", "died"], kinds
        del os.environ["AIODCP_TEST_SLOW_WRITE"]
        dist.barrier()
        t0 = time.perf_counter()
        result = await (await ckpt.save(state(5.0), step=4))
        assert time.perf_counter() - t0 < 30
        assert result.step == 4 and 3 not in await ckpt.steps()
        await load_equal(ckpt, state(5.0), 4)
        ok("peer-death-is-a-failure-and-old-generations-are-fenced")

        # issue 11: 10,000 tensors on 2 ranks, bit-exact; their names alone are 4x the
        # largest frame header, so no message may carry them (the 100k-tensor single-rank
        # scale is tests/test_scale.py; each tensor costs ~1 ms to save and load here)
        names = [f"layers.{i:05d}.mlp.up_proj.weight" for i in range(10_000)]
        many = {name: torch.full((4,), float(i)) for i, name in enumerate(names)}
        assert sum(map(len, many)) > 4 * MAX_HEADER
        await (await ckpt.save(many, step=5))
        await load_equal(ckpt, many, 5)
        ok("ten-thousand-tensors")

        # issue 9: a state dict that does not fit is the same typed error on every rank
        wrong = {k: torch.zeros(v.shape) for k, v in state(5.0).items()}
        wrong["t0"] = torch.zeros(7)  # another shape
        wrong["extra"] = torch.zeros(1)  # a key the checkpoint lacks
        try:
            await ckpt.load(wrong, step=4)
            raise AssertionError("should not load")
        except aiodcp.CheckpointMismatchError as exc:
            message = str(exc)
            assert exc.missing == ("extra",) and "t0" in exc.mismatched, exc
        messages = gather(message)
        assert messages[0] == messages[1], messages
        ok("mismatch-is-typed-on-every-rank")

    # obs 14: the agreement waits in a thread the caller can cancel, bounded by
    # collective_timeout, with typed errors; rank 1 never comes to these saves.
    gave_up = Path(root) / "rank0-gave-up"
    async with aiodcp.AsyncCheckpointer(root + "/b", collective_timeout=3) as ckpt:
        if rank == 0:
            t0 = time.perf_counter()
            try:
                with anyio.fail_after(1.5):
                    await ckpt.save(state(1.0))
                raise AssertionError("should have timed out")
            except TimeoutError:
                assert time.perf_counter() - t0 < 3, time.perf_counter() - t0
            t0 = time.perf_counter()
            try:
                await ckpt.save(state(1.0))
                raise AssertionError("should have failed")
            except aiodcp.CheckpointError as exc:
                assert "timed out" in str(exc), exc
                assert time.perf_counter() - t0 < 10
            gave_up.touch()
        else:  # (no collective here: rank 0 is in the agreement) until rank 0 gave up
            with anyio.fail_after(60):
                while not gave_up.exists():  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        ok("agreement-is-cancellable-and-bounded")


asyncio.run(main())
dist.destroy_process_group()
