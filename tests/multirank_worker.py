"""Run by torchrun with 2 ranks (see test_multirank.py). Prints 'OK <scenario>' per pass.

Deliberately has no ``if __name__ == "__main__":`` guard: the daemons never re-import it.
"""

import asyncio
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import aiodcp

root, one_rank_root, mode = sys.argv[1], sys.argv[2], sys.argv[3]
prefix = mode == "prefix"
dist.init_process_group("gloo")
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (2,))
FULL = torch.arange(64.0).reshape(8, 8)


def ok(name: str) -> None:
    dist.barrier()
    if rank == 0:
        print(f"OK {name}", flush=True)


async def main() -> None:
    # the daemon reads this once, when it starts: 0.1 s before each write item, so that the
    # cancel below lands before the commit point (it is read by no daemon started later)
    os.environ["AIODCP_TEST_SLOW_WRITE"] = "0.1"
    async with aiodcp.AsyncCheckpointer(root, use_prefix_store=prefix, keep_last=2) as ckpt:
        del os.environ["AIODCP_TEST_SLOW_WRITE"]
        pids = [None, None]
        dist.all_gather_object(pids, ckpt.worker_pid)
        assert None not in pids and pids[0] != pids[1], pids

        # a DTensor sharded over both ranks plus a replicated plain tensor
        state = {
            "dt": distribute_tensor(FULL, mesh, [Shard(0)]),
            "rep": torch.full((3,), 5.0),
            "meta": {"epoch": 7},
        }
        result = await (await ckpt.save(state, step=0))
        assert result.step == 0 and result.path.name == "step_0"
        dist.barrier()
        if rank == 0:  # plain DCP on one rank reads the global tensor
            plain = {"dt": torch.zeros(8, 8), "rep": torch.zeros(3), "meta": {"epoch": -1}}
            dcp.load(plain, checkpoint_id=result.path, no_dist=True)
            assert torch.equal(plain["dt"], FULL) and torch.equal(
                plain["rep"], torch.full((3,), 5.0)
            )
            assert plain["meta"]["epoch"] == 7
        ok("dtensor-save-plain-load")

        target = {
            "dt": distribute_tensor(torch.zeros(8, 8), mesh, [Shard(0)]),
            "rep": torch.zeros(3),
        }
        assert await ckpt.load(target) == 0
        assert torch.equal(target["dt"].to_local(), FULL.chunk(2)[rank])
        ok("two-rank-load")

        # a cancel on one rank cancels the step on every rank (the slow writes leave it
        # time to land before the vote, so both ranks must say cancelled)
        handle = await ckpt.save(state, step=1)
        if rank == 1:
            handle.cancel()
        try:
            await handle
            outcome = "committed"
        except aiodcp.CheckpointCancelledError:
            outcome = "cancelled"
        outcomes = [None, None]
        dist.all_gather_object(outcomes, outcome)
        assert outcomes == ["cancelled", "cancelled"], outcomes
        assert 1 not in await ckpt.steps()
        ok("cancel-agreement")

        # retention with two ranks: keep_last=2
        for step in (2, 3, 4):
            await (await ckpt.save(state, step=step))
        deadline = time.monotonic() + 10  # retention runs just after the handle resolves
        while await ckpt.steps() != [3, 4]:
            assert time.monotonic() < deadline, await ckpt.steps()
            await asyncio.sleep(0.02)
        ok("retention")

    if not prefix:
        # a daemon killed on one rank fails that step on every rank (no hang); then both
        # ranks start fresh daemons together and the next save works
        os.environ["AIODCP_TEST_SLOW_WRITE"] = "0.3"  # read by daemons spawned from now on
        async with aiodcp.AsyncCheckpointer(root + "-kill") as ckpt:
            big = {f"t{i}": torch.full((1000,), float(i)) for i in range(6)}
            before = ckpt.worker_pid
            handle = await ckpt.save(big, step=0)
            if rank == 1:
                await asyncio.sleep(0.5)
                os.kill(before, 9)
            t0 = time.perf_counter()
            try:
                await handle
                raise AssertionError("the step should have failed")
            except aiodcp.WorkerDiedError:
                assert rank == 1
            except aiodcp.SaveFailedError:
                assert rank == 0
            assert time.perf_counter() - t0 < 60
            del os.environ["AIODCP_TEST_SLOW_WRITE"]  # the fresh daemons write at full speed
            dist.barrier()
            result = await (await ckpt.save(big, step=1))
            assert result.step == 1 and ckpt.worker_pid != before
            assert await ckpt.steps() == [1]
        ok("peer-daemon-death")

    # a checkpoint written by one process loads into two ranks (resharding)
    sd = {"w": distribute_tensor(torch.zeros(8, 8), mesh, [Shard(0)])}
    assert await aiodcp.load(sd, one_rank_root) == 0
    assert torch.equal(sd["w"].to_local(), FULL.chunk(2)[rank])
    ok("one-rank-into-two")

    if prefix:
        # a daemon that cannot reach its store fails start-up with a clear error, in time
        good = os.environ["MASTER_PORT"]
        os.environ["MASTER_PORT"] = "1"  # nothing listens there
        t0 = time.perf_counter()
        try:
            async with aiodcp.AsyncCheckpointer(
                root + "-bad", use_prefix_store=True, init_timeout=3
            ):
                raise AssertionError("start-up should have failed")
        except aiodcp.CheckpointError as exc:
            assert time.perf_counter() - t0 < 20, time.perf_counter() - t0
            assert "initialise" in str(exc), exc
        finally:
            os.environ["MASTER_PORT"] = good
        ok("init-failure")


asyncio.run(main())
dist.destroy_process_group()
