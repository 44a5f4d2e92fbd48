"""Daemons are forked from a warm fork server (aiodcp/_parent/_spawner.py): the second
daemon of a process starts in milliseconds, is the daemon a spawn would have started
(this process's environment and working directory now), and a dead server costs a
restart, never a checkpoint."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import anyio
import pytest
import torch

import aiodcp
from aiodcp._parent import _spawner

from .conftest import daemon_pids, run_script
from .torture import _alive


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


async def _roundtrip(root: Path, step: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        entered = time.perf_counter() - t0
        pid = ckpt.daemon_pid
        assert pid is not None
        await (await ckpt.save({"x": torch.full((100,), float(step))}, step=step))
    return entered, pid


@pytest.mark.asyncio
async def test_later_daemons_are_forked_warm_with_the_current_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _roundtrip(tmp_path / "a", 0)  # the server is warm from here on
    monkeypatch.setenv("AIODCP_TEST_SLOW_WRITE", "0.6")  # read by the daemon, per write
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    async with aiodcp.AsyncCheckpointer(tmp_path / "b") as ckpt:
        entered = time.perf_counter() - t0
        pid = ckpt.daemon_pid
        assert pid is not None
        server = _ppid(pid)
        assert _comm(pid) == "aiodcp-daemon" and _comm(server) == "aiodcp-forksrv"
        assert server != os.getpid()
        assert os.readlink(f"/proc/{pid}/cwd") == str(tmp_path)
        assert os.getsid(pid) == pid  # its own session: Ctrl-C to our group is not for it
        t1 = time.perf_counter()
        await (await ckpt.save({"x": torch.ones(10)}, step=3))
        assert time.perf_counter() - t1 >= 0.6  # it has the environment of now
    assert entered < 2.0, f"a warm start took {entered:.2f}s"
    assert pid not in daemon_pids()


@pytest.mark.asyncio
async def test_a_killed_fork_server_costs_a_restart_not_a_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await _roundtrip(tmp_path / "warm", 0)
    async with aiodcp.AsyncCheckpointer(tmp_path / "a") as ckpt:
        pid = ckpt.daemon_pid
        assert pid is not None
        server = _ppid(pid)
        os.kill(server, signal.SIGKILL)
        while _ppid(pid) == server:  # noqa: ASYNC110  (reparented once the server is gone)
            await anyio.sleep(0.02)
        # its daemon serves on: a save commits, the block closes in bounded time
        with anyio.fail_after(30):
            await (await ckpt.save({"x": torch.ones(10)}, step=1))
    assert pid not in daemon_pids()
    with caplog.at_level(logging.INFO, "aiodcp"):
        await _roundtrip(tmp_path / "b", 2)  # a new server
    assert _spawner._server is not None and _spawner._server.process.pid != server
    assert await aiodcp.load({"x": torch.zeros(10)}, tmp_path / "a") == 1


@pytest.mark.asyncio
async def test_the_fork_server_can_be_turned_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIODCP_FORKSERVER", "0")
    async with aiodcp.AsyncCheckpointer(tmp_path / "a") as ckpt:
        assert ckpt.daemon_pid is not None and _ppid(ckpt.daemon_pid) == os.getpid()


def test_the_fork_server_and_its_daemons_go_with_the_trainer(tmp_path: Path) -> None:
    """A trainer that exits without closing (a script's last line, os._exit) leaves no
    fork server and no daemon behind."""
    code = """
import asyncio, os, sys, torch, aiodcp
async def main():
    ckpt = aiodcp.AsyncCheckpointer(sys.argv[1])
    await ckpt.__aenter__()
    await (await ckpt.save({"x": torch.ones(10)}, step=0))
    d = ckpt.daemon_pid
    print(d, open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1], flush=True)
    os._exit(0)
asyncio.run(main())
"""
    out = run_script(code, str(tmp_path / "r"), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    daemon, server = map(int, out.stdout.split())
    t0 = time.perf_counter()
    while _alive(daemon) or _alive(server):
        assert time.perf_counter() - t0 < 10, f"left behind: {daemon=} {server=}"
        time.sleep(0.05)


if sys.platform != "linux":  # pragma: no cover
    pytest.skip("Linux only", allow_module_level=True)


def test_no_daemon_module_reads_the_environment_at_import() -> None:
    """A daemon forked from the server runs modules the server imported long before:
    whatever they read from the environment at import is the server's, not the
    daemon's. So daemon-side code reads it when it runs (two test hooks once did not,
    and a forked daemon ignored the slow-write setting of its own test)."""
    import ast

    rooms = Path(aiodcp.__file__).parent
    wrong = []
    for path in [*(rooms / "_daemon").glob("*.py"), *(rooms / "_disk").glob("*.py")]:
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if not isinstance(n, ast.FunctionDef | ast.ClassDef)]
        for node in top:
            for sub in ast.walk(node):
                if isinstance(sub, ast.Attribute) and sub.attr in ("environ", "getenv"):
                    wrong.append(f"{path.name}:{sub.lineno}")
    assert not wrong, f"module-level environment reads in daemon-side code: {wrong}"


def test_a_fork_server_that_does_not_answer_in_time_is_never_asked_again() -> None:
    """A request that times out (the server stopped, or frozen with its cgroup) gives the
    server up: killed, so neither does the late request fork a daemon nor is its late
    answer read as the answer to the next request (it once was: the next checkpointer
    was handed the previous request's pid and pidfd)."""
    srv = _spawner.ForkServer(start_timeout=120)
    try:
        srv.sock.settimeout(0.5)
        os.kill(srv.process.pid, signal.SIGSTOP)
        ours, theirs = socket.socketpair()
        r, w = os.pipe()
        try:
            with pytest.raises(_spawner.Unavailable):
                srv.fork(["--config", "{}"], [theirs.fileno(), w])
            if srv.process.poll() is None:  # was: alive, and about to answer late
                os.kill(srv.process.pid, signal.SIGCONT)
            assert not srv.alive
            time.sleep(0.3)  # time for a late fork, were the server still there
            assert srv.process.poll() is not None, "the server lives on"
        finally:
            for s in (ours, theirs):
                s.close()
            os.close(r)
            os.close(w)
    finally:
        if srv.process.poll() is None:
            os.kill(srv.process.pid, signal.SIGCONT)
            os.kill(srv.process.pid, signal.SIGKILL)
            srv.process.wait()
        srv.sock.close()


@pytest.mark.asyncio
async def test_a_fork_whose_answer_is_lost_leaves_no_daemon_on_the_channel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fork request that got no answer may still have made a daemon. The daemon
    spawned instead gets a channel of its own, and the lost daemon sees EOF and exits
    (it once shared the socket with the spawned one: two daemons on one channel)."""
    srv = await anyio.to_thread.run_sync(_spawner.server, 120.0)
    lost: list[int] = []
    real = srv._request

    def lossy(msg: dict[str, object], fds: list[int]) -> tuple[dict[str, object], list[int]]:
        out, got = real(msg, fds)
        if msg["op"] == "fork" and not lost:
            lost.append(int(str(out["pid"])))
            for fd in got:
                os.close(fd)
            raise _spawner.Unavailable("the answer was lost (test)")
        return out, got

    monkeypatch.setattr(srv, "_request", lossy)
    with caplog.at_level(logging.WARNING, "aiodcp"), anyio.fail_after(100):
        async with aiodcp.AsyncCheckpointer(tmp_path) as ckpt:
            spawned = ckpt.daemon_pid
            assert lost and spawned != lost[0]
            # gone long before the spawned daemon was ready (it once served the
            # channel until the spawned daemon's Hello broke it, and a restart)
            assert not _alive(lost[0])
            await (await ckpt.save({"x": torch.ones(10)}, step=1))
            assert ckpt.daemon_pid == spawned
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    monkeypatch.undo()
    # the lost daemon exited and is reaped: no zombie left in the server
    assert await anyio.to_thread.run_sync(srv.reap, lost[0]) is not None


def _exists(pid: int) -> bool:
    """Whether ``pid`` is still a process, a zombie included (not reaped)."""
    return os.path.exists(f"/proc/{pid}")


def _pidfds() -> set[int]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]":
                out.add(int(fd))
        except OSError:
            pass
    return out


@pytest.mark.asyncio
async def test_a_task_cancelled_during_the_fork_leaves_no_daemon_and_no_pidfd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncio's own cancellation (task.cancel(), asyncio.timeout) is not held off by a
    shield: a task cancelled while the server forks its daemon drops the result. The
    daemon is then killed and reaped, its pidfd closed (it once stayed a zombie in the
    server, and the pidfd stayed open, one per cancelled start)."""
    import asyncio
    import threading

    srv = await anyio.to_thread.run_sync(_spawner.server, 120.0)
    forking, forked = threading.Event(), threading.Event()
    pids: list[int] = []
    real = srv.fork

    def slow_fork(argv: list[str], fds: list[int]) -> _spawner.ForkedProcess:
        forking.set()
        time.sleep(0.3)  # the task is cancelled meanwhile
        proc = real(argv, fds)
        pids.append(proc.pid)
        forked.set()
        return proc

    monkeypatch.setattr(srv, "fork", slow_fork)
    before = _pidfds()

    async def enter() -> None:
        async with aiodcp.AsyncCheckpointer(tmp_path):
            pass

    task = asyncio.ensure_future(enter())
    while not forking.is_set():  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await anyio.to_thread.run_sync(forked.wait, 10.0)
    (pid,) = pids
    t0 = time.perf_counter()
    while _exists(pid) or _pidfds() - before:
        assert time.perf_counter() - t0 < 10, f"daemon {pid} or a pidfd left behind"
        await asyncio.sleep(0.05)
