"""The public surface, trio support, and scripts/notebooks without a __main__ guard."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import aiodcp

from .conftest import run_script


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
        "Guard",
        "ProtocolError",
        "SaveEvent",
        "SaveFailedError",
        "SaveHandle",
        "SaveResult",
        "WorkerDiedError",
        "__version__",
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
    r = run_script(script.read_text(), str(tmp_path / "ckpt"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("saved 0") == 1
