"""A reader never sees two checkpoints at once: a load that spans an ``overwrite=True``
commit of the same step reads the old step or the new one whole."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import aiodcp

pytestmark = pytest.mark.asyncio


def trash(root: Path) -> list[str]:
    return [n for n in os.listdir(root) if n.startswith(".trash-")]


def state(value: float) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((250_000,), value) for i in range(8)}


async def test_loads_during_overwrites_never_mix_two_steps(root: Path) -> None:
    """Overwrite step 0 again and again while loading it: every load holds one save's
    values in every tensor (it used to read the old .metadata and the new files, or the
    reverse: [6.0, 7.0] in one load), and the old step is gone once nobody reads it."""
    loads = 0
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        await (await ckpt.save(state(0), step=0))
        for value in range(1, 12):
            handle = await ckpt.save(state(value), step=0, overwrite=True)
            while not handle.done():
                out = state(-1)
                await ckpt.load(out, step=0)
                loads += 1
                seen = sorted(
                    {float(t[0]) for t in out.values()} | {float(t[-1]) for t in out.values()}
                )
                assert len(seen) == 1 and seen[0] in (value - 1, value), f"mixed load: {seen}"
            await handle
        out = state(-1)
        await ckpt.load(out, step=0, verify=True)
        assert all(float(t[0]) == 11 for t in out.values())
    assert loads > 0
    assert not trash(root)


async def test_an_overwritten_step_a_reader_holds_waits_in_the_trash(root: Path) -> None:
    """The old directory of an overwritten step stays (as .trash-step_N-*) while a reader
    holds the step, and goes at the next clean-up after the lease ends."""
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        await (await ckpt.save(state(1), step=0))
        async with aiodcp.hold(root, 0):
            await (await ckpt.save(state(2), step=0, overwrite=True))
            assert len(trash(root)) == 1
        await (await ckpt.save(state(3), step=0, overwrite=True))
        assert not trash(root)
