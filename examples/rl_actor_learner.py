"""RL-style actor/learner: the learner publishes checkpoints; actor processes follow them.

    python examples/rl_actor_learner.py --root rl-checkpoints --actors 2 --updates 60

The learner trains and saves every few updates (keeping the last 3). Each actor is a
separate process that follows new commits with ``aiodcp.watch``, holds the step while
loading (so retention cannot delete it mid-read) and acts with the newest policy. An actor
only ever sees committed checkpoints: the version stored inside always matches the step.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import torch

import aiodcp


def make_policy() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))


async def actor(index: int, root: str, final_step: int) -> None:
    policy = make_policy()
    acted = 0
    async for step in aiodcp.watch(root, include_latest=True):
        try:
            async with aiodcp.hold(root, step):
                state = {"policy": policy, "version": -1}
                await aiodcp.load(state, root, step=step)
        except aiodcp.CheckpointNotFoundError:
            continue  # retention removed it before we got to it; a newer one follows
        assert state["version"] == step, "an actor saw a checkpoint that is not what it claims"
        with torch.no_grad():
            action = policy(torch.ones(1, 8)).argmax().item()
        acted += 1
        print(f"actor {index}: acting with policy version {step} (action {action})", flush=True)
        if step >= final_step:
            break
    print(f"actor {index}: done after {acted} policy versions", flush=True)


async def learner(root: str, n_actors: int, updates: int, every: int) -> None:
    torch.manual_seed(0)
    policy = make_policy()
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    async with aiodcp.AsyncCheckpointer(root, keep_last=3) as ckpt:
        try:  # run again: resume from the last published policy
            start = await ckpt.load({"policy": policy}) + 1
        except aiodcp.CheckpointNotFoundError:
            start = 0
        final_step = (start + updates - 1) // every * every
        actors = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--root",
                root,
                "--actor",
                str(i),
                "--final-step",
                str(final_step),
            )
            for i in range(n_actors)
        ]
        await asyncio.sleep(3)  # let the actors start watching (they would catch up anyway)
        for update in range(start, start + updates):
            obs = torch.randn(64, 8)
            loss = policy(obs).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if update % every == 0:
                await ckpt.save({"policy": policy, "version": update}, step=update)
                print(f"learner: published policy version {update}", flush=True)
            await asyncio.sleep(0.02)  # environment interaction, RPCs, ...
        await ckpt.wait()
        codes = [await a.wait() for a in actors]
    print(f"learner: done; actors exited with {codes}", flush=True)
    if any(codes):
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="rl-checkpoints")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--actor", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--final-step", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.actor is not None:
        asyncio.run(actor(args.actor, args.root, args.final_step))
    else:
        asyncio.run(learner(args.root, args.actors, args.updates, args.every))


main()
