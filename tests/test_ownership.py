"""Issue 10, one process: who owns each slot, task and handle -- each observation pinned."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import anyio
import pytest
import torch

import aiodcp
from aiodcp import CheckpointCancelledError, CheckpointExistsError
from aiodcp._parent import _generation

from .conftest import run_script


def _big(value: float, n: int = 4, size: int = 2_000_000) -> dict:
    return {f"b{i}": torch.full((size,), value + i) for i in range(n)}


async def _load(root: Path, like: dict, step: int) -> dict:
    out = {k: torch.empty_like(v) for k, v in like.items()}
    await aiodcp.load(out, root, step=step)
    return out


def _memfds(pid: int | str = "self") -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "aiodcp-arena" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                n += 1
        except OSError:
            pass
    return n


def _arena_maps(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for line in f if "aiodcp-arena" in line)


@pytest.mark.asyncio
async def test_prepare_during_save_never_shares_a_slot(root: Path) -> None:
    """obs 1: prepare() of another layout racing save() (a background warm-up): every
    commit is bit-exact (never zeros, never a crash) and no arena stays open after close."""
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        for i in range(6):
            state = _big(float(i + 1), size=2_000_000 if i % 2 else 1_500_000)
            other = _big(0.0, size=1_000_000 + i)
            async with anyio.create_task_group() as tg:
                tg.start_soon(ckpt.prepare, other)
                await anyio.sleep(0.005 * (i % 3))
                handle = await ckpt.save(state, step=i)
            await handle
            out = await _load(root, state, i)
            assert all(torch.equal(out[k], state[k]) for k in state), f"step {i} differs"
    assert _memfds() == 0


@pytest.mark.asyncio
async def test_an_error_in_our_own_task_never_hangs_close(root: Path) -> None:
    """obs 2: an overlapped save with an unsendable value and a raising on_event callback
    fail only their own handle; leaving the block takes seconds, not forever."""

    def bad_callback(event: aiodcp.SaveEvent) -> None:
        raise RuntimeError("callback bug")

    t0 = time.perf_counter()
    async with aiodcp.AsyncCheckpointer(root, on_event=bad_callback, shutdown_timeout=5) as ckpt:
        handle = await ckpt.save({"x": torch.ones(2), "bad": {"fn": lambda: 1}}, overlap=True)
        with pytest.raises(TypeError, match=r"\['bad'\]\['fn'\]"):
            await handle
        await (await ckpt.save({"x": torch.ones(2)}))  # the daemon and its tasks are fine
        pid = ckpt.worker_pid
    assert time.perf_counter() - t0 < 15
    assert pid is not None


@pytest.mark.asyncio
async def test_a_busy_loop_delays_replies_but_never_mutes_the_daemon(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """obs 3: the loop is blocked by synchronous training while the daemon persists and
    reports progress (about 20 frames): its socket fills (its send buffer is shrunk to
    the kernel's minimum, about 6 frames, as a long block would fill the default one), so
    it waits there -- it cannot commit meanwhile -- and once the loop is back the save
    commits and the handle resolves. A daemon that dropped frames instead would commit
    while the loop is blocked and lose its reply. (Not serial: a daemon slowed by other
    tests only fills its socket later; the loop is blocked for the whole 6 s either way.)"""
    real_socketpair = socket.socketpair

    def small_buffer_socketpair(*args: object) -> tuple[socket.socket, socket.socket]:
        parent, child = real_socketpair(*args)  # type: ignore[arg-type]
        child.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the daemon's end
        return parent, child

    monkeypatch.setattr(_generation.socket, "socketpair", small_buffer_socketpair)
    monkeypatch.setenv("AIODCP_TEST_SLOW_WRITE", "0.1")  # 20 writes: about 20 progress frames
    state = {f"t{i}": torch.full((1000,), float(i)) for i in range(20)}
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        handle = await ckpt.save(state)
        # Synchronous training: the loop does not run for 6 s (3x the writes' sleeps)
        deadline = time.monotonic() + 6
        while not (root / "step_0").exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # noqa: ASYNC251
        committed_while_blocked = (root / "step_0").exists()
        time.sleep(0.5)  # noqa: ASYNC251  (a dropping daemon drops its reply here)
        with anyio.fail_after(15):
            result = await handle
        assert result.step == 0 and await ckpt.steps() == [0]
        assert not committed_while_blocked  # it waited in its full socket
        out = {k: torch.empty_like(v) for k, v in state.items()}
        await aiodcp.load(out, root)
        assert all(torch.equal(out[k], state[k]) for k in state)


@pytest.mark.asyncio
async def test_a_step_already_in_flight_leaks_no_slot(root: Path) -> None:
    """obs 6: save(step=N) while N is in flight raises, and max_inflight=2 still means 2."""
    async with aiodcp.AsyncCheckpointer(root, max_inflight=2, when_busy="skip") as ckpt:
        first = await ckpt.save(_big(1.0), step=5)
        for _ in range(3):
            with pytest.raises(CheckpointExistsError, match="already being saved"):
                await ckpt.save(_big(1.0), step=5)
        second = await ckpt.save(_big(2.0), step=6)
        assert not (await second).skipped and not (await first).skipped


def test_persisting_starts_when_save_returns(root: Path) -> None:
    """obs 7: after `await save()` the caller runs synchronous code without yielding;
    the daemon commits meanwhile (the step is on disk before the loop runs again). Not
    serial: the block ends as soon as the step is there, and it may last 60 s."""
    code = """
import asyncio, os, sys, time, torch, aiodcp
async def main():
    async with aiodcp.AsyncCheckpointer(sys.argv[1]) as ckpt:
        await ckpt.save({"w": torch.ones(1000)}, step=0)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not os.path.exists(sys.argv[1] + "/step_0"):
            time.sleep(0.05)  # synchronous training: the loop does not run
        print("committed-while-blocked" if os.path.exists(sys.argv[1] + "/step_0") else "no")
asyncio.run(main())
"""
    r = run_script(code, str(root), timeout=110)
    assert r.returncode == 0, r.stderr
    assert "committed-while-blocked" in r.stdout


@pytest.mark.asyncio
async def test_released_arenas_are_unmapped_with_the_gc_off(root: Path) -> None:
    """obs 8: with DCP's gc variables set, 24 layouts leave at most the live arenas
    mapped in the daemon (release is deterministic)."""
    async with aiodcp.AsyncCheckpointer(
        root, disable_automatic_gc=True, disable_manual_gc=True
    ) as ckpt:
        for i in range(24):
            await (await ckpt.save({"t": torch.ones(1000 + i * 100)}))
        pid = ckpt.worker_pid
        assert pid is not None
        assert await anyio.to_thread.run_sync(_arena_maps, pid) <= 1


def test_the_daemon_ignores_the_trainers_working_directory(tmp_path: Path) -> None:
    """obs 9: a uuid.py beside the user's script does not break (or run in) the daemon."""
    (tmp_path / "uuid.py").write_text("raise SystemExit('user uuid.py imported')\n")
    code = """
import sys
sys.path.remove('')  # the trainer itself steers clear of its uuid.py; the daemon must too
import asyncio, torch, aiodcp
async def main():
    async with aiodcp.AsyncCheckpointer(sys.argv[1]) as ckpt:
        await (await ckpt.save({"w": torch.ones(3)}))
    print("ok")
asyncio.run(main())
"""
    r = run_script(code, str(tmp_path / "ckpt"), cwd=tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_handle_signals_is_armed_when_it_returns(tmp_path: Path) -> None:
    """obs 10: a SIGTERM right after handle_signals() returns runs the final save."""
    code = """
import asyncio, os, signal, sys, torch, aiodcp
async def main():
    state = {"w": torch.ones(3)}
    async with aiodcp.AsyncCheckpointer(sys.argv[1]) as ckpt:
        ckpt.handle_signals(signal.SIGTERM, final_save=lambda: ckpt.save(state, step=7))
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(30)
asyncio.run(main())
"""
    r = run_script(code, str(tmp_path / "ckpt"))
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
    assert (tmp_path / "ckpt" / "step_7" / ".metadata").is_file()


@pytest.mark.asyncio
async def test_retention_has_run_when_the_handle_resolves(root: Path) -> None:
    """obs 11: with keep_last=3, steps() right after `await handle` lists 3 steps."""
    async with aiodcp.AsyncCheckpointer(root, keep_last=3) as ckpt:
        for i in range(6):
            await (await ckpt.save({"w": torch.full((10,), float(i))}))
            assert len(await ckpt.steps()) == min(i + 1, 3)


def test_a_cancel_prints_nothing_and_says_one_line(tmp_path: Path) -> None:
    """obs 12: cancelling mid-persist writes no thread traceback to stderr, and the
    error's message is one plain line."""
    code = """
import asyncio, sys, torch, aiodcp
async def main():
    async with aiodcp.AsyncCheckpointer(sys.argv[1]) as ckpt:
        h = await ckpt.save({f"t{i}": torch.ones(1000) for i in range(8)})
        await asyncio.sleep(0.4)
        h.cancel()
        try:
            await h
        except aiodcp.CheckpointCancelledError as e:
            print("MSG", repr(str(e)))
asyncio.run(main())
"""
    r = run_script(code, str(tmp_path / "ckpt"), env={"AIODCP_TEST_SLOW_WRITE": "0.15"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Exception in thread" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    msg = r.stdout.split("MSG", 1)[1]
    assert "\\n" not in msg and "cancelled" in msg


@pytest.mark.asyncio
async def test_cancelled_error_type_for_a_cancel_only(root: Path) -> None:
    """A cancel still reads as a cancellation (and is not re-raised by wait())."""
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        h = await ckpt.save(_big(1.0), overlap=True)
        h.cancel()
        with pytest.raises(CheckpointCancelledError):
            await h
        await ckpt.wait()


@pytest.mark.asyncio
async def test_sigstop_of_the_daemon_is_bounded_at_close(root: Path) -> None:
    """A stopped (SIGSTOP) daemon cannot hang close: escalation reaps it in bounded time."""
    async with aiodcp.AsyncCheckpointer(root, shutdown_timeout=1) as ckpt:
        await (await ckpt.save({"w": torch.ones(3)}))
        pid = ckpt.worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        t0 = time.perf_counter()
    assert time.perf_counter() - t0 < 15
