"""Two real ranks on GLOO over loopback (torchrun), each with its own daemon."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
import torch

import aiodcp

from .conftest import REPO, torchrun

WORKER = REPO / "tests" / "multirank_worker.py"


async def _one_rank(root: Path) -> None:
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        await (await ckpt.save({"w": torch.arange(64.0).reshape(8, 8)}))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["fresh-port", "prefix"])
@pytest.mark.slow
def test_two_ranks(tmp_path: Path, mode: str) -> None:
    """DTensor save read back by plain dcp.load, 2-rank load, cancel agreement, retention,
    1-rank checkpoint into 2 ranks; in prefix mode also a clean start-up failure."""
    one = tmp_path / "one"
    asyncio.run(_one_rank(one))  # here: a fresh interpreter would import torch once more
    cmd = torchrun(str(WORKER), str(tmp_path / "ckpt"), str(one), mode)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=220, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    expected = ["peer-daemon-death"] if mode == "fresh-port" else ["init-failure"]
    expected += [
        "dtensor-save-plain-load",
        "two-rank-load",
        "cancel-agreement",
        "retention",
        "one-rank-into-two",
    ]
    for name in expected:
        assert f"OK {name}" in proc.stdout, out[-6000:]


OWNERSHIP = REPO / "tests" / "multirank_ownership.py"


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_two_ranks_restart_together_and_fence_old_daemons(tmp_path: Path) -> None:
    """Issue 10 (obs 4, 5, 13, 14) and issue 11 on 2 real ranks: idle death restarts
    every rank's daemon together; a peer's death is a failure, never a cancel; an old
    daemon's late exit touches nothing of the new one; the agreement is cancellable and
    bounded; 10,000 tensors round-trip; a state dict that does not fit the checkpoint is
    the same CheckpointMismatchError on both ranks."""
    cmd = torchrun(str(OWNERSHIP), str(tmp_path))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    for name in [
        "idle-death-restarts-every-rank",
        "peer-death-is-a-failure-and-old-generations-are-fenced",
        "ten-thousand-tensors",
        "mismatch-is-typed-on-every-rank",
        "agreement-is-cancellable-and-bounded",
    ]:
        assert f"OK {name}" in proc.stdout, out[-8000:]
