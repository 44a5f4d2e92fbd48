"""aiodcp vs DCP ``async_save`` + ``FsspecWriter`` (s3fs) on a loopback S3 server (moto).

    python scripts/bench_s3.py --mib 128 --tensors 16 --rounds 3

Starts ``moto_server`` on 127.0.0.1 in a subprocess (so the server does not share the
trainer's GIL), then runs both methods on the same state in interleaved rounds (round r
alternates which goes first). Per save: stall (how long the call holds the caller and
its event loop), committed (until the step is durable and visible: aiodcp's marker,
DCP's future), the event loop's worst lag meanwhile, and MiB uploaded per second of
committed time. Prints medians as a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

import torch

# this checkout's aiodcp, not whichever one is installed (an aiodcp without S3 support
# would take "s3://..." for a local directory)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


class LagMeter:
    """The event loop's worst lag (a 1 ms ticker), between start() and stop()."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, time.perf_counter() - t - 0.001)

    def start(self) -> None:
        self.worst = 0.0
        self._task = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> float:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        return self.worst


async def aiodcp_round(
    ckpt: Any, state: dict[str, Any], step: int, lag: LagMeter
) -> dict[str, float]:
    lag.start()
    t0 = time.perf_counter()
    handle = await ckpt.save(state, step=step)
    stall = time.perf_counter() - t0
    await handle
    done = time.perf_counter() - t0
    return {"stall": stall, "committed": done, "lag": await lag.stop()}


async def dcp_round(
    state: dict[str, Any], url: str, bucket: str, step: int, lag: LagMeter
) -> dict[str, float]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    writer = FsspecWriter(
        f"s3://{bucket}/dcp/step_{step}",
        thread_count=2,
        client_kwargs={"endpoint_url": url},
    )
    lag.start()
    t0 = time.perf_counter()
    fut = dcp.async_save(state, storage_writer=writer, no_dist=True)  # blocks the loop
    stall = time.perf_counter() - t0
    await asyncio.wrap_future(fut)
    done = time.perf_counter() - t0
    return {"stall": stall, "committed": done, "lag": await lag.stop()}


async def run(args: argparse.Namespace, url: str) -> None:
    import boto3

    import aiodcp
    from aiodcp._disk._roots import open_store

    assert open_store("s3://bench/aiodcp").remote, "this aiodcp has no S3 support"
    bucket = "bench"
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
    n = args.tensors
    per = args.mib * (1 << 20) // 4 // n
    state = {f"t{i}": torch.randn(per) for i in range(n)}
    nbytes = per * 4 * n
    results: dict[str, list[dict[str, float]]] = {"aiodcp": [], "dcp": []}
    lag = LagMeter()
    async with aiodcp.AsyncCheckpointer(f"s3://{bucket}/aiodcp") as ckpt:
        await ckpt.prepare(state)
        for r in range(args.rounds + 1):  # round 0 warms both up and is not counted
            order = ["aiodcp", "dcp"] if r % 2 == 0 else ["dcp", "aiodcp"]
            for method in order:
                if method == "aiodcp":
                    res = await aiodcp_round(ckpt, state, r, lag)
                else:
                    res = await dcp_round(state, url, bucket, r, lag)
                print(
                    f"round {r} {method:<7} stall {res['stall']:.3f} s  committed "
                    f"{res['committed']:.2f} s  loop lag {res['lag'] * 1e3:.1f} ms",
                    flush=True,
                )
                if r > 0:
                    results[method].append(res)

    def med(method: str, key: str) -> float:
        return statistics.median(x[key] for x in results[method])

    mib = nbytes / (1 << 20)
    print()
    print(f"{n} tensors, {mib:.0f} MiB, {args.rounds} interleaved rounds, moto on loopback")
    print()
    print("| method | stall | committed | loop lag (worst) | MiB/s to committed |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for method, name in (("dcp", "DCP async_save + FsspecWriter"), ("aiodcp", "aiodcp")):
        print(
            f"| {name} | {med(method, 'stall'):.3f} s | {med(method, 'committed'):.2f} s | "
            f"{med(method, 'lag') * 1e3:.0f} ms | {mib / med(method, 'committed'):.1f} |"
        )
    print(
        f"\nratios aiodcp/DCP: stall {med('aiodcp', 'stall') / med('dcp', 'stall'):.2f}x, "
        f"committed {med('aiodcp', 'committed') / med('dcp', 'committed'):.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    proc, url = start_server()
    os.environ["AWS_ENDPOINT_URL"] = url
    os.environ.setdefault("TMPDIR", tempfile.gettempdir())
    try:
        asyncio.run(run(args, url))
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
