"""Overlapped staging (``save(..., overlap=True)``), ``handle.staged()`` and guards, on CPU.

The invariant every test checks: a committed step holds exactly the values the
tensors had when ``save()`` was called, however soon the caller mutates them
after it may (``staged()``, or a guard that waits for it).
"""

from __future__ import annotations

import copy
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import aiodcp
from aiodcp import CheckpointCancelledError


# ---------------------------------------------------------------- helpers
@contextmanager
def blocking_allowed() -> Iterator[None]:
    """The guard blocks its caller's thread by design; here that is the loop's thread
    (a synchronous training step), which blockbuster would otherwise refuse."""
    from blockbuster import blockbuster as bb

    previous = bb._skip.value
    bb._skip.value = True
    try:
        yield
    finally:
        bb._skip.value = previous


@contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise TimeoutError in the main thread if the block is still running after
    ``seconds`` (a hang becomes a failure; SIGUSR1, so pytest-timeout's alarm stays)."""
    assert threading.current_thread() is threading.main_thread()

    def on_signal(signum: int, frame: Any) -> None:
        raise TimeoutError(f"{what} still blocked after {seconds} s")

    previous = signal.signal(signal.SIGUSR1, on_signal)
    timer = threading.Timer(
        seconds, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1)
    )
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGUSR1, previous)


async def mutate_now(where: str, fn: Callable[[], Any]) -> None:
    """Run ``fn`` right after ``save()`` returned: on the loop's thread with no await in
    between (a synchronous training step), or in a worker thread (training off-loop)."""
    if where == "loop":
        with blocking_allowed(), deadline(3, "mutation on the loop thread"):
            fn()
    else:
        await anyio.to_thread.run_sync(fn)


def clone_tree(value: Any) -> Any:
    """A deep copy whose tensors are fresh clones (a snapshot of state at one moment)."""
    return copy.deepcopy(value)


def zeros_tree(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)
    if isinstance(value, dict):
        return {k: zeros_tree(v) for k, v in value.items()}
    return copy.deepcopy(value)


def assert_tree_equal(got: Any, want: Any, path: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), path
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert torch.equal(got.cpu(), want.cpu()), f"{path} differs"
    elif isinstance(want, dict):
        assert set(got) == set(want), path
        for k in want:
            assert_tree_equal(got[k], want[k], f"{path}[{k!r}]")
    else:
        assert got == want, path


async def load_tree(ckpt: aiodcp.AsyncCheckpointer, like: dict[str, Any], step: int) -> Any:
    """Load ``step`` into a zero-filled tree shaped like ``like`` (plain tensors only)."""
    target = zeros_tree(like)
    assert await ckpt.load(target, step=step) == step
    return target


def big_state(n: int = 8, numel: int = 4 << 20) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(n * numel)
    return {f"t{i}": torch.randn(numel, generator=gen) for i in range(n)}


def linear_and_adamw(size: int = 2048) -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    """A Linear(size, size) + AdamW whose optimizer state exists (~3 x 16 MiB at 2048)."""
    torch.manual_seed(size)
    model = torch.nn.Linear(size, size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    backward(model)
    opt.step()
    return model, opt


def backward(model: torch.nn.Linear) -> None:
    model.zero_grad()
    x = torch.randn(8, model.in_features, device=model.weight.device)
    model(x).pow(2).mean().backward()


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """What a save of ``{"model": model, "optim": opt}`` must hold, taken now."""
    return clone_tree({"model": model.state_dict(), "optim": opt.state_dict()})


# ------------------------------------------------------------------ tests
@pytest.mark.asyncio
@pytest.mark.serial
async def test_overlapped_save_returns_before_the_copy_and_commits_the_values_at_save(
    root: Path,
) -> None:
    """save(overlap=True) returns in under half the copy time; the step holds the
    values at the call even though they change right after staged()."""
    state = big_state()  # 8 x 4M float32 = 128 MiB
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        await ckpt.prepare(state)
        copy_s = (await (await ckpt.save(state, step=0))).stage_seconds
        for t in state.values():
            t.add_(1.0)
        expected = clone_tree(state)
        t0 = time.perf_counter()
        handle = await ckpt.save(state, step=1, overlap=True)
        returned_s = time.perf_counter() - t0
        await handle.staged()
        assert handle.is_staged()
        for t in state.values():
            t.mul_(-3.0)  # after staged(): free to mutate
        result = await handle
        print(
            f"\ncopy (save, 128 MiB): {copy_s * 1e3:.1f} ms; overlapped save returned in "
            f"{returned_s * 1e3:.2f} ms; its staging took {result.stage_seconds * 1e3:.1f} ms"
        )
        assert returned_s < copy_s / 2, (returned_s, copy_s)
        assert result.step == 1 and result.nbytes == 8 * (4 << 20) * 4
        assert_tree_equal(await load_tree(ckpt, state, 1), expected)


@pytest.mark.asyncio
@pytest.mark.parametrize("where", ["loop", "thread"])
async def test_guarded_optimizer_step_right_after_save_never_leaks(root: Path, where: str) -> None:
    """With guard(opt), opt.step() straight after save(overlap=True) waits for the copy:
    each step's checkpoint equals the pre-step parameters and AdamW state."""
    model, opt = linear_and_adamw()
    state = {"model": model, "optim": opt}
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        guard = ckpt.guard(opt)
        for step in range(3):
            backward(model)
            expected = snapshot(model, opt)
            handle = await ckpt.save(state, step=step, overlap=True)
            await mutate_now(where, opt.step)
            assert not torch.equal(model.weight, expected["model"]["weight"])  # it stepped
            await handle
            assert_tree_equal(await load_tree(ckpt, expected, step), expected)
        guard.remove()
    print(f"\nguard waited {guard.waits} times in 3 steps ({where})")
    assert guard.waits >= 1


@pytest.mark.asyncio
async def test_strict_guard_refuses_a_step_before_staged_and_the_save_commits(root: Path) -> None:
    """guard(opt, strict=True): stepping before staged() raises RuntimeError and mutates
    nothing; the save commits the pre-step values; after staged() stepping works."""
    model, opt = linear_and_adamw()
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        with ckpt.guard(opt, strict=True) as guard:
            backward(model)
            expected = snapshot(model, opt)
            handle = await ckpt.save({"model": model, "optim": opt}, step=0, overlap=True)
            with pytest.raises(RuntimeError, match=r"step\(s\) \[0\].*staged\(\)"):
                opt.step()
            assert guard.waits == 1
            assert_tree_equal(snapshot(model, opt), expected)  # the refused step did nothing
            await handle.staged()
            opt.step()  # nothing pending: no refusal
            assert guard.waits == 1
            assert (await handle).step == 0
        assert_tree_equal(await load_tree(ckpt, expected, 0), expected)


@pytest.mark.asyncio
async def test_without_a_guard_mutating_after_staged_is_safe(root: Path) -> None:
    """The unguarded contract: once staged() resolved, in-place changes (an optimizer
    step, a zero_) do not reach the checkpoint."""
    model, opt = linear_and_adamw()
    state = {"model": model, "optim": opt}
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        for step in range(2):
            backward(model)
            expected = snapshot(model, opt)
            handle = await ckpt.save(state, step=step, overlap=True)
            await handle.staged()
            opt.step()
            with torch.no_grad():
                model.bias.zero_()
            await handle
            assert_tree_equal(await load_tree(ckpt, expected, step), expected)


@pytest.mark.asyncio
async def test_overlapped_save_of_an_unsendable_value_fails_its_handle(root: Path) -> None:
    """An unsendable value fails the overlapped save's handle with a TypeError naming
    its key; staged() still resolves; nothing is published; the next save works."""
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        state = {"x": torch.arange(4.0), "meta": {"lock": threading.Lock()}}
        handle = await ckpt.save(state, step=0, overlap=True)
        with anyio.fail_after(10):
            await handle.staged()
        assert handle.is_staged()
        with pytest.raises(TypeError, match=r"\['meta'\]\['lock'\]"):
            await handle
        await ckpt.wait()  # observed: not re-raised
        assert await ckpt.steps() == []
        good = {"x": torch.arange(4.0)}
        assert (await (await ckpt.save(good, step=0, overlap=True))).step == 0
        assert_tree_equal(await load_tree(ckpt, good, 0), good)


@pytest.mark.asyncio
async def test_cancelling_an_overlapped_save_at_once_publishes_nothing(root: Path) -> None:
    """handle.cancel() right after save(overlap=True): staged() resolves, the handle
    raises CheckpointCancelledError, no step (nor temporary) is left, the step is free."""
    state = big_state(4, 1 << 20)
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        handle = await ckpt.save(state, step=3, overlap=True)
        assert handle.cancel()
        with anyio.fail_after(10):
            await handle.staged()
        with pytest.raises(CheckpointCancelledError):
            await handle
        await ckpt.wait()
        assert await ckpt.steps() == []
        left = [p.name async for p in anyio.Path(root).iterdir()]
        assert not [n for n in left if n.startswith(("step_", ".tmp-"))], left
        result = await (await ckpt.save(state, step=3, overlap=True))
        assert result.step == 3 and await ckpt.steps() == [3]
        assert_tree_equal(await load_tree(ckpt, state, 3), state)


@pytest.mark.asyncio
@pytest.mark.parametrize("where", ["loop", "thread"])
async def test_guarded_module_load_state_dict_waits_for_staging(root: Path, where: str) -> None:
    """guard(module): load_state_dict straight after save(overlap=True) waits for the
    copy, so the checkpoint holds the old weights and the module the new ones."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2048, 2048)
    new = {k: v + 1.0 for k, v in model.state_dict().items()}
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        with ckpt.guard(model) as guard:
            expected = clone_tree({"model": model.state_dict()})
            handle = await ckpt.save({"model": model}, step=0, overlap=True)
            await mutate_now(where, lambda: model.load_state_dict(new))
            assert guard.waits == 1
        await handle
        assert_tree_equal(model.state_dict(), new)
        assert_tree_equal(await load_tree(ckpt, expected, 0), expected)


@pytest.mark.asyncio
async def test_a_guarded_step_hands_the_staged_save_to_the_daemon_without_the_loop(
    root: Path,
) -> None:
    """A synchronous training loop on the loop's thread does not yield between saves.
    The guard's wait in ``opt.step()`` is the moment the copy is known done: the save
    is sent from there, so the daemon persists while training goes on (it used to wait
    for the loop's next turn -- the next save -- serialising every persist with training)."""
    model, opt = linear_and_adamw(512)
    state = {"model": model, "optim": opt}
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        await ckpt.prepare(state)
        with ckpt.guard(opt):
            handle = await ckpt.save(state, step=7, overlap=True)
            want = snapshot(model, opt)
            with blocking_allowed(), deadline(60, "the synchronous training loop"):
                backward(model)
                opt.step()  # waits for the copy, then hands the save over
                t = time.monotonic()
                while not (root / "step_7").exists():  # no await: the loop never runs
                    assert time.monotonic() - t < 30, "the daemon never got the save"
                    backward(model)  # keep "training"
                    time.sleep(0.01)  # noqa: ASYNC251 -- a blocking training step, on purpose
        result = await handle
        assert result.step == 7 and not result.recovered
        assert_tree_equal(await load_tree(ckpt, want, 7), want)


@pytest.mark.asyncio
async def test_guard_remove_takes_its_hooks_off(root: Path) -> None:
    """guard.remove(): the optimizer and the module are unhooked -- a step or a
    load_state_dict while a copy is pending is neither refused (strict) nor waited for."""
    model, opt = linear_and_adamw()
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        guard = ckpt.guard(opt, model, strict=True)
        assert opt._optimizer_step_pre_hooks and model._load_state_dict_pre_hooks
        backward(model)
        handle = await ckpt.save({"model": model, "optim": opt}, step=0, overlap=True)
        with pytest.raises(RuntimeError, match="still staging"):
            opt.step()  # hooked: refused while the copy is pending
        guard.remove()
        assert not opt._optimizer_step_pre_hooks and not model._load_state_dict_pre_hooks
        opt.step()  # unhooked: no refusal (whether or not the copy is still pending)
        model.load_state_dict(model.state_dict())
        assert guard.waits == 1
        await handle
