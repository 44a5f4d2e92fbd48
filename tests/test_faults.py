"""Faults and cancellation, by really killing and cancelling things."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
import torch

import aiodcp
from aiodcp import CheckpointCancelledError, SaveFailedError, WorkerDiedError

from .conftest import daemon_pids

pytestmark = pytest.mark.asyncio


@pytest.fixture
def slow_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each write item in the daemon sleeps 0.15 s, so persists last long enough to hit."""
    monkeypatch.setenv("AIODCP_TEST_SLOW_WRITE", "0.15")


def _state(value: float = 1.0, n: int = 8) -> dict:
    return {f"t{i}": torch.full((1000,), value + i) for i in range(n)}


def _litter(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".tmp", ".trash")))


async def _load(root: Path, step: int, n: int = 8) -> dict:
    out = _state(-1, n)
    await aiodcp.load(out, root, step=step)
    return out


async def test_sigkill_mid_persist_fails_the_handle_and_a_new_daemon_takes_over(
    root: Path, slow_write: None
) -> None:
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        await (await ckpt.save(_state(1.0)))
        handle = await ckpt.save(_state(2.0))
        pid = ckpt.worker_pid
        assert pid is not None
        await anyio.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        t0 = time.perf_counter()
        with pytest.raises(WorkerDiedError, match="SIGKILL") as info:
            await handle
        assert time.perf_counter() - t0 < 1.0
        assert info.value.step == 1 and info.value.returncode == -signal.SIGKILL
        assert await ckpt.steps() == [0]
        again = await ckpt.save(_state(3.0))  # a fresh daemon, transparently
        assert ckpt.worker_pid not in (None, pid)
        assert (await again).step == 1
        assert _litter(root) == []
    assert torch.equal((await _load(root, 1))["t0"], torch.full((1000,), 3.0))


async def test_handle_cancel_while_persisting_publishes_nothing(
    root: Path, slow_write: None
) -> None:
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        pid = ckpt.worker_pid
        handle = await ckpt.save(_state())
        await anyio.sleep(0.2)
        assert handle.cancel()
        with pytest.raises(CheckpointCancelledError):
            await handle
        assert await ckpt.steps() == [] and _litter(root) == []
        assert not handle.cancel()  # already finished
        assert ckpt.worker_pid == pid
        assert (await (await ckpt.save(_state(), step=0))).step == 0
        await ckpt.wait()  # a cancellation the caller asked for is not re-raised


async def test_cancelling_a_waiter_does_not_cancel_the_save(root: Path, slow_write: None) -> None:
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        handle = await ckpt.save(_state())
        with anyio.move_on_after(0.1) as scope:
            await handle
        assert scope.cancelled_caught and not handle.done()
        assert (await handle).step == 0


async def test_cancelling_save_while_staging_aborts_it(root: Path) -> None:
    """The copy is big enough that a 5 ms deadline lands inside staging."""
    big = {f"t{i}": torch.randn(4 * 1024 * 1024) for i in range(8)}  # 128 MiB
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        pid = ckpt.worker_pid
        with anyio.move_on_after(0.005) as scope:
            await ckpt.save(big)
            pytest.fail("save() should have been cancelled while staging")
        assert scope.cancelled_caught
        await ckpt.wait()
        assert await ckpt.steps() == [] and _litter(root) == []
        assert ckpt.worker_pid == pid
        assert (await (await ckpt.save(_state()))).step == 0


async def test_exit_by_exception_cancels_in_flight_saves(root: Path, slow_write: None) -> None:
    with pytest.raises(RuntimeError, match="training crashed"):
        async with aiodcp.AsyncCheckpointer(root, shutdown_timeout=10) as ckpt:
            pid = ckpt.worker_pid
            handle = await ckpt.save(_state())
            raise RuntimeError("training crashed")
    with pytest.raises(CheckpointCancelledError):
        await handle
    assert pid not in daemon_pids()
    assert (
        await anyio.to_thread.run_sync(
            lambda: [p.name for p in root.iterdir() if p.name.startswith("step_")]
        )
        == []
    )


async def test_sigterm_to_the_daemon_aborts_cleanly_and_reports_death(
    root: Path, slow_write: None
) -> None:
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        handle = await ckpt.save(_state())
        await anyio.sleep(0.3)
        assert ckpt.worker_pid is not None
        os.kill(ckpt.worker_pid, signal.SIGTERM)
        with pytest.raises(WorkerDiedError, match="SIGTERM"):
            await handle
        assert await ckpt.steps() == [] and _litter(root) == []


@pytest.fixture
def tiny_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True
    )
    assert r.returncode == 0, f"root, yet cannot mount a tmpfs: {r.stderr.decode().strip()}"
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_disk_full_fails_the_save_keeps_older_steps_and_the_daemon(tiny_fs: Path) -> None:
    root = tiny_fs / "ckpt"
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        pid = ckpt.worker_pid
        await (await ckpt.save({"x": torch.ones(1000)}))
        with pytest.raises(SaveFailedError) as info:
            await (await ckpt.save({"x": torch.ones(2_000_000)}))  # 8 MB on a 3 MB disk
        assert "no space left on device" in str(info.value)
        assert await ckpt.steps() == [0] and _litter(root) == []
        assert ckpt.worker_pid == pid
        assert (await (await ckpt.save({"x": torch.zeros(1000)}))).step == 1
    out = {"x": torch.zeros(1000)}
    assert await aiodcp.load(out, root, step=0) == 0 and torch.equal(out["x"], torch.ones(1000))


async def test_read_only_root_is_a_clear_error_and_old_steps_still_load(tiny_fs: Path) -> None:
    root = tiny_fs / "ckpt"
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        await (await ckpt.save({"x": torch.ones(10)}))
    await anyio.run_process(["mount", "-o", "remount,ro", str(tiny_fs)])
    with pytest.raises(aiodcp.CheckpointError, match="not writable"):
        async with aiodcp.AsyncCheckpointer(root):
            pass
    out = {"x": torch.zeros(10)}
    assert await aiodcp.load(out, root) == 0 and torch.equal(out["x"], torch.ones(10))


async def test_damaged_checkpoint_never_loads_silently(root: Path) -> None:
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        path = (await (await ckpt.save(_state()))).path
    data = next(path.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(aiodcp.CheckpointError, match="truncated"):
        await aiodcp.load(_state(), root)


PARENT = """
import asyncio, os, sys, torch, aiodcp
async def main():
    async with aiodcp.AsyncCheckpointer(sys.argv[1]) as ckpt:
        await (await ckpt.save({"x": torch.ones(1000)}))
        await ckpt.save({f"t{i}": torch.ones(1000) for i in range(50)})
        print(ckpt.worker_pid, flush=True)
        await asyncio.sleep(60)
asyncio.run(main())
"""


async def test_trainer_sigkill_daemon_exits_and_next_start_is_clean(
    root: Path, slow_write: None
) -> None:
    """Kill -9 the trainer mid-save: its daemon exits within 5 s; the next checkpointer
    sees only committed steps, removes the leftovers and resumes from the latest."""
    proc = await anyio.open_process(
        [sys.executable, "-c", PARENT, str(root)], stderr=subprocess.DEVNULL
    )
    async with proc:
        assert proc.stdout is not None
        line = b""
        with anyio.fail_after(60):
            async for chunk in proc.stdout:
                line += chunk
                if b"\n" in line:
                    break
        daemon = int(line)
        await anyio.sleep(0.3)
        assert await anyio.to_thread.run_sync(_litter, root) != []  # mid-save
        proc.kill()
        await proc.wait()
    t0 = time.perf_counter()
    while daemon in daemon_pids():
        assert time.perf_counter() - t0 < 5.0, "daemon outlived its parent by 5 s"
        await anyio.sleep(0.05)
    shm = await anyio.to_thread.run_sync(os.listdir, "/dev/shm")
    assert [n for n in shm if "aiodcp" in n] == []  # arenas are memfds: never named there
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        assert await ckpt.steps() == [0]
        assert await anyio.to_thread.run_sync(_litter, root) == []
        out = {"x": torch.zeros(1000)}
        assert await ckpt.load(out) == 0 and torch.equal(out["x"], torch.ones(1000))


async def test_random_sigkills_never_publish_a_partial(root: Path, slow_write: None) -> None:
    """Kill the daemon at random moments across many saves -- while the parent stages,
    persists or commits; after each: every committed step loads bit-exact, nothing
    partial is listed, and the next save works."""
    rng = random.Random(1234)
    expected: dict[int, float] = {}
    big = {f"b{i}": torch.randn(2_000_000) for i in range(4)}  # 32 MiB: staging takes a while
    every_pid: set[int] = set()
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        for i in range(8):
            value = float(i * 10)
            await ckpt.prepare(_state(n=4))  # prepare() never starts a daemon; save() does
            if i % 2:  # kill while the parent is still staging
                killed: list[int] = []
                async with anyio.create_task_group() as tg:

                    async def kill_soon(killed: list[int] = killed) -> None:
                        while ckpt.worker_pid is None:  # noqa: ASYNC110  (a fresh daemon)
                            await anyio.sleep(0.001)
                        await anyio.sleep(rng.uniform(0.0, 0.03))
                        killed.append(ckpt.worker_pid or 0)
                        os.kill(killed[0], signal.SIGKILL)

                    tg.start_soon(kill_soon)
                    handle = await ckpt.save(big, step=i)
                pid = killed[0]
                with pytest.raises(WorkerDiedError):
                    await handle
            else:  # kill during persist or commit
                handle = await ckpt.save(_state(value, n=4), step=i)
                pid = ckpt.worker_pid
                assert pid is not None
                await anyio.sleep(rng.uniform(0.0, 0.8))
                os.kill(pid, signal.SIGKILL)
                try:
                    await handle
                    expected[i] = value  # committed before the kill
                except WorkerDiedError:
                    pass
            every_pid.add(pid)
            with anyio.fail_after(1):
                while ckpt.worker_pid == pid:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            assert await ckpt.steps() == sorted(expected)
            for step, v in expected.items():
                out = await _load(root, step, n=4)
                assert all(torch.equal(out[f"t{j}"], torch.full((1000,), v + j)) for j in range(4))
    assert _litter(root) == []
    assert len(every_pid) == 8 and not every_pid & daemon_pids()  # every daemon is gone


PREEMPTED = """
import asyncio, signal, sys, torch, aiodcp
async def main():
    state = {f"t{i}": torch.full((1000,), float(i)) for i in range(4)}
    async with aiodcp.AsyncCheckpointer(sys.argv[1]) as ckpt:
        ckpt.handle_signals(signal.SIGTERM, grace=30,
                            final_save=lambda: ckpt.save(state, step=99))
        await ckpt.save(state, step=0)
        print(ckpt.worker_pid, flush=True)
        while True:  # training
            await asyncio.sleep(0.01)
asyncio.run(main())
"""


async def test_preemption_sigterm_commits_then_exits(root: Path, slow_write: None) -> None:
    """SIGTERM to the trainer (its whole process group): the in-flight save and a final
    save commit, then the trainer exits 128+15 and its daemon is gone."""
    proc = await anyio.open_process(
        [sys.executable, "-c", PREEMPTED, str(root)],
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    async with proc:
        assert proc.stdout is not None
        with anyio.fail_after(60):
            daemon = int((await proc.stdout.receive()).split()[0])
        os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler would
        with anyio.fail_after(60):
            code = await proc.wait()
    assert code == 128 + signal.SIGTERM
    steps = await anyio.to_thread.run_sync(
        lambda: sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))
    )
    assert steps == ["step_0", "step_99"]
    assert daemon not in daemon_pids()


# ------------------------------------- issue 23: promises of the README tested nowhere
async def test_wait_re_raises_a_failure_nobody_awaited(root: Path, slow_write: None) -> None:
    """A save fails (its daemon killed) and nobody awaits its handle: wait() raises that
    failure, once (leaving the block afterwards raises nothing)."""
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        await ckpt.save(_state())
        pid = ckpt.worker_pid
        assert pid is not None
        await anyio.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerDiedError, match="SIGKILL") as info:
            await ckpt.wait()
        assert info.value.step == 0
        await ckpt.wait()  # seen now


async def test_leaving_the_block_re_raises_a_failure_nobody_awaited(
    root: Path, slow_write: None
) -> None:
    """The same failure, never awaited and no wait(): leaving ``async with`` raises it."""
    with pytest.raises(WorkerDiedError, match="SIGKILL") as info:
        async with aiodcp.AsyncCheckpointer(root) as ckpt:
            await ckpt.save(_state())
            pid = ckpt.worker_pid
            assert pid is not None
            await anyio.sleep(0.3)
            os.kill(pid, signal.SIGKILL)
    assert info.value.step == 0
    assert pid not in daemon_pids()


PREEMPTED_SLOW = """
import asyncio, signal, sys, torch, aiodcp
def final_save():
    raise RuntimeError("final save bug")
async def main():
    state = {f"t{i}": torch.full((1000,), float(i)) for i in range(8)}
    async with aiodcp.AsyncCheckpointer(sys.argv[1]) as ckpt:
        ckpt.handle_signals(signal.SIGTERM, grace=1, final_save=final_save)
        await ckpt.save(state, step=0)  # 8 writes of 3 s each: far longer than the grace
        print(ckpt.worker_pid, flush=True)
        while True:  # training
            await asyncio.sleep(0.01)
asyncio.run(main())
"""


async def test_preemption_grace_bounds_the_exit_and_a_failing_final_save_is_logged(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM with grace=1 while a save needs ~24 s more, and a final_save that raises:
    the error is logged, the grace runs out, the in-flight save is cancelled (never
    published) and the trainer still exits 128+15, within seconds."""
    monkeypatch.setenv("AIODCP_TEST_SLOW_WRITE", "3")
    proc = await anyio.open_process(
        [sys.executable, "-c", PREEMPTED_SLOW, str(root)],
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    async with proc:
        assert proc.stdout is not None and proc.stderr is not None
        with anyio.fail_after(60):
            daemon = int((await proc.stdout.receive()).split()[0])
        t0 = time.perf_counter()
        os.killpg(proc.pid, signal.SIGTERM)
        with anyio.fail_after(60):
            code = await proc.wait()
        elapsed = time.perf_counter() - t0
        err = b""
        async for chunk in proc.stderr:
            err += chunk
    text = err.decode()
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert elapsed < 15, elapsed  # grace 1 s + a bounded shutdown, not the 24 s persist
    assert "final checkpoint on signal 15 failed" in text and "final save bug" in text
    assert "grace period of 1s ran out" in text, text[-3000:]
    assert not (root / "step_0").exists()
    assert daemon not in daemon_pids()


SITECUSTOMIZE = """
import os, sys
if "AIODCP_PACKAGE_PARENT" in os.environ:  # only in aiodcp's daemon
    class _Fail:
        def find_spec(self, name, path=None, target=None):
            if name == "aiodcp._daemon._persist":
                raise RuntimeError("injected start-up failure")
            return None
    sys.meta_path.insert(0, _Fail())
"""


async def test_a_daemon_that_fails_to_start_raises_with_its_traceback(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon raises while it starts (an import fails in it): entering the block
    raises CheckpointError naming the daemon's error in one line, at once, with the
    daemon's traceback on the exception (it used to go to the trainer's stderr only)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), *sys.path]))
    # A spawned daemon: one forked from this process's warm fork server has imported
    # everything before this test changed PYTHONPATH (tests/test_forkserver.py).
    monkeypatch.setenv("AIODCP_FORKSERVER", "0")
    t0 = time.perf_counter()
    with pytest.raises(aiodcp.CheckpointError) as info:
        async with aiodcp.AsyncCheckpointer(root, init_timeout=60):
            pass
    text = str(info.value)
    assert time.perf_counter() - t0 < 30 and "start-up" in text, text
    assert "injected start-up failure" in text and len(text.splitlines()) == 1, text
    tb = getattr(info.value, "remote_traceback", "")
    assert "Traceback" in tb and "injected start-up failure" in tb, tb


FORKING_PARENT = """
import asyncio, os, sys, time, torch, aiodcp
async def main():
    async with aiodcp.AsyncCheckpointer(sys.argv[1]) as ckpt:
        await (await ckpt.save({"x": torch.ones(10)}))
        child = os.fork()
        if child == 0:  # keeps every descriptor the trainer had: the daemon's channel too
            time.sleep(60)
            os._exit(0)
        print(ckpt.worker_pid, child, flush=True)
        await asyncio.sleep(60)
asyncio.run(main())
"""


async def test_daemon_exits_when_its_parent_changes_while_the_channel_stays_open(
    root: Path,
) -> None:
    """The trainer is SIGKILLed while a forked child of it keeps the channel open (no end
    of file for the daemon): the daemon sees its parent change and exits within seconds."""
    proc = await anyio.open_process([sys.executable, "-c", FORKING_PARENT, str(root)])
    async with proc:
        assert proc.stdout is not None
        line = b""
        with anyio.fail_after(60):
            async for chunk in proc.stdout:
                line += chunk
                if b"\n" in line:
                    break
        daemon, child = map(int, line.split())
        try:
            assert daemon in daemon_pids()
            proc.kill()
            await proc.wait()
            t0 = time.perf_counter()
            while daemon in daemon_pids():
                assert time.perf_counter() - t0 < 10, "daemon outlived its parent by 10 s"
                await anyio.sleep(0.05)
            assert child_alive(child)  # the channel was open all along
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def child_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
