"""Two (or more) ranks, each with its own daemon: launch with torchrun.

    torchrun --nproc-per-node 2 examples/multirank_torchrun.py --root multirank-checkpoints

Run again, it resumes from the latest step.

Each rank holds one shard of a DTensor; the checkpoint is one DCP directory that any
number of ranks (or a single process with plain ``dcp.load``) can read back.
"""

from __future__ import annotations

import argparse
import asyncio

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import aiodcp


async def main(root: str, steps: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    weight = distribute_tensor(torch.zeros(world * 4, 8), mesh, [Shard(0)])
    bias = distribute_tensor(torch.zeros(8), mesh, [Replicate()])
    async with aiodcp.AsyncCheckpointer(root, keep_last=2) as ckpt:  # default process group
        try:  # run again: resume from the latest step
            start = await ckpt.load({"weight": weight, "bias": bias}) + 1
        except aiodcp.CheckpointNotFoundError:
            start = 0
        for step in range(start, start + steps):
            weight.to_local().add_(1.0)  # "training"
            bias.to_local().add_(0.5)
            handle = await ckpt.save({"weight": weight, "bias": bias, "step": step}, step=step)
            result = await handle
            if rank == 0:
                print(
                    f"step {result.step}: {result.nbytes} bytes from rank 0, "
                    f"stall {result.stage_seconds * 1e3:.1f} ms, "
                    f"persist {result.persist_seconds * 1e3:.1f} ms"
                )
        fresh = {"weight": distribute_tensor(torch.zeros(world * 4, 8), mesh, [Shard(0)])}
        loaded = await ckpt.load(fresh)
        assert torch.equal(fresh["weight"].to_local(), weight.to_local())
        if rank == 0:
            print(f"rank 0 reloaded step {loaded}; committed: {await ckpt.steps()}")


parser = argparse.ArgumentParser()
parser.add_argument("--root", default="torchrun-example-checkpoints")
parser.add_argument("--steps", type=int, default=3)
args = parser.parse_args()
dist.init_process_group("gloo")
asyncio.run(main(args.root, args.steps))
dist.destroy_process_group()
