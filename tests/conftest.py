"""Shared fixtures: async tests run on asyncio (the core ones on uvloop too), blockbuster on."""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvloop
from blockbuster import blockbuster_ctx

# aiodcp loads its torch-side names on first use (PEP 562, so that `aiodcp ls` starts
# without torch); load them now, not on a first access inside an async test under
# blockbuster (the import machinery's file reads would count as blocking calls).
import aiodcp._parent._checkpointer
import aiodcp._parent._guard
import aiodcp._parent._load
import aiodcp._parent._watch  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


# The core contract runs on both loops; the rest (daemon faults, scale) on asyncio,
# to keep the suite's time in check. Trio has its own smoke test (test_api.py).
BOTH_LOOPS = {"test_checkpointer", "test_watch", "test_overlap"}


def pytest_asyncio_loop_factories(config, item):  # type: ignore[no-untyped-def]
    if item.module.__name__.rsplit(".", 1)[-1] in BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


# ------------------------------------------------------------------ parallel runs
# The suite runs on 2 pytest-xdist workers. A test marked ``serial`` (it measures time:
# loop lag, how soon something returns) runs alone: it takes this lock exclusively,
# every other test takes it shared. The lock is taken before pytest-timeout starts a
# test's clock, so waiting for it never counts against the test's own timeout. A serial
# test whose timed part ends early (the rest only checks results) calls the ``timing_done``
# fixture: its lock turns shared, and the others run beside the rest of it.
_RUN_LOCK = Path(tempfile.gettempdir()) / (
    f"aiodcp-tests-{os.getppid() if os.environ.get('PYTEST_XDIST_WORKER') else os.getpid()}.lock"
)
_LOCK_FD = pytest.StashKey[int]()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        yield
        return
    fd = os.open(_RUN_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        exclusive = item.get_closest_marker("serial") is not None
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        item.stash[_LOCK_FD] = fd
        yield
    finally:
        item.stash[_LOCK_FD] = -1
        os.close(fd)


@pytest.fixture
def timing_done(request: pytest.FixtureRequest) -> Callable[[], None]:
    """For a ``serial`` test: call it when the part that measures time is over; from
    then on other tests run beside this one (its lock turns shared)."""
    assert request.node.get_closest_marker("serial") is not None, "only for serial tests"

    def done() -> None:
        fd = request.node.stash.get(_LOCK_FD, -1)
        if fd >= 0:  # (none without xdist: the test runs alone anyway)
            fcntl.flock(fd, fcntl.LOCK_SH)

    return done


@pytest.fixture(autouse=True)
def _no_blocking_in_aiodcp(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail an async test if aiodcp makes a blocking call on the event loop thread."""
    if request.node.get_closest_marker("asyncio") is None:
        yield
        return
    with blockbuster_ctx(["aiodcp"]):
        yield


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "ckpt"


def daemon_pids() -> set[int]:
    """pids of live aiodcp daemons (on this machine; callers look up a pid they know)."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()  # "aiodcp-daemon" (forked or spawned)
        except OSError:
            continue
        if (
            comm == "aiodcp-daemon" or any(b"aiodcp._daemon._daemon" in a for a in cmd)
        ) and " Z " not in stat:
            out.add(int(entry))
    return out


def torchrun(*args: str) -> list[str]:
    """A torchrun command line for 2 ranks on loopback. Standalone: torchrun's store
    listens on a port the OS gives it and hands it to the ranks as MASTER_PORT (a port
    found free by bind-then-close could be taken by a parallel test before it is used)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--local-addr",
        "127.0.0.1",
        "--nproc-per-node",
        "2",
        *args,
    ]


def run_script(
    code: str,
    *args: str,
    timeout: float = 90,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as a fresh Python script (no pytest, no __main__ guard needed)."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def run_example(path: Path, *argv: str, cwd: Path) -> None:
    """Run an example file in this process, as ``python path argv`` in ``cwd`` would
    (for a test that only needs what it writes: a fresh interpreter would import torch
    once more); its output goes to the test's captured output."""
    import contextlib
    import runpy

    with contextlib.chdir(cwd), pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [str(path), *argv])
        runpy.run_path(str(path), run_name="__main__")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests marked ``slow`` first (in their order): handed out last, one of them
    would keep one worker busy long after the other ran out of tests."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
