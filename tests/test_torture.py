"""The seeded randomized torture test: random schedules of calls and faults.

A short run is part of the suite. A long one::

    AIODCP_TORTURE_SCHEDULES=5000 AIODCP_TORTURE_SEED=$RANDOM pytest tests/test_torture.py

The seed is printed, and named in every failure, so a failing schedule replays.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, torchrun

TORTURE = REPO / "tests" / "torture.py"
SEED = os.environ.get("AIODCP_TORTURE_SEED", "20261129")
SCHEDULES = int(os.environ.get("AIODCP_TORTURE_SCHEDULES", "100"))
LONG = SCHEDULES > 200  # the suite's short run stays bounded


@pytest.mark.timeout(0 if LONG else 300)  # 0: no limit (None would mean the default)
@pytest.mark.slow
def test_random_schedules_one_rank(tmp_path: Path) -> None:
    """100 random schedules (by default) on asyncio (see tests/torture.py for the
    operations, asyncio's own cancellation among them, and the invariants): every handle
    resolves in bounded time to an outcome its operation allows, every commit loads
    bit-exact, nothing partial is listed, every published version a reader sees is whole
    and unchanged while leased, nothing leaks at any close (memfds, mappings, /dev/shm)."""
    cmd = [sys.executable, str(TORTURE), str(tmp_path), "--seed", SEED]
    cmd += ["--schedules", str(SCHEDULES)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=None if LONG else 280)
    print(proc.stdout)
    assert proc.returncode == 0, f"seed {SEED}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert f"OK {SCHEDULES} schedules" in proc.stdout


@pytest.mark.timeout(0 if LONG else 300)
def test_random_schedules_one_rank_on_trio(tmp_path: Path) -> None:
    """The same on trio (its own cancellation: anyio scopes are trio's), a fifth as many."""
    n = max(1, SCHEDULES // 5)
    cmd = [sys.executable, str(TORTURE), str(tmp_path), "--seed", SEED, "--backend", "trio"]
    proc = subprocess.run(
        [*cmd, "--schedules", str(n)], capture_output=True, text=True, timeout=None if LONG else 280
    )
    print(proc.stdout)
    assert proc.returncode == 0, f"seed {SEED}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert f"OK {n} schedules" in proc.stdout


@pytest.mark.timeout(0 if LONG else 300)  # 0: no limit (None would mean the default)
@pytest.mark.slow
def test_random_schedules_two_ranks(tmp_path: Path) -> None:
    """The same on 2 real ranks, one seed driving both; faults hit one rank at a time:
    both ranks agree on every step's outcome as well."""
    n = max(1, SCHEDULES // 8)
    cmd = torchrun(str(TORTURE), str(tmp_path), "--seed", SEED, "--schedules", str(n))
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=None if LONG else 280, cwd=tmp_path
    )
    print(proc.stdout)
    assert proc.returncode == 0, f"seed {SEED}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.stdout.count(f"OK {n} schedules") == 2
