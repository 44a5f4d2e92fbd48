"""Verified commits and checked loads: writer-thread I/O errors fail the save, manifests
catch flipped bytes, load errors are typed, foreign DCP directories are left alone."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
import torch
import torch.distributed.checkpoint as dcp

import aiodcp
from aiodcp import (
    CheckpointCancelledError,
    CheckpointCorruptError,
    CheckpointMismatchError,
    SaveFailedError,
)
from aiodcp._disk import _manifest, _retention
from aiodcp._disk import _storage as s
from aiodcp._tools._cli import main as cli

pytestmark = pytest.mark.asyncio

UNIT = 64 * 1024  # floats: 256 KiB


def _litter(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".tmp", ".trash")))


def _commit(root: Path, step: int, value: float) -> Path:
    tmp = s.tmp_dir(root, step, "t")
    dcp.save(
        {"x": torch.full((1000,), value), "y": torch.arange(8.0)}, checkpoint_id=tmp, no_dist=True
    )
    return s.commit(root, tmp, step, overwrite=False)


async def _run(fn, *args):  # type: ignore[no-untyped-def]
    """Blocking aiodcp calls (storage, CLI) off the loop: blockbuster watches it."""
    return await anyio.to_thread.run_sync(fn, *args)


def _flip(file: Path, at: int) -> None:
    data = bytearray(file.read_bytes())
    data[at] ^= 0xFF
    file.write_bytes(bytes(data))


# ------------------------------------------------------------ writer thread errors
@pytest.mark.parametrize(
    "units, failing",
    [
        ((10, 6), "__0_0.distcp"),  # writer thread 1's file is the big one
        ((10, 6, 6), "__0_1.distcp"),  # writer thread 2's file (6 + 6) is the big one
    ],
    ids=["thread1", "thread2"],
)
async def test_file_too_large_in_any_writer_thread_fails_the_save(
    root: Path, units: tuple[int, ...], failing: str
) -> None:
    """EFBIG (prlimit --fsize on the daemon) in either writer thread: SaveFailedError naming
    "File too large" and the file; nothing published; the older step still loads."""
    state = {f"t{i}": torch.full((n * UNIT,), float(i)) for i, n in enumerate(units)}
    async with aiodcp.AsyncCheckpointer(root, thread_count=2) as ckpt:
        await (await ckpt.save(state))
        sizes = {p.name: p.stat().st_size for p in (root / "step_0").glob("*.distcp")}
        small, big = sorted(sizes.values())
        assert sizes[failing] == big
        limit = (small + big) // 2
        await anyio.run_process(["prlimit", f"--pid={ckpt.worker_pid}", f"--fsize={limit}"])
        with pytest.raises(SaveFailedError, match="File too large") as info:
            await (await ckpt.save(state))
        assert failing in str(info.value)
        assert await ckpt.steps() == [0] and _litter(root) == []
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    assert await aiodcp.load(out, root, verify=True) == 0
    assert all(torch.equal(out[k], v) for k, v in state.items())


async def test_cancel_while_writing_prints_no_thread_traceback(
    root: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancelled save with two writer threads: no "Exception in thread" on stderr, and a
    one-line reason without DCP's traceback."""
    monkeypatch.setenv("AIODCP_TEST_SLOW_WRITE", "0.1")
    async with aiodcp.AsyncCheckpointer(root, thread_count=2) as ckpt:
        handle = await ckpt.save({f"t{i}": torch.ones(1000) for i in range(8)})
        await anyio.sleep(0.25)
        assert handle.cancel()
        with pytest.raises(CheckpointCancelledError) as info:
            await handle
        assert await ckpt.steps() == []
    err = capfd.readouterr().err
    assert "Exception in thread" not in err and "SaveCancelled" not in err
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


async def test_manifest_written_while_writing_matches_the_disk(root: Path) -> None:
    """The writer's manifest (hashed as it wrote) lists .metadata and every data file with
    the size and xxh3_64 a fresh read of the disk gives."""
    async with aiodcp.AsyncCheckpointer(root, thread_count=2) as ckpt:
        path = (
            await (await ckpt.save({"a": torch.randn(5000), "b": torch.randn(70), "n": 3}))
        ).path
    manifest = await _run(_manifest.read_manifest, path)
    assert manifest is not None
    on_disk = sorted(p.name for p in path.iterdir() if p.name != _manifest.MANIFEST)
    assert sorted(manifest) == on_disk == [".metadata", "__0_0.distcp", "__0_1.distcp"]
    for name, entry in manifest.items():
        assert await _run(_manifest.file_digest, path / name) == entry
    doc = json.loads((path / _manifest.MANIFEST).read_text())
    assert doc["format"] == "aiodcp-manifest" and doc["version"] == 1 and doc["step"] == 0


# ------------------------------------------------------------------- flipped bytes
@pytest.mark.parametrize("victim", ["__0_0.distcp", ".metadata"])
async def test_flipped_byte_is_named_by_verify_and_skipped_by_fallback(
    tmp_path: Path,
    victim: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One flipped byte in step 1: verify names step and file; load(verify=True) raises it;
    fallback loads step 0 and logs why it skipped step 1; `aiodcp verify` exits 1."""
    root = tmp_path
    for step in (0, 1):
        await _run(_commit, root, step, float(step))
    file = root / "step_1" / victim
    _flip(file, file.stat().st_size // 2)
    with pytest.raises(CheckpointCorruptError, match=f"step 1: .*{victim}") as info:
        await _run(lambda: _manifest.verify(root / "step_1", checksums=True))
    assert (info.value.step, info.value.file) == (1, victim)
    out = {"x": torch.zeros(1000), "y": torch.zeros(8)}
    with pytest.raises(CheckpointCorruptError, match=victim):
        await aiodcp.load(out, root, verify=True)
    with caplog.at_level(logging.WARNING, logger="aiodcp"):
        assert await aiodcp.load(out, root, verify=True, fallback=True) == 0
    assert torch.equal(out["x"], torch.zeros(1000))
    assert any(
        "skipping step 1" in r.getMessage() and victim in r.getMessage() for r in caplog.records
    )
    assert await _run(cli, ["verify", str(root)]) == 1
    text = capsys.readouterr().out
    assert "step 0: ok" in text and "step 1: FAILED" in text and victim in text
    assert await _run(cli, ["verify", str(root), "--step", "0", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and [r["step"] for r in doc["steps"]] == [0]


async def test_truncated_latest_falls_back_even_without_checksums(tmp_path: Path) -> None:
    """Sizes are always checked: a truncated latest raises; fallback loads the one before."""
    for step in (0, 1):
        await _run(_commit, tmp_path, step, float(step))
    data = tmp_path / "step_1" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-10])
    out = {"x": torch.zeros(1000), "y": torch.zeros(8)}
    with pytest.raises(CheckpointCorruptError, match="truncated"):
        await aiodcp.load(out, tmp_path)
    assert await aiodcp.load(out, tmp_path, fallback=True) == 0
    with pytest.raises(CheckpointCorruptError, match=r"no step .* verifies"):
        (tmp_path / "step_0" / "__0_0.distcp").unlink()
        await aiodcp.load(out, tmp_path, fallback=True)


async def test_dcp_failure_is_a_one_line_checkpoint_error(tmp_path: Path) -> None:
    """A failure inside DCP's load (here: a data file's header damaged, sizes intact, no
    checksums asked) is a CheckpointError with DCP's reason, not a BaseException."""
    await _run(_commit, tmp_path, 0, 1.0)
    _flip(tmp_path / "step_0" / "__0_0.distcp", 0)
    with pytest.raises(aiodcp.CheckpointError) as info:
        await aiodcp.load({"x": torch.zeros(1000), "y": torch.zeros(8)}, tmp_path)
    assert "loading" in str(info.value) and "Traceback" not in str(info.value)


# ------------------------------------------------------------------- typed mismatches
async def test_missing_key_and_wrong_shape_are_named(root: Path) -> None:
    """Keys the checkpoint lacks and tensors of another shape raise CheckpointMismatchError
    naming each (from ckpt.load and aiodcp.load); extra checkpoint keys are fine."""
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        await (await ckpt.save({"w": torch.ones(4, 4), "b": torch.ones(4), "old": torch.ones(2)}))
        with pytest.raises(CheckpointMismatchError) as info:
            await ckpt.load({"w": torch.zeros(3, 4), "b": torch.zeros(4), "new": torch.zeros(2)})
    err = info.value
    assert err.missing == ("new",) and err.mismatched == {"w": ((3, 4), (4, 4))}
    assert "old" in err.unexpected
    assert "'new'" in str(err) and "(3, 4)" in str(err) and "(4, 4)" in str(err)
    with pytest.raises(CheckpointMismatchError, match="'new'"):
        await aiodcp.load({"new": torch.zeros(2)}, root)
    out = {"b": torch.zeros(4)}  # a subset of the checkpoint loads
    assert await aiodcp.load(out, root) == 0 and torch.equal(out["b"], torch.ones(4))


# ------------------------------------------------------------- foreign DCP directories
async def test_plain_dcp_steps_are_listed_loadable_and_never_deleted(tmp_path: Path) -> None:
    """A root holding plain dcp.save step dirs: listed, loadable (also with verify=True),
    never deleted by retention or `aiodcp gc`; retention counts only aiodcp's steps."""
    root = tmp_path
    dcp.save(
        {"x": torch.full((1000,), 7.0), "y": torch.zeros(8)},
        checkpoint_id=root / "step_0",
        no_dist=True,
    )
    for step in (1, 2, 3):
        await _run(_commit, root, step, float(step))
    assert await _run(s.list_steps, root) == [0, 1, 2, 3]
    assert not await _run(s.is_managed, root, 0) and await _run(s.is_managed, root, 3)
    assert await _run(s.is_committed, root, 0)
    assert await _run(_retention.apply_retention, root, 1, None) == [1, 2]
    assert await _run(cli, ["gc", str(root)]) == 0
    assert await _run(s.list_steps, root) == [0, 3]
    out = {"x": torch.zeros(1000), "y": torch.ones(8)}
    assert await aiodcp.load(out, root, step=0, verify=True) == 0
    assert torch.equal(out["x"], torch.full((1000,), 7.0))
    proc = await anyio.run_process(
        [sys.executable, "-m", "aiodcp", "verify", str(root)], check=False, stderr=subprocess.STDOUT
    )
    assert proc.returncode == 0, proc.stdout
    assert b"step 0: ok (sizes (no aiodcp manifest))" in proc.stdout
