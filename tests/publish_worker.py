"""Processes for tests/test_publish.py: a learner that publishes, a reader that follows.

Every tensor of version ``v`` holds the value ``v`` everywhere, so a reader checks
that each version it sees is whole: one torn or half-written version would show
two values (or a value that is not its number).

    python publish_worker.py learner ROOT VERSIONS INTERVAL [linger-seconds]
    python publish_worker.py reader ROOT [hold-seconds] [stop-at] [hold-forever]

Each line printed is one event: ``published N``, ``holding N``, ``ok N``,
``gone``, ``end``. ``AIODCP_TEST_LOOP=trio`` or ``uvloop`` runs it on that loop.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio
import torch

import aiodcp

SHAPES = [(64, 1024), (1024,), (3, 5, 7), (256, 1024), (1,)]


def state(value: float) -> dict[str, object]:
    return {
        "model": {f"t{i}": torch.full(s, value, dtype=torch.float64) for i, s in enumerate(SHAPES)},
        "meta": {"version": int(value), "lr": [value]},
    }


async def learner(root: str, versions: int, interval: float, linger: float) -> None:
    sd = state(0.0)
    async with aiodcp.Publisher(root, ring=3, when_full="wait") as pub:
        for v in range(versions):
            for t in sd["model"].values():  # type: ignore[union-attr]
                t.fill_(float(v))
            sd["meta"] = {"version": v, "lr": [float(v)]}
            n = await pub.publish(sd, version=v)
            print(f"published {n}", flush=True)
            await anyio.sleep(interval)
        await anyio.sleep(linger)  # readers take the last version before it closes


async def reader(root: str, hold: float, stop_at: int, hold_forever: bool) -> None:
    mine = state(-1.0)
    try:
        async with aiodcp.follow(root, source="memory", poll_interval=0.05) as versions:
            async for version in versions:
                async with version:
                    n = version.number
                    views = version.state_dict()
                    for t in views["model"].values():  # type: ignore[union-attr]
                        if not bool((t == n).all()):
                            print(f"torn {n}: {sorted(set(t.flatten().tolist()))[:5]}", flush=True)
                            raise SystemExit(3)
                    if hold_forever:
                        print(f"holding {n}", flush=True)
                        await anyio.sleep(3600)
                    await anyio.sleep(hold)
                    await version.copy_into(mine)
                    for t in mine["model"].values():  # type: ignore[union-attr]
                        if not bool((t == n).all()):
                            print(f"torn copy {n}", flush=True)
                            raise SystemExit(3)
                    if mine["meta"] != {"version": n, "lr": [float(n)]}:
                        print(f"wrong meta {n}: {mine['meta']}", flush=True)
                        raise SystemExit(3)
                    print(f"ok {n}", flush=True)
                if n >= stop_at:
                    break
    except aiodcp.PublisherGoneError:
        print("gone", flush=True)
        return
    print("end", flush=True)


def main() -> None:
    mode, root, *rest = sys.argv[1:]
    loop = os.environ.get("AIODCP_TEST_LOOP", "asyncio")
    options: dict[str, Any] = {"backend": "trio" if loop == "trio" else "asyncio"}
    if loop == "uvloop":
        import uvloop

        options["backend_options"] = {"loop_factory": uvloop.new_event_loop}
    if mode == "learner":
        anyio.run(
            learner,
            root,
            int(rest[0]),
            float(rest[1]),
            float(rest[2]) if len(rest) > 2 else 0,
            **options,
        )
    else:
        hold = float(rest[0]) if rest else 0.0
        stop_at = int(rest[1]) if len(rest) > 1 else 1 << 62
        anyio.run(reader, root, hold, stop_at, len(rest) > 2, **options)


if __name__ == "__main__":
    main()
