"""The public surface, trio support, and scripts/notebooks without a __main__ guard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aiodcp

from .conftest import REPO


def test_one_word_for_the_daemon_and_the_old_names_still_work() -> None:
    """The child process is "the daemon" everywhere; the older "worker" names are aliases."""
    assert aiodcp.WorkerDiedError is aiodcp.DaemonDiedError
    assert aiodcp.AsyncCheckpointer.worker_pid.__doc__ and aiodcp.AsyncCheckpointer.daemon_pid


def test_public_api_is_pinned() -> None:
    assert aiodcp.__all__ == sorted(aiodcp.__all__)
    assert aiodcp.__all__ == [
        "AsyncCheckpointer",
        "CheckpointCancelledError",
        "CheckpointCorruptError",
        "CheckpointError",
        "CheckpointExistsError",
        "CheckpointMismatchError",
        "CheckpointNotFoundError",
        "DaemonDiedError",
        "Follower",
        "Guard",
        "ProtocolError",
        "Publisher",
        "PublisherGoneError",
        "SaveEvent",
        "SaveFailedError",
        "SaveHandle",
        "SaveResult",
        "Version",
        "WorkerDiedError",
        "__version__",
        "follow",
        "hold",
        "load",
        "watch",
    ]
    for name in aiodcp.__all__:
        if name != "__version__":
            assert getattr(aiodcp, name).__doc__, f"{name} has no docstring"
    for err in (
        "WorkerDiedError",
        "SaveFailedError",
        "CheckpointNotFoundError",
        "CheckpointCancelledError",
        "CheckpointExistsError",
        "CheckpointCorruptError",
        "CheckpointMismatchError",
        "ProtocolError",
    ):
        assert issubclass(getattr(aiodcp, err), aiodcp.CheckpointError)


def test_runs_under_trio(root: Path) -> None:
    """The library is written on anyio: a save/load round trip under trio."""
    import trio

    async def main() -> int:
        async with aiodcp.AsyncCheckpointer(root) as ckpt:
            await (await ckpt.save({"x": torch.arange(5.0)}))
            out = {"x": torch.zeros(5)}
            step = await ckpt.load(out)
            assert torch.equal(out["x"], torch.arange(5.0))
            return step

    assert trio.run(main) == 0

    async def start_needs_asyncio() -> None:
        with pytest.raises(RuntimeError, match="asyncio"):
            await aiodcp.AsyncCheckpointer(root).start()

    trio.run(start_needs_asyncio)


NO_GUARD = """
import asyncio, sys, torch, aiodcp
# no `if __name__ == "__main__":` guard, as in a notebook or a quick script
print("module ran", flush=True)  # a daemon that re-ran this file would print it again
async def main():
    async with aiodcp.AsyncCheckpointer(sys.argv[1]) as ckpt:
        r = await (await ckpt.save({"x": torch.ones(4)}))
        print("saved", r.step)
asyncio.run(main())
"""


def test_script_without_main_guard(tmp_path: Path) -> None:
    """The daemon is aiodcp's own entry point, so the user's __main__ is never re-imported."""
    script = tmp_path / "train.py"
    script.write_text(NO_GUARD)
    # a real file, run as `python train.py` (multiprocessing's spawn re-runs such a file
    # in its child; with `python -c` there would be nothing to re-run); the daemon's
    # stdout is the script's, so a re-run shows
    r = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},  # this checkout's aiodcp
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["module ran", "saved 0"], r.stdout
