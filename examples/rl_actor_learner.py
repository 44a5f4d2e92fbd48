"""RL-style actor/learner: the learner publishes every policy; actor processes follow it.

    python examples/rl_actor_learner.py --root rl-checkpoints --actors 2 --updates 60

The learner publishes its policy after every update (``ckpt.publish``: shared memory,
no disk) and checkpoints it every few updates (``save(..., publish=True)``: the same
staged bytes go to disk and to the actors), keeping the last 3 checkpoints. Each actor
is a separate process that follows with ``aiodcp.follow``: it gets the newest version,
leased while it copies it (never a torn or half-written one), and skips versions it was
too slow for. Halfway through, the learner SIGKILLs actor 0 and starts it again: its
lease is released by itself and the new process picks up the newest version. Run it
again in the same place and the learner resumes from its last checkpoint (an actor that
starts before the learner's publisher is up reads that checkpoint from disk first: the
same loop works for an actor on another host).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import torch

import aiodcp


def make_policy() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))


async def actor(index: int, root: str, final: int) -> None:
    policy = make_policy()
    state = {"policy": policy, "version": -1}
    acted = 0
    async with aiodcp.follow(root, poll_interval=0.1) as versions:  # memory, else disk
        async for version in versions:
            async with version:  # leased: the learner keeps it until we are done copying
                await version.copy_into(state)
            assert state["version"] == version.number, "an actor saw a policy not its own"
            with torch.no_grad():
                action = policy(torch.ones(1, 8)).argmax().item()
            acted += 1
            print(
                f"actor {index}: acting with policy version {version.number} "
                f"(from {version.source}, action {action})",
                flush=True,
            )
            if version.number >= final:
                break
    print(f"actor {index}: done after {acted} policy versions", flush=True)


async def spawn_actor(root: str, index: int, final: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--root", root, "--actor", str(index), "--final", str(final)
    )


async def learner(root: str, n_actors: int, updates: int, every: int) -> None:
    torch.manual_seed(0)
    policy = make_policy()
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    async with aiodcp.AsyncCheckpointer(root, keep_last=3) as ckpt:
        try:  # run again: resume from the last checkpoint
            start = await ckpt.load({"policy": policy}) + 1
        except aiodcp.CheckpointNotFoundError:
            start = 0
        final = start + updates - 1
        # The ring: the latest version and those actors hold; a publish waits for a place.
        publisher = await ckpt.publisher(ring=n_actors + 1, when_full="wait")
        actors = [await spawn_actor(root, i, final) for i in range(n_actors)]
        while publisher.readers < n_actors:  # noqa: ASYNC110  (let them connect first)
            await asyncio.sleep(0.05)
        for update in range(start, final + 1):
            obs = torch.randn(64, 8)
            loss = policy(obs).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            state = {"policy": policy, "version": update}
            if update % every == 0 or update == final:  # a checkpoint, published as well
                await ckpt.save(state, step=update, publish=True)
                print(f"learner: checkpointed and published policy version {update}", flush=True)
            else:
                await ckpt.publish(state, version=update)
            if update == start + updates // 2 and actors:  # an actor dies and comes back
                actors[0].send_signal(signal.SIGKILL)
                await actors[0].wait()
                actors[0] = await spawn_actor(root, 0, final)
                print(f"learner: actor 0 killed at version {update} and restarted", flush=True)
            await asyncio.sleep(0.02)  # environment interaction, RPCs, ...
        await ckpt.wait()
        codes = [await a.wait() for a in actors]  # the publisher serves until they are done
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
    parser.add_argument("--final", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.actor is not None:
        asyncio.run(actor(args.actor, args.root, args.final))
    else:
        asyncio.run(learner(args.root, args.actors, args.updates, args.every))


main()
