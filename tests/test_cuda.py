"""CUDA staging: device tensors go through a side stream into the pinned arena.

Every test here is skipped (never counted as passing) without CUDA; run them on a
GPU machine with ``scripts/gpu_check.sh``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import aiodcp

from .test_overlap import (
    assert_tree_equal,
    backward,
    clone_tree,
    load_tree,
    mutate_now,
    snapshot,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def cuda_state(seed: int) -> dict[str, torch.Tensor]:
    """Dtypes, a non-contiguous view, an empty tensor, a CPU tensor; a second GPU if any."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    state = {
        "f32": torch.randn(1 << 20, device="cuda", generator=gen),
        "bf16": torch.randn(1024, 1024, device="cuda", generator=gen).to(torch.bfloat16),
        "i64": torch.randint(0, 1 << 40, (4096,), device="cuda", generator=gen),
        "transposed": torch.randn(512, 256, device="cuda", generator=gen).t(),
        "empty": torch.empty(0, 3, device="cuda"),
        "cpu": torch.arange(1000.0),
    }
    if torch.cuda.device_count() > 1:
        state["gpu1"] = torch.randn(1 << 18, device="cuda:1")
    return state


def arenas(ckpt: aiodcp.AsyncCheckpointer) -> list[Any]:
    """The checkpointer's staging arenas (private, for the pinning check)."""
    return [s.arena for s in ckpt._slots.slots if s.arena is not None]


def cpu_tree(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: cpu_tree(v) for k, v in value.items()}
    return value


@pytest.mark.asyncio
async def test_cuda_tensors_save_plain_and_overlapped_and_load_bit_exact_on_cpu(
    root: Path,
) -> None:
    """CUDA tensors (every dtype, non-contiguous, 2 devices when present) saved plain and
    with overlap=True load bit-exact into CPU tensors; mutation after staged() never leaks."""
    state = cuda_state(0)
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        expected0 = cpu_tree(state)
        await (await ckpt.save(state, step=0))
        for t in state.values():
            t.add_(1)  # right after save(): allowed
        expected1 = cpu_tree(state)
        handle = await ckpt.save(state, step=1, overlap=True)
        await handle.staged()
        for t in state.values():
            t.mul_(3)
        await handle
        assert_tree_equal(await load_tree(ckpt, expected0, 0), expected0)
        assert_tree_equal(await load_tree(ckpt, expected1, 1), expected1)


@pytest.mark.asyncio
async def test_kernels_queued_before_save_are_in_it_and_later_ones_are_not(root: Path) -> None:
    """The copy waits for work queued on the caller's stream before save() (no sync by
    the caller), and in-place kernels queued after staged() do not reach the checkpoint."""
    w = torch.zeros(16 << 20, device="cuda")
    a = torch.randn(2048, 2048, device="cuda")
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        for _ in range(20):
            a = a @ a  # keep the stream busy
            a /= a.norm()
            w.add_(1)
        handle = await ckpt.save({"w": w}, step=0, overlap=True)
        await handle.staged()
        w.add_(1)
        await handle
        target = {"w": torch.zeros(16 << 20)}
        await ckpt.load(target, step=0)
        assert torch.equal(target["w"], torch.full((16 << 20,), 20.0))


@pytest.mark.asyncio
async def test_the_arena_is_pinned_for_cuda_and_unpinned_at_close(root: Path) -> None:
    """A CPU-only save leaves the arena pageable; the first CUDA save of the same layout
    page-locks it (cudaHostRegister); closing the checkpointer unregisters it."""
    state = {"x": torch.randn(1 << 20)}
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        await (await ckpt.save(state, step=0))
        (arena,) = arenas(ckpt)
        assert not arena.pinned
        state["x"] = state["x"].cuda()
        await (await ckpt.save(state, step=1))
        assert arenas(ckpt) == [arena]  # same layout: same arena, now pinned
        assert arena.pinned
        assert_tree_equal(await load_tree(ckpt, cpu_tree(state), 1), cpu_tree(state))
    assert not arena.pinned


@pytest.mark.asyncio
@pytest.mark.parametrize("where", ["loop", "thread"])
async def test_guarded_cuda_optimizer_step_right_after_save_never_leaks(
    root: Path, where: str
) -> None:
    """guard(opt) on a CUDA Linear + AdamW: opt.step() straight after save(overlap=True)
    waits for the device-to-host copy; the checkpoint holds the pre-step values."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4096, 4096, device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    backward(model)
    opt.step()
    state = {"model": model, "optim": opt}
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        with ckpt.guard(opt) as guard:
            for step in range(3):
                backward(model)
                expected = cpu_tree(clone_tree(snapshot(model, opt)))
                handle = await ckpt.save(state, step=step, overlap=True)
                await mutate_now(where, opt.step)
                await handle
                assert_tree_equal(await load_tree(ckpt, expected, step), expected)
        assert guard.waits >= 1
