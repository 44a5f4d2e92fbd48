"""The copy into a staging slot has one owner until it has stopped, whatever cancels the
caller: asyncio's own ``task.cancel()``, ``asyncio.timeout``, ``wait_for``, anyio scopes."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import aiodcp
from aiodcp._staging import _arena

pytestmark = pytest.mark.asyncio

N = 1 << 20  # 4 MiB of float32 per tensor


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"a": torch.full((N,), value), "b": torch.full((N // 2,), value)}


def _memfds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += "aiodcp-skeleton" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return n


@pytest.fixture
def slow_first_copy(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The first copy into an arena sleeps 0.4 s before copying (a big state's copy);
    the later ones copy at once, and the daemon takes 0.5 s per tensor it writes (so a
    stray copy would land while the next save persists). Set when the slow copy has
    written its bytes."""
    monkeypatch.setenv("AIODCP_TEST_SLOW_WRITE", "0.5")
    real = _arena.Arena.stage
    calls = [0]
    wrote = threading.Event()

    def stage(self: _arena.Arena, flat: Any, **kw: Any) -> None:
        calls[0] += 1
        if calls[0] == 1:
            time.sleep(0.4)
            real(self, flat, **kw)
            wrote.set()
            return
        real(self, flat, **kw)

    monkeypatch.setattr(_arena.Arena, "stage", stage)
    return wrote


async def _cancel_natively(how: str, coro: Any) -> None:
    if how == "task.cancel":
        task = asyncio.ensure_future(coro)
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    elif how == "wait_for":
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(coro, 0.1)
    elif how == "asyncio.timeout":
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await coro
    else:
        with anyio.move_on_after(0.1):
            await coro


@pytest.mark.parametrize("how", ["task.cancel", "wait_for", "asyncio.timeout", "anyio"])
async def test_a_cancelled_copy_never_writes_into_another_save(
    root: Path, slow_first_copy: threading.Event, how: str
) -> None:
    """Cancelling save() mid-copy (each framework's own way) aborts that save; the next save
    of the same layout commits exactly its own values -- the cancelled copy keeps the slot
    until it has stopped, so it can never write into the arena another save persists."""
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        await _cancel_natively(how, ckpt.save(_state(1.0), step=1))
        handle = await ckpt.save(_state(2.0), step=2)
        await handle
        assert await ckpt.steps() == [2]
        out = _state(-1.0)
        await ckpt.load(out, step=2, verify=True)
        for k, v in out.items():
            assert torch.equal(v, torch.full_like(v, 2.0)), (
                f"{k}: {(v != 2.0).sum().item()} values from the cancelled save were committed"
            )
    assert slow_first_copy.is_set()


async def test_a_cancelled_copy_leaks_no_skeleton_and_restores_the_collector(
    root: Path, slow_first_copy: threading.Event
) -> None:
    """After a natively cancelled save and the close, no skeleton memfd is left open and
    the cyclic garbage collector runs again."""
    assert gc.isenabled()
    before = _memfds()
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        await _cancel_natively("task.cancel", ckpt.save(_state(1.0), step=1))
        await ckpt.wait()
        assert slow_first_copy.is_set()  # wait() covers the cancelled copy too
        assert gc.isenabled()
    assert _memfds() == before
    assert gc.isenabled()
