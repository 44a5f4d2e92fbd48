"""On-disk layout: atomic commit, listing, leftovers, retention, holds, verification."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from aiodcp import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
)
from aiodcp._disk import _manifest, _retention
from aiodcp._disk import _storage as s


def _write_tmp(root: Path, step: int, value: float = 1.0) -> Path:
    tmp = s.tmp_dir(root, step, s.new_token())
    dcp.save({"x": torch.full((4,), value)}, checkpoint_id=tmp, no_dist=True)
    return tmp


def test_only_committed_steps_are_listed(tmp_path: Path) -> None:
    """Temporary dirs, dirs without .metadata and stray names never count as steps."""
    _write_tmp(tmp_path, 5)
    (tmp_path / "step_7").mkdir()  # no .metadata: not a checkpoint
    (tmp_path / "step_x").mkdir()
    assert s.list_steps(tmp_path) == []
    s.commit(tmp_path, _write_tmp(tmp_path, 3), 3, overwrite=False)
    assert s.list_steps(tmp_path) == [3]
    assert (tmp_path / "latest").read_text().strip() == "3"


def test_commit_log_records_each_commit_once(tmp_path: Path) -> None:
    assert s.read_commits(tmp_path, 0) is None
    for step in (1, 2):
        s.commit(tmp_path, _write_tmp(tmp_path, step), step, overwrite=False)
    steps, offset = s.read_commits(tmp_path, 0)  # type: ignore[misc]
    assert steps == [1, 2]
    with open(tmp_path / ".commits", "ab") as f:
        f.write(b"3")  # a line still being written is not consumed
    assert s.read_commits(tmp_path, offset) == ([], offset)


def test_commit_refuses_existing_step_unless_overwrite(tmp_path: Path) -> None:
    s.commit(tmp_path, _write_tmp(tmp_path, 1, 1.0), 1, overwrite=False)
    tmp = _write_tmp(tmp_path, 1, 2.0)
    with pytest.raises(CheckpointExistsError):
        s.commit(tmp_path, tmp, 1, overwrite=False)
    s.commit(tmp_path, tmp, 1, overwrite=True)
    out = {"x": torch.zeros(4)}
    dcp.load(out, checkpoint_id=tmp_path / "step_1", no_dist=True)
    assert torch.equal(out["x"], torch.full((4,), 2.0))
    # the old step waits in the trash until no reader holds step 1, then goes
    dotted = [p.name for p in tmp_path.iterdir() if p.name.startswith(".t")]
    assert not tmp.exists() and len(dotted) == 1 and dotted[0].startswith(".trash-step_1-")
    assert len(_retention.remove_unheld_trash(tmp_path)) == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".t")] == []


def test_commit_refuses_a_directory_without_metadata(tmp_path: Path) -> None:
    tmp = s.tmp_dir(tmp_path, 1, "t")
    tmp.mkdir()
    with pytest.raises(CheckpointError, match=r"no \.metadata"):
        s.commit(tmp_path, tmp, 1, overwrite=False)
    assert s.list_steps(tmp_path) == []


def test_cleanup_removes_leftovers_and_keeps_committed(tmp_path: Path) -> None:
    s.commit(tmp_path, _write_tmp(tmp_path, 1), 1, overwrite=False)
    _write_tmp(tmp_path, 2)
    (tmp_path / f".trash-step_0-{s.new_token()}").mkdir()
    removed = _retention.cleanup_leftovers(tmp_path)
    assert len(removed) == 2
    assert s.list_steps(tmp_path) == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".commits", "latest", "step_1"]


@pytest.mark.parametrize(
    "steps, keep_last, keep_every, victims",
    [
        ([1, 2, 3, 4, 5], 2, None, [1, 2, 3]),
        ([10, 20, 30, 40, 50], 1, 20, [10, 30]),
        ([1, 2], 5, None, []),
        ([1, 2, 3], None, None, []),
        ([0, 5, 10, 15], 1, 10, [5]),
    ],
)
def test_retention_policy(
    steps: list[int], keep_last: int | None, keep_every: int | None, victims: list[int]
) -> None:
    assert _retention.retention_victims(steps, keep_last, keep_every) == victims


def test_retention_spares_held_steps_and_reclaims_stale_leases(tmp_path: Path) -> None:
    """A live lease keeps a step; a lease whose holder died does not."""
    for step in (1, 2, 3):
        s.commit(tmp_path, _write_tmp(tmp_path, step), step, overwrite=False)
    fd = _retention.hold_step(tmp_path, 1)
    # a holder that dies while holding step 2
    code = (
        "import sys; from pathlib import Path; from aiodcp._disk import _retention;"
        "_retention.hold_step(Path(sys.argv[1]), 2)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)
    assert _retention.apply_retention(tmp_path, 1, None) == [2]
    assert s.list_steps(tmp_path) == [1, 3]
    _retention.release_hold(tmp_path, fd)
    assert _retention.apply_retention(tmp_path, 1, None) == [1]
    assert s.list_steps(tmp_path) == [3]
    assert list((tmp_path / ".holds").glob("step_*")) == []


def test_hold_of_missing_step_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        _retention.hold_step(tmp_path, 9)


def test_verify_names_missing_and_truncated_files(tmp_path: Path) -> None:
    path = s.commit(tmp_path, _write_tmp(tmp_path, 1), 1, overwrite=False)
    _manifest.verify(path, checksums=False)
    data = next(path.glob("*.distcp"))
    os.truncate(data, data.stat().st_size - 10)
    with pytest.raises(CheckpointError, match=rf"{data.name} is truncated"):
        _manifest.verify(path, checksums=False)
    data.unlink()
    with pytest.raises(CheckpointError, match=rf"{data.name} is missing"):
        _manifest.verify(path, checksums=False)


def test_writer_lock_is_exclusive_and_dies_with_its_holder(tmp_path: Path) -> None:
    lock = s.WriterLock(tmp_path)
    lock.acquire()
    with pytest.raises(CheckpointError, match="in use"):
        s.WriterLock(tmp_path).acquire()
    lock.release()
    s.WriterLock(tmp_path).acquire()


def test_commit_refuses_a_chunk_no_file_holds(tmp_path: Path) -> None:
    """A .metadata declaring a chunk without a storage entry (what a silently failed writer
    thread leaves) is refused before the rename: nothing is published."""
    import pickle

    tmp = _write_tmp(tmp_path, 1)
    meta = pickle.loads((tmp / ".metadata").read_bytes())
    meta.storage_data.popitem()
    (tmp / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(CheckpointCorruptError, match="no file holds it"):
        s.commit(tmp_path, tmp, 1, overwrite=False)
    assert s.list_steps(tmp_path) == [] and s.read_commits(tmp_path, 0) is None


def test_commit_writes_a_manifest_that_verifies(tmp_path: Path) -> None:
    """A step committed without the daemon's writer gets its manifest hashed at commit."""
    path = s.commit(tmp_path, _write_tmp(tmp_path, 4), 4, overwrite=False)
    manifest = _manifest.read_manifest(path)
    assert manifest is not None and sorted(manifest) == [".metadata", "__0_0.distcp"]
    assert _manifest.verify(path, checksums=True) is not None and s.is_managed(tmp_path, 4)


# commit() in a process of its own (it needs no torch: the steps are written beforehand)
KILLED_COMMIT = """
import os, sys
from pathlib import Path
from aiodcp._disk import _storage as s
root, point = Path(sys.argv[1]), sys.argv[2]
for step, tmp in enumerate(sys.argv[3:]):
    if step == 1:
        os.environ["AIODCP_TEST_KILL_AT"] = point
    s.commit(root, Path(tmp), step, overwrite=False)
"""


@pytest.mark.parametrize("point", ["before_rename", "after_rename", "after_latest", "after_log"])
def test_reconcile_after_a_kill_at_each_commit_step(tmp_path: Path, point: str) -> None:
    """A process SIGKILLed at each sub-step of commit(): reconcile() appends a renamed but
    unlogged step once, rewrites a stale latest, and is idempotent."""
    tmps = [str(_write_tmp(tmp_path, step, float(step))) for step in (0, 1)]
    r = subprocess.run(
        [sys.executable, "-c", KILLED_COMMIT, str(tmp_path), point, *tmps], timeout=60, check=False
    )
    assert r.returncode == -9
    renamed = point != "before_rename"
    assert s.list_steps(tmp_path) == ([0, 1] if renamed else [0])
    assert s.is_committed(tmp_path, 1) == renamed
    if point == "after_log":
        (tmp_path / "latest").write_text("17\n")  # made stale by hand
    assert s.reconcile(tmp_path) == ([1] if point in ("after_rename", "after_latest") else [])
    assert s.reconcile(tmp_path) == []
    steps = s.list_steps(tmp_path)
    assert s.read_commits(tmp_path, 0) == (steps, 2 * len(steps))
    assert (tmp_path / "latest").read_text().strip() == str(steps[-1])
    assert len(_retention.cleanup_leftovers(tmp_path)) == (0 if renamed else 1)
