"""A checkpointer's life as users live it: one loop, one opening, a notebook's loop that ends
without aclose(), options that cannot hold with several ranks."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import torch

import aiodcp
from aiodcp._parent import _checkpointer
from aiodcp._parent._dist import Group

from .conftest import run_script

ABANDON = """
import asyncio, logging, sys, torch, aiodcp
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
async def main():
    ckpt = await aiodcp.AsyncCheckpointer(sys.argv[1]).start()
    await ckpt.save({"w": torch.full((1 << 16,), 3.0)}, step=1, overlap=True)
asyncio.run(main())  # ends without `await ckpt.aclose()`
print("exited")
"""


def test_a_loop_that_ends_without_aclose_says_which_steps_were_lost(tmp_path: Path) -> None:
    """A notebook-style checkpointer (start()) whose loop ends with a save in flight and no
    aclose(): the script still exits, and an error names the step that was not committed
    (it used to be lost with only a "killed by SIGKILL" line)."""
    proc = run_script(ABANDON, str(tmp_path / "ck"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exited" in proc.stdout
    assert "never closed" in proc.stderr and "steps [1] in flight were NOT committed" in (
        proc.stderr
    ), proc.stderr[-3000:]


@pytest.mark.asyncio
async def test_a_checkpointer_refuses_calls_from_another_thread(root: Path) -> None:
    """A save from a second event loop in another thread is refused with a clear error (it
    used to be accepted, touching the first loop's state from a foreign thread)."""
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        errors: list[BaseException] = []

        def other_loop() -> None:
            try:
                asyncio.run(ckpt.save({"w": torch.zeros(4)}, step=0))
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=other_loop)
        thread.start()
        thread.join(30)
        assert errors and isinstance(errors[0], RuntimeError)
        assert "bound to the event loop" in str(errors[0])
        assert await ckpt.steps() == []


def test_reusing_a_checkpointer_across_two_asyncio_runs_says_what_to_do(root: Path) -> None:
    """Opening a checkpointer a second time (e.g. in a second asyncio.run) says to create a
    new one, instead of anyio's 'This task group is not active'."""
    ckpt = aiodcp.AsyncCheckpointer(root)

    async def use() -> None:
        async with ckpt:
            pass

    asyncio.run(use())
    with pytest.raises(RuntimeError, match=r"create a new AsyncCheckpointer"):
        asyncio.run(use())


@pytest.mark.asyncio
async def test_when_busy_skip_is_refused_with_several_ranks(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """when_busy="skip" would be decided by each rank alone (one rank could skip a save
    its peers make): with several ranks it is refused at open, before any daemon starts."""
    monkeypatch.setattr(_checkpointer, "resolve_group", lambda pg: Group(object(), 0, 2))
    with pytest.raises(ValueError, match="not supported with several ranks"):
        async with aiodcp.AsyncCheckpointer(root, when_busy="skip"):
            pass


def test_a_generations_states_are_an_enforced_table() -> None:
    """A daemon generation moves starting -> serving -> retiring -> exited; an exited one
    cannot serve again (an illegal move raises instead of silently reviving it)."""
    from aiodcp._parent._generation import Generation

    gen = Generation.__new__(Generation)
    gen.number, gen.pid, gen._state = 1, 123, "starting"
    gen._move("serving")
    gen._move("retiring")
    gen._move("retiring")  # asked twice to go: still retiring
    gen._move("exited")
    with pytest.raises(RuntimeError, match="illegal move exited -> serving"):
        gen._move("serving")


def test_the_daemons_stop_state_moves_once_and_the_first_reason_wins() -> None:
    """A SIGTERM during a graceful Terminate is still a graceful exit; nothing goes back
    to running."""
    from aiodcp._daemon._persist import Stop, Stopping

    stopping = Stopping()
    assert not stopping.dying
    assert stopping.enter(Stop.TERMINATE, "terminate")
    assert not stopping.enter(Stop.SIGTERM, "SIGTERM")
    assert stopping.kind is Stop.TERMINATE and not stopping.dying
    with pytest.raises(RuntimeError):
        stopping.enter(Stop.RUNNING, "")
    halted = Stopping()
    halted.enter(Stop.HALT, "parent process is gone")
    assert halted.dying and halted.reason == "parent process is gone"


FIRST_SAVE = """
import asyncio, sys, tempfile, time, torch, aiodcp
async def main():
    state = {f"t{i}": torch.randn(16) for i in range(3000)}
    lag = [0.0]
    async def ticker():
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lag[0] = max(lag[0], time.perf_counter() - t - 0.001)
    async with aiodcp.AsyncCheckpointer(tempfile.mkdtemp()) as ckpt:
        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        lag[0] = 0.0
        await (await ckpt.save(state, step=0))
        task.cancel()
    print(f"{lag[0]:.4f} {'torch.distributed.tensor' in sys.modules}")
asyncio.run(main())
"""


@pytest.mark.serial
def test_the_first_save_keeps_the_loop_free() -> None:
    """The first save without prepare() (3,000 small tensors) keeps the loop as free as the
    later ones: it used to import torch.distributed.tensor in its copy (~2 s, holding the
    loop's thread for ~450 ms); a program that uses no DTensor never imports it now."""
    proc = run_script(FIRST_SAVE, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lag, imported = proc.stdout.split()
    assert imported == "False"
    assert float(lag) < 0.15, f"first save held the loop {float(lag) * 1e3:.0f} ms"


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs mount (needs root, as CI and this machine have)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a read-only tmpfs")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    (mnt / "existing").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    (mnt / "existing").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.asyncio
async def test_a_root_on_a_read_only_mount_is_a_clear_error(read_only_dir: Path) -> None:
    """A new root on a read-only mount, and an existing directory there, fail at open with a
    CheckpointError that says so (a new one used to raise a raw OSError)."""
    for root in (read_only_dir / "new" / "ck", read_only_dir / "existing"):
        with pytest.raises(aiodcp.CheckpointError, match="choose a writable directory"):
            async with aiodcp.AsyncCheckpointer(root):
                pass


@pytest.mark.asyncio
async def test_an_unopened_checkpointer_says_so(root: Path) -> None:
    """steps(), wait(), guard() and aclose() on a checkpointer never opened raise a clear
    RuntimeError (they used to succeed silently, or raise a bare AssertionError)."""
    ckpt = aiodcp.AsyncCheckpointer(root)
    for call in (ckpt.steps, ckpt.wait, ckpt.aclose):
        with pytest.raises(RuntimeError, match=r"(not open|never opened)"):
            await call()
    with pytest.raises(RuntimeError, match="not open"):
        ckpt.guard(torch.nn.Linear(1, 1))


@pytest.mark.parametrize("how", ["task.cancel", "anyio scope"])
def test_a_block_left_by_cancellation_closes_for_good(root: Path, how: str) -> None:
    """Leaving `async with` by cancellation (asyncio's task.cancel(), an anyio scope, as
    Ctrl-C or a timeout do) finishes closing: state closed, writer lock and arenas let go,
    the root opens again in the same process (it used to stay 'closing', holding both)."""
    import anyio

    holder: list[aiodcp.AsyncCheckpointer] = []
    saved = asyncio.Event()

    async def body() -> None:
        async with aiodcp.AsyncCheckpointer(root) as ckpt:
            holder.append(ckpt)
            await (await ckpt.save({"w": torch.ones(1 << 16)}, step=0))
            saved.set()
            await asyncio.sleep(3600)

    async def main() -> None:
        if how == "task.cancel":
            task = asyncio.ensure_future(body())
            await saved.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            async with anyio.create_task_group() as tg:
                tg.start_soon(body)
                await saved.wait()
                tg.cancel_scope.cancel()
        assert holder[0]._state == "closed" and holder[0]._lock is None
        async with aiodcp.AsyncCheckpointer(root) as again:
            assert await again.steps() == [0]

    asyncio.run(main())


@pytest.mark.asyncio
async def test_a_save_that_starts_while_the_block_exits_is_refused(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task that saves while `async with` exits (waiting for a slow save in flight) gets
    a clear error (it used to be accepted, then got anyio's 'task group is not active' or
    a daemon that the close started and killed)."""
    import anyio

    monkeypatch.setenv("AIODCP_TEST_SLOW_WRITE", "1.0")  # the in-flight save takes a while
    errors: list[BaseException] = []
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        await ckpt.save({"w": torch.zeros(4)}, step=0)  # persisting as the block exits

        async def saver() -> None:
            await anyio.sleep(0.3)  # the exit is waiting for step 0 now
            try:
                await ckpt.save({"w": torch.zeros(4)}, step=1)
            except BaseException as exc:
                errors.append(exc)

        task = asyncio.ensure_future(saver())
    await task
    assert errors and isinstance(errors[0], RuntimeError) and "closing" in str(errors[0]), errors
    assert ckpt.daemon_pid is None
    assert await anyio.to_thread.run_sync(lambda: sorted(p.name for p in root.glob("step_*"))) == [
        "step_0"
    ]


CTRL_C = """
import asyncio, sys, torch, aiodcp
async def main():
    state = {f"t{i}": torch.randn(256, 1024) for i in range(16)}
    async with aiodcp.AsyncCheckpointer(sys.argv[1]) as ckpt:
        handle = await ckpt.save(state, step=5)
        print("saving", flush=True)
        await handle
asyncio.run(main())
"""


@pytest.mark.timeout(90)
def test_ctrl_c_during_a_save_says_the_step_was_cancelled_in_a_short_traceback(
    tmp_path: Path,
) -> None:
    """SIGINT to a script in `asyncio.run` while its save persists: it exits within a few
    seconds, stderr has one line naming the cancelled step and saying nothing was
    published, and only asyncio's own two-part traceback (the cancellation, then
    KeyboardInterrupt) -- not a third part chained by aiodcp's close (48 lines before)."""
    import signal
    import sys
    import time

    root = tmp_path / "ck"
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C, str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "AIODCP_TEST_SLOW_WRITE": "0.5"},  # 16 items: 8 s of writing
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "saving\n"
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        seconds = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGINT, err
    lines = err.splitlines()
    cancelled = [ln for ln in lines if "save of step 5 cancelled" in ln]
    assert len(cancelled) == 1 and "nothing was published" in cancelled[0], err
    assert err.count("During handling of the above exception") == 1, err
    assert lines[-1] == "KeyboardInterrupt" and len(lines) <= 32, err
    assert not (root / "step_5").exists() and not list(root.glob(".tmp-*"))
    assert seconds < 15, seconds


@pytest.mark.parametrize("where", ["preparing", "failed"])
@pytest.mark.asyncio
async def test_an_entry_cancelled_or_failed_while_preparing_the_root_leaves_it_unlocked(
    root: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The writer lock is taken in a worker thread: an entry cancelled meanwhile (here by
    asyncio.timeout, which does not wait for the thread), or a preparation that fails
    after the lock is taken, once left the root locked for the rest of the process."""
    from aiodcp._disk import _storage

    real = _storage.reconcile
    finished = threading.Event()

    def slow_reconcile(path: Path) -> list[int]:
        try:
            time.sleep(0.5)
            if where == "failed":
                raise OSError("injected: cannot read the commit log")
            return real(path)
        finally:
            finished.set()

    monkeypatch.setattr(_storage, "reconcile", slow_reconcile)
    with pytest.raises((TimeoutError, OSError)):
        async with asyncio.timeout(0.2 if where == "preparing" else 30):
            async with aiodcp.AsyncCheckpointer(root):
                pass
    monkeypatch.setattr(_storage, "reconcile", real)
    await anyio.to_thread.run_sync(finished.wait, 10)
    error = None
    for _ in range(50):  # the abandoned thread lets go of the lock right after
        try:
            async with aiodcp.AsyncCheckpointer(root) as ckpt:
                await (await ckpt.save({"x": torch.ones(3)}, step=0))
            return
        except aiodcp.CheckpointError as exc:
            error = exc
            await anyio.sleep(0.1)
    raise AssertionError(f"the root stayed locked: {error}")
