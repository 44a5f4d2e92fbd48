"""The disk is the truth: a daemon SIGKILLed at each sub-step of a commit leaves a root
that reconcile() brings back to agreement (steps, latest, .commits), that watch() follows
without losing or repeating a step, and where the next save picks the next step."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
import torch

import aiodcp
from aiodcp._disk import _manifest
from aiodcp._disk import _storage as s

pytestmark = pytest.mark.asyncio

POINTS = ["before_rename", "after_rename", "after_latest", "after_log"]

SAVE_ONE = """
import asyncio, sys, torch, aiodcp
async def main():
    async with aiodcp.AsyncCheckpointer(sys.argv[1]) as ckpt:
        pid = ckpt.worker_pid
        try:
            result = await (await ckpt.save({"x": torch.full((100,), 1.0)}))
            print("committed", "recovered" if result.recovered else "normally")
        except aiodcp.WorkerDiedError as exc:
            print("died", exc.step)
        # the daemon really died at the kill point (a zombie counts as dead)
        try:
            with open(f"/proc/{pid}/stat") as f:
                alive = f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            alive = False
        print("alive" if alive else "dead")
asyncio.run(main())
"""


def _state(root: Path) -> tuple[list[int], str | None, list[int], list[str]]:
    latest = root / "latest"
    logged = s.read_commits(root, 0)
    return (
        s.list_steps(root),
        latest.read_text().strip() if latest.exists() else None,
        logged[0] if logged else [],
        sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp")),
    )


@pytest.mark.parametrize("point", POINTS)
async def test_kill_at_each_commit_step_then_reconcile(root: Path, point: str) -> None:
    """SIGKILL of the daemon at `point` of committing step 1: step 1 exists iff the rename
    happened, and then the handle resolves as committed (re-read from disk); the
    checkpointer repairs latest/.commits at once; a watcher sees every committed step
    exactly once; a fresh checkpointer saves the next step."""
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        await (await ckpt.save({"x": torch.zeros(100)}))
    seen: list[int] = []
    async with anyio.create_task_group() as tg:

        async def follow() -> None:
            async for step in aiodcp.watch(root, poll_interval=0.05):
                seen.append(step)

        tg.start_soon(follow)
        await anyio.sleep(0.2)
        proc = await anyio.run_process(
            [sys.executable, "-c", SAVE_ONE, str(root)],
            check=False,
            env={**os.environ, "AIODCP_TEST_KILL_AT": point},
        )
        renamed = point != "before_rename"
        out = proc.stdout.decode().split()
        # the kill point fired (the daemon is dead), and after the rename the handle's
        # outcome was re-read from disk (recovered), not reported by the daemon
        expected = ["committed", "recovered"] if renamed else ["died", "1"]
        assert out == [*expected, "dead"], proc.stderr.decode()[-2000:]
        steps, latest, logged, tmps = await anyio.to_thread.run_sync(_state, root)
        assert steps == ([0, 1] if renamed else [0])
        # the checkpointer whose daemon died repaired the derived state at once
        assert latest == str(steps[-1]) and logged == steps
        assert tmps == []  # the script's checkpointer removed an unrenamed temporary
        assert await anyio.to_thread.run_sync(s.reconcile, root) == []  # idempotent
        if renamed:
            assert await anyio.to_thread.run_sync(s.is_committed, root, 1)
            path = s.step_dir(root, 1)
            await anyio.to_thread.run_sync(lambda: _manifest.verify(path, checksums=True))
        async with aiodcp.AsyncCheckpointer(root) as ckpt:  # cleans the leftover
            nxt = (await (await ckpt.save({"x": torch.ones(100)}))).step
        assert nxt == (2 if renamed else 1)
        with anyio.fail_after(10):
            while not seen or seen[-1] != nxt:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    assert seen == ([1, 2] if renamed else [1])
    assert await anyio.to_thread.run_sync(s.list_steps, root) == ([0, 1, 2] if renamed else [0, 1])


async def test_checkpointer_recovers_from_a_kill_after_the_rename(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the same checkpointer: the daemon dies right after renaming step 1; the handle
    resolves as committed (re-read from disk), steps() lists it, .commits has it, and
    save(step=None) goes on with step 2 (no CheckpointExistsError)."""
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        await (await ckpt.save({"x": torch.zeros(100)}))
    monkeypatch.setenv("AIODCP_TEST_KILL_AT", "after_rename")  # the daemon inherits it
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        handle = await ckpt.save({"x": torch.ones(100)})
        result = await handle
        assert result.step == 1 and result.recovered
        monkeypatch.delenv("AIODCP_TEST_KILL_AT")  # the next daemon commits normally
        assert await ckpt.steps() == [0, 1]
        logged = await anyio.to_thread.run_sync(s.read_commits, root, 0)
        assert logged is not None and logged[0] == [0, 1]
        assert (await (await ckpt.save({"x": torch.full((100,), 2.0)}))).step == 2
