"""Train a small MLP in an async loop, checkpointing every N steps while training goes on.

Run it twice: the second run says "resumed from step N" and continues from there.

    python examples/async_training_loop.py --root checkpoints --steps 200
"""

from __future__ import annotations

import argparse
import asyncio

import torch

import aiodcp


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="checkpoints")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, w = torch.randn(4096, 64), torch.randn(64, 1)
    y = x @ w
    state = {"model": model, "optim": opt}  # nn.Module and Optimizer are Stateful

    async with aiodcp.AsyncCheckpointer(args.root, keep_last=3) as ckpt:
        start = 0
        try:
            start = await ckpt.load(state) + 1
            print(f"resumed from step {start - 1}")
        except aiodcp.CheckpointNotFoundError:
            print("no checkpoint yet: starting from scratch")
        pending: list[aiodcp.SaveHandle] = []
        for step in range(start, start + args.steps):
            idx = torch.randint(0, len(x), (256,))
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % args.every == 0:
                handle = await ckpt.save(state, step=step)  # returns once staged
                pending.append(handle)
            for h in [h for h in pending if h.done()]:
                r = await h
                print(
                    f"step {r.step:>5}: loss {loss.item():.4f}"
                    f"  stall {r.stage_seconds * 1e3:.1f} ms"
                    f"  persist {r.persist_seconds * 1e3:.1f} ms (training went on meanwhile)"
                )
                pending.remove(h)
            await asyncio.sleep(0)  # a real loop would await data, RPCs, ...
        await ckpt.wait()  # the last saves are committed
        print(f"done at step {step}; committed steps kept: {await ckpt.steps()}")


asyncio.run(main())
