"""What a guard covers, made true: buffers updated by a guarded forward, values taken at
the call, and a failed overlapped copy that wakes every waiter instead of hanging."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch

import aiodcp
from aiodcp._parent._handle import SaveHandle
from aiodcp._staging import _arena

from .test_overlap import assert_tree_equal, blocking_allowed, clone_tree, deadline

pytestmark = pytest.mark.asyncio


@pytest.fixture
def slow_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every copy into an arena sleeps 0.3 s first (a large model's copy), so whatever the
    loop's thread does right after save() returns lands while the copy runs."""
    real = _arena.Arena.stage

    def stage(self: _arena.Arena, flat: Any, **kw: Any) -> None:
        time.sleep(0.3)
        real(self, flat, **kw)

    monkeypatch.setattr(_arena.Arena, "stage", stage)


def bn_model() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, 1)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return model, opt, sched


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(8, 16)).pow(2).mean().backward()  # updates BatchNorm's running stats
    opt.step()
    opt.zero_grad()


async def test_a_guarded_model_with_batchnorm_commits_one_steps_state(
    root: Path, slow_copies: None
) -> None:
    """With overlap=True and guard(opt, model), the next iteration's forward (which
    updates BatchNorm's running statistics in place) and a scheduler stepped before it
    cannot leak into the checkpoint: every committed step is exactly the state at its
    save() call (it used to pair step-k weights with step-k+1 statistics and lr)."""
    model, opt, sched = bn_model()
    state = {"model": model, "optim": opt, "sched": sched}
    train_step(model, opt)
    wants: dict[int, dict[str, Any]] = {}
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        guard = ckpt.guard(opt, model)
        for step in range(3):
            await ckpt.save(state, step=step, overlap=True)
            wants[step] = clone_tree({"model": model.state_dict(), "lr": opt.param_groups[0]["lr"]})
            with blocking_allowed(), deadline(30, "the training step"):
                sched.step()  # before the next forward, as many loops do
                train_step(model, opt)  # forward waits for the buffers' copy
        await ckpt.wait()
        assert guard.waits >= 3
        for step, want in wants.items():
            fresh, fresh_opt, fresh_sched = bn_model()
            for group in fresh_opt.param_groups:
                group["lr"] = 123.0
            await ckpt.load({"model": fresh, "optim": fresh_opt, "sched": fresh_sched}, step=step)
            assert_tree_equal(fresh.state_dict(), want["model"], f"step {step} model")
            assert fresh_opt.param_groups[0]["lr"] == want["lr"], f"step {step} lr"


@pytest.mark.serial
async def test_a_guarded_forward_waits_only_for_the_buffers(root: Path) -> None:
    """Buffers are copied first: a guarded forward right after save() waits for them and
    not for the whole copy (the parameters are still being copied when it returns)."""
    model, _, _ = bn_model()
    big = {"params": [torch.randn(1 << 20) for _ in range(16)]}
    done_at: list[float] = []
    real = _arena.Arena.stage

    def stage(self: _arena.Arena, flat: Any, **kw: Any) -> None:
        real(self, flat, **kw)
        done_at.append(time.monotonic())

    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        ckpt.guard(model)
        await ckpt.prepare({"model": model, "big": big})
        _arena.Arena.stage = stage  # type: ignore[method-assign]
        try:
            handle = await ckpt.save({"model": model, "big": big}, step=0, overlap=True)
            with blocking_allowed(), deadline(30, "forward"):
                model(torch.randn(8, 16))
                forward_done = time.monotonic()
            await handle
        finally:
            _arena.Arena.stage = real  # type: ignore[method-assign]
        assert handle._buffers_flag.is_set()
        assert done_at and forward_done <= done_at[0] + 0.05


class Unsendable:
    def __reduce__(self) -> Any:
        raise TypeError("cannot pickle this")


@pytest.mark.parametrize("cause", ["unsendable value", "step exists"])
@pytest.mark.parametrize("strict", [False, True])
async def test_a_failed_overlapped_copy_wakes_a_guarded_step(
    root: Path, cause: str, strict: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """An overlapped copy that fails before it is staged (a value that cannot be
    pickled; a step that exists -- the overlapped quickstart run twice) used to leave a
    guarded opt.step() on the loop's thread waiting for ever. Now the copy wakes it:
    the error is logged (strict: raised from opt.step()), the handle fails with it."""
    model, opt, _ = bn_model()
    state: dict[str, Any] = {"model": model, "optim": opt}
    step = 0
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        if cause == "step exists":
            await (await ckpt.save(state, step=step))
        else:
            state["extra"] = {"bad": Unsendable()}
        ckpt.guard(opt, model, strict=strict)
        release = threading.Event()
        real = _arena.Arena.stage

        def stage(self: _arena.Arena, flat: Any, **kw: Any) -> None:
            release.wait(5)
            real(self, flat, **kw)

        _arena.Arena.stage = stage  # type: ignore[method-assign]
        try:
            handle = await ckpt.save(state, step=step, overlap=True)
            with caplog.at_level(logging.ERROR, "aiodcp"), blocking_allowed():
                with deadline(20, "opt.step() after a failed copy"):
                    handle._copy.stopped.wait(10)  # the copy fails before staging
                    if strict:
                        with pytest.raises(RuntimeError, match="copy of step 0 failed"):
                            train_step(model, opt)
                    else:
                        train_step(model, opt)
        finally:
            release.set()
            _arena.Arena.stage = real  # type: ignore[method-assign]
        if not strict:
            assert "copy of step 0 failed" in caplog.text
        expected = TypeError if cause == "unsendable value" else aiodcp.CheckpointExistsError
        with pytest.raises(expected):
            await handle
        await ckpt.wait()  # the failure was seen through the handle


async def test_an_illegal_handle_move_raises() -> None:
    """A save's states are an enforced table: a done handle cannot become persisting."""
    handle = SaveHandle(3)
    handle._move("persisting")
    handle._finish(None, aiodcp.CheckpointCancelledError("x", step=3))
    with pytest.raises(RuntimeError, match="illegal move done -> persisting"):
        handle._move("persisting")


async def test_a_guarded_step_in_another_task_never_waits_for_a_save_not_yet_copying(
    root: Path,
) -> None:
    """One task trains (guarded forward and opt.step(), yielding between steps) while
    another saves: a hook used to wait for a save whose copy had not started -- only the
    loop it was holding could start it -- and hung for ever."""
    model, opt, _ = bn_model()
    state = {"model": model, "optim": opt}
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        ckpt.guard(opt, model)
        stop = anyio.Event()

        async def train() -> None:
            while not stop.is_set():
                train_step(model, opt)
                await anyio.lowlevel.checkpoint()

        with blocking_allowed(), deadline(60, "saves beside a guarded training task"):
            async with anyio.create_task_group() as tg:
                tg.start_soon(train)
                for i in range(6):
                    await (await ckpt.save(state, overlap=bool(i % 2)))
                stop.set()
        assert await ckpt.steps() == list(range(6))


async def test_a_tensor_learning_rate_stepped_after_save_does_not_leak(
    root: Path, slow_copies: None
) -> None:
    """A scheduler updates a tensor lr in place (torch's recommendation for compiled
    optimizers); an overlapped save must keep the lr of its call, as with a float lr."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        ckpt.guard(opt, model)
        model(torch.randn(2, 8)).sum().backward()
        opt.step()  # (a scheduler steps after an optimizer step)
        lr = float(opt.param_groups[0]["lr"])
        handle = await ckpt.save({"model": model, "optim": opt, "sched": sched}, overlap=True)
        sched.step()  # in place, while the copy has not read the state yet
        await handle
        fresh = torch.nn.Linear(8, 8)
        fresh_opt = torch.optim.Adam(fresh.parameters(), lr=torch.tensor(1.0))
        fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=1, gamma=0.5)
        await ckpt.load({"model": fresh, "optim": fresh_opt, "sched": fresh_sched})
        assert float(fresh_opt.param_groups[0]["lr"]) == lr
