"""Following commits: watch() in-process and across processes, hold() against retention."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest
import torch

import aiodcp
from aiodcp._parent import _watch

pytestmark = pytest.mark.asyncio


async def test_watch_yields_each_new_commit_in_order(root: Path) -> None:
    seen: list[int] = []
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        await (await ckpt.save({"x": torch.ones(2)}))  # present before watching

        async def follow() -> None:
            async for step in ckpt.watch(include_latest=True):
                seen.append(step)
                if step == 3:
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            await anyio.sleep(0.1)
            for _ in range(3):
                await (await ckpt.save({"x": torch.ones(2)}))
    assert seen == [0, 1, 2, 3]


WRITER = """
import asyncio, sys, torch, aiodcp
async def main():
    async with aiodcp.AsyncCheckpointer(sys.argv[1], keep_last=2) as ckpt:
        for i in range(20):
            await (await ckpt.save({"x": torch.full((100,), float(i))}))
asyncio.run(main())
"""


LOADED_AT_LEAST = 3


async def test_watcher_in_another_process_sees_every_commit(root: Path) -> None:
    """A separate writer process makes 20 commits; this process sees each, each loadable."""
    await anyio.to_thread.run_sync(lambda: root.mkdir(parents=True))
    seen: list[int] = []
    loaded: list[int] = []
    async with anyio.create_task_group() as tg:

        async def follow() -> None:
            with anyio.fail_after(120):
                async for step in aiodcp.watch(root):
                    seen.append(step)
                    try:  # the writer keeps 2: a step may already be gone, never partial
                        async with aiodcp.hold(root, step):
                            out = {"x": torch.zeros(100)}
                            await aiodcp.load(out, root, step=step)
                            assert torch.equal(out["x"], torch.full((100,), float(step)))
                            loaded.append(step)
                    except aiodcp.CheckpointNotFoundError:
                        assert step != 19  # the writer's last step is never deleted
                    if step == 19:
                        return

        tg.start_soon(follow)
        await anyio.sleep(0.2)
        await anyio.run_process([sys.executable, "-c", WRITER, str(root)])
    assert seen == list(range(20))
    print(f"loaded {len(loaded)} of 20 steps under hold: {loaded}")
    assert loaded[-1] == 19 and len(loaded) >= LOADED_AT_LEAST, loaded


async def _until_steps(ckpt: aiodcp.AsyncCheckpointer, expected: list[int]) -> None:
    """Retention runs right after a commit resolves its handle: give it a moment."""
    with anyio.fail_after(10):
        while await ckpt.steps() != expected:  # noqa: ASYNC110
            await anyio.sleep(0.02)


async def test_hold_keeps_a_step_through_keep_last_1(root: Path) -> None:
    """A slow reader holding the latest step: retention with keep_last=1 spares it."""
    async with aiodcp.AsyncCheckpointer(root, keep_last=1) as ckpt:
        await (await ckpt.save({"x": torch.zeros(10)}))
        async with aiodcp.hold(root, 0):
            await (await ckpt.save({"x": torch.ones(10)}))
            await (await ckpt.save({"x": torch.ones(10)}))
            await _until_steps(ckpt, [0, 2])
            out = {"x": torch.ones(10)}
            await aiodcp.load(out, root, step=0)
            assert torch.equal(out["x"], torch.zeros(10))
        await (await ckpt.save({"x": torch.ones(10)}))
        await _until_steps(ckpt, [3])


async def test_standalone_load_needs_no_daemon(root: Path) -> None:
    with pytest.raises(aiodcp.CheckpointNotFoundError):
        await aiodcp.load({"x": torch.zeros(1)}, root)


async def test_watch_polls_where_inotify_is_missing(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without inotify (an old kernel, some network filesystems) watch() polls every
    poll_interval: a writer in another process (no in-process wake-up) is still seen,
    each commit once, in order."""
    calls: list[Path] = []

    def no_inotify(path: Path) -> None:
        calls.append(path)
        return None

    monkeypatch.setattr(_watch, "_inotify", no_inotify)
    await anyio.to_thread.run_sync(lambda: root.mkdir(parents=True))
    seen: list[int] = []
    async with anyio.create_task_group() as tg:

        async def follow() -> None:
            with anyio.fail_after(120):
                async for step in aiodcp.watch(root, poll_interval=0.05):
                    seen.append(step)
                    if step == 2:
                        return

        tg.start_soon(follow)
        await anyio.sleep(0.2)
        code = WRITER.replace("range(20)", "range(3)")
        await anyio.run_process([sys.executable, "-c", code, str(root)])
    assert calls and seen == [0, 1, 2]
