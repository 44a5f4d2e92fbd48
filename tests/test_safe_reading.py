"""Reading a root never runs its code: crafted pickles in ``.metadata`` and in
non-tensor values, malformed manifests, leases, ``latest``, ``.commits`` and step
names give typed errors (or are skipped), through every reader; and a reader that
verifies while retention runs never sees a step vanish under it."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
import torch
import torch.distributed.checkpoint as dcp

import aiodcp
from aiodcp import CheckpointCorruptError, CheckpointError
from aiodcp._disk import _manifest, _retention
from aiodcp._disk import _storage as s
from aiodcp._parent._handle import SaveResult
from aiodcp._tools._cli import main as cli

pytestmark = pytest.mark.asyncio


class Evil:
    """Unpickling it runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@dataclass
class Config:
    """A harmless user type: not plain data, so it needs ``weights_only=False``."""

    lr: float


async def _run(fn, *args):  # type: ignore[no-untyped-def]
    """Blocking aiodcp calls (storage, CLI) off the loop: blockbuster watches it."""
    return await anyio.to_thread.run_sync(fn, *args)


def _commit(root: Path, step: int, value: float, n: int = 1000) -> Path:
    tmp = s.tmp_dir(root, step, "t")
    dcp.save({"x": torch.full((n,), value)}, checkpoint_id=tmp, no_dist=True)
    return s.commit(root, tmp, step, overwrite=False)


def _evil_metadata(root: Path, step: int, marker: Path, nested: bool) -> None:
    """A step whose ``.metadata`` runs ``touch marker`` when unpickled: the whole file, or
    hidden in an otherwise valid ``Metadata`` (its ``planner_data``)."""
    path = s.step_dir(root, step)
    if nested:
        dcp.save({"x": torch.zeros(4)}, checkpoint_id=path, no_dist=True)
        meta = pickle.loads((path / ".metadata").read_bytes())
        meta.planner_data = {"x": (Evil(marker),)}
        (path / ".metadata").write_bytes(pickle.dumps(meta))
    else:
        path.mkdir(parents=True)
        (path / ".metadata").write_bytes(pickle.dumps(Evil(marker)))


# ------------------------------------------------------------------ .metadata
@pytest.mark.parametrize("nested", [False, True], ids=["whole", "nested"])
async def test_crafted_metadata_runs_nowhere(
    tmp_path: Path, nested: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """A crafted ``.metadata`` is never unpickled with its globals: load (both forms,
    with and without fallback), SaveResult.metadata, `aiodcp inspect` and `verify`
    fail with CheckpointCorruptError naming the file and global; nothing runs."""
    root = tmp_path / "ck"
    marker = tmp_path / "MARK"
    await _run(_commit, root, 0, 1.0)
    await _run(_evil_metadata, root, 1, marker, nested)

    with pytest.raises(CheckpointCorruptError, match=r"\.metadata.*system") as info:
        await aiodcp.load({"x": torch.zeros(1000)}, root)
    assert info.value.step == 1 and info.value.file == ".metadata"
    with pytest.raises(CheckpointCorruptError, match="system"):
        await aiodcp.load({"x": torch.zeros(4)}, root, step=1, verify=True)
    out = {"x": torch.zeros(1000)}
    assert await aiodcp.load(out, root, fallback=True, verify=True) == 0  # skips step 1
    assert torch.equal(out["x"], torch.full((1000,), 1.0))
    with pytest.raises(CheckpointCorruptError, match="system"):
        _ = SaveResult(1, s.step_dir(root, 1), 0, 0.0, 0.0).metadata
    capsys.readouterr()
    assert await _run(cli, ["inspect", str(root)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "system" in err, err
    assert await _run(cli, ["verify", str(root)]) == 1
    assert "step 1: FAILED" in capsys.readouterr().out
    assert not marker.exists()


async def test_crafted_metadata_through_the_checkpointer(tmp_path: Path) -> None:
    """AsyncCheckpointer.load of a crafted ``.metadata``: CheckpointCorruptError, nothing runs."""
    root = tmp_path / "ck"
    marker = tmp_path / "MARK"
    await _run(_evil_metadata, root, 1, marker, False)
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        with pytest.raises(CheckpointCorruptError, match="system"):
            await ckpt.load({"x": torch.zeros(4)})
    assert not marker.exists()


async def test_metadata_naming_a_file_outside_the_step_is_corrupt(tmp_path: Path) -> None:
    """A ``.metadata`` of DCP's own types whose storage entry names ``../x``: corrupt,
    never read from outside the step."""
    root = tmp_path / "ck"
    path = s.step_dir(root, 1)
    dcp.save({"x": torch.zeros(4)}, checkpoint_id=path, no_dist=True)
    meta = pickle.loads((path / ".metadata").read_bytes())
    for info in meta.storage_data.values():
        (root / "outside.distcp").write_bytes((path / info.relative_path).read_bytes())
        info.relative_path = "../outside.distcp"
    (path / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(CheckpointCorruptError, match="outside the step"):
        await aiodcp.load({"x": torch.ones(4)}, root)


# ------------------------------------------------------------- non-tensor values
async def test_crafted_non_tensor_value_needs_the_opt_in(tmp_path: Path) -> None:
    """A plain dcp.save of ``{"evil": Evil()}``: load (both forms) raises CheckpointError
    naming the key and nothing runs; ``weights_only=False`` unpickles it (it runs)."""
    root = tmp_path / "ck"
    marker = tmp_path / "MARK"
    dcp.save(
        {"x": torch.ones(3), "evil": Evil(marker)}, checkpoint_id=s.step_dir(root, 1), no_dist=True
    )
    with pytest.raises(CheckpointError, match=r"'evil'.*weights_only=False"):
        await aiodcp.load({"x": torch.zeros(3), "evil": None}, root)
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        with pytest.raises(CheckpointError, match=r"'evil'"):
            await ckpt.load({"x": torch.zeros(3), "evil": None}, verify=True)
    assert not marker.exists()
    await aiodcp.load({"x": torch.zeros(3), "evil": None}, root, weights_only=False)
    assert marker.exists()  # the payload is live: only the opt-in unpickles it


async def test_plain_values_and_optimizer_state_load_without_the_opt_in(tmp_path: Path) -> None:
    """Plain values, AdamW and SGD state (param_groups included) load by default;
    a user type needs ``weights_only=False`` and then loads equal."""
    root = tmp_path / "ck"
    model = torch.nn.Linear(4, 2)
    adamw = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    adamw.step()
    sgd.step()
    plain = {"i": 7, "f": 2.5, "s": "text", "l": [1, "a", (2, 3)], "d": {"k": None}, "t": (1, 2)}
    state: dict[str, Any] = {"model": model, "adamw": adamw, "sgd": sgd, **plain}
    dcp.save(state, checkpoint_id=s.step_dir(root, 1), no_dist=True)
    model2 = torch.nn.Linear(4, 2)
    adamw2 = torch.optim.AdamW(model2.parameters())
    sgd2 = torch.optim.SGD(model2.parameters(), lr=1.0, momentum=0.5)
    model2(torch.randn(3, 4)).sum().backward()
    adamw2.step()  # state to load into, as after a first training step
    sgd2.step()
    out: dict[str, Any] = {"model": model2, "adamw": adamw2, "sgd": sgd2}
    out.update({k: None for k in plain}, d={"k": 0})  # DCP flattens dicts: a key to load into
    assert await aiodcp.load(out, root) == 1
    assert {k: out[k] for k in plain} == plain
    assert adamw2.state_dict()["param_groups"] == adamw.state_dict()["param_groups"]
    assert sgd2.state_dict()["param_groups"] == sgd.state_dict()["param_groups"]
    assert torch.equal(adamw2.state[model2.weight]["exp_avg"], adamw.state[model.weight]["exp_avg"])
    assert torch.equal(model2.weight, model.weight)

    dcp.save({"cfg": Config(0.5)}, checkpoint_id=s.step_dir(root, 2), no_dist=True)
    with pytest.raises(CheckpointError, match="weights_only"):
        await aiodcp.load({"cfg": None}, root)
    got: dict[str, Any] = {"cfg": None}
    await aiodcp.load(got, root, weights_only=False)
    assert got["cfg"] == Config(0.5)


# -------------------------------------------------------------------- manifest
@pytest.mark.parametrize(
    "content",
    [
        b"[" * 100_000,
        b'{"format": "aiodcp-manifest", "version": 1, "step": 1, "hash": "xxh3_64",'
        b' "files": {".metadata": {"size": 1e999, "xxh3_64": "0"}}}',
        b'{"format": "aiodcp-manifest", "version": 1, "step": 1, "hash": "xxh3_64",'
        b' "files": {"a\\u0000b": {"size": 1, "xxh3_64": "0"}}}',
    ],
    ids=["deep", "infinite-size", "nul-in-name"],
)
async def test_malformed_manifest_is_corrupt(
    tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest that is not aiodcp's (JSON nested past the recursion limit, an
    infinite size, a file name with a NUL): CheckpointCorruptError from load,
    `verify` exit 1."""
    root = tmp_path / "ck"
    path = await _run(_commit, root, 1, 1.0)
    (path / _manifest.MANIFEST).write_bytes(content)
    with pytest.raises(CheckpointCorruptError, match="manifest"):
        await aiodcp.load({"x": torch.zeros(1000)}, root)
    assert await _run(cli, ["verify", str(root)]) == 1
    assert "step 1: FAILED" in capsys.readouterr().out


async def test_manifest_naming_a_file_outside_the_step_is_corrupt(tmp_path: Path) -> None:
    """A manifest entry ``../x`` (with the right size and checksum) is refused: verify
    never reads outside the step (a name like /dev/zero would never end)."""
    root = tmp_path / "ck"
    path = await _run(_commit, root, 1, 1.0)
    (root / "outside").write_bytes(b"abc")
    doc = json.loads((path / _manifest.MANIFEST).read_text())
    size, digest = _manifest.file_digest(root / "outside")
    doc["files"]["../outside"] = {"size": size, "xxh3_64": digest}
    (path / _manifest.MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(CheckpointCorruptError, match="outside"):
        await aiodcp.load({"x": torch.zeros(1000)}, root, verify=True)


# ---------------------------------------------------------------------- leases
async def test_holds_that_is_a_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    """``.holds`` replaced by a file (a pickle): load raises CheckpointError, not OSError."""
    root = tmp_path / "ck"
    marker = tmp_path / "MARK"
    await _run(_commit, root, 1, 1.0)
    (root / s.HOLDS_DIR).write_bytes(pickle.dumps(Evil(marker)))
    with pytest.raises(CheckpointError, match="leases"):
        await aiodcp.load({"x": torch.zeros(1000)}, root)
    assert not marker.exists()


async def test_foreign_entries_among_leases_are_not_leases(tmp_path: Path) -> None:
    """A directory, a symlink and a pickle named like leases: retention still runs (the
    pickle's content is never read), and load takes its lease."""
    root = tmp_path / "ck"
    marker = tmp_path / "MARK"
    for step in (1, 2):
        await _run(_commit, root, step, float(step))
    holds = root / s.HOLDS_DIR
    holds.mkdir()
    (holds / "step_1.dir").mkdir()
    (holds / "step_1.link").symlink_to(tmp_path / "elsewhere")
    (holds / "step_1.pickle").write_bytes(pickle.dumps(Evil(marker)))
    assert await _run(_retention.apply_retention, root, 1, None) == [1]
    assert await aiodcp.load({"x": torch.zeros(1000)}, root) == 2
    assert not marker.exists()


# ------------------------------------------------------------- latest, .commits
async def test_crafted_latest_and_commits_are_repaired_or_skipped(tmp_path: Path) -> None:
    """``latest`` holding a pickle and ``.commits`` holding a pickle and a 5,000-digit
    line: the checkpointer opens (reconcile rewrites latest), watch and load work."""
    root = tmp_path / "ck"
    marker = tmp_path / "MARK"
    await _run(_commit, root, 1, 1.0)
    payload = pickle.dumps(Evil(marker))
    (root / s.LATEST).write_bytes(payload)
    (root / s.COMMITS).write_bytes(payload + b"\n" + b"9" * 5000 + b"\n1\n")
    assert await _run(s.read_commits, root, 0) == ([1], len(payload) + 5004)
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        assert await ckpt.load({"x": torch.zeros(1000)}) == 1
        with anyio.fail_after(30):
            async for step in ckpt.watch(include_latest=True):
                assert step == 1
                break
    assert (root / s.LATEST).read_text() == "1\n"
    assert not marker.exists()


async def test_commit_log_that_is_a_directory_is_a_checkpoint_error(tmp_path: Path) -> None:
    """``.commits`` that is a directory: watch raises CheckpointError, not OSError."""
    root = tmp_path / "ck"
    await _run(_commit, root, 1, 1.0)
    (root / s.COMMITS).unlink()
    (root / s.COMMITS).mkdir()
    with pytest.raises(CheckpointError, match="commit log"):
        with anyio.fail_after(30):
            async for _ in aiodcp.watch(root):
                pass


async def test_foreign_step_names_are_not_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Directories named like steps with a 5,000-digit number, another script's digit, or
    a leading zero are not listed; `ls`, load and verify see only the real step."""
    root = tmp_path / "ck"
    await _run(_commit, root, 1, 1.0)
    for name in ("step_" + "9" * 5000, "step_\u0663", "step_01"):
        try:
            (root / name).mkdir()
        except OSError:  # a name too long for the filesystem: nothing to test
            continue
        (root / name / ".metadata").write_bytes(b"")
    assert await _run(s.list_steps, root) == [1]
    assert await aiodcp.load({"x": torch.zeros(1000)}, root) == 1
    assert await _run(cli, ["ls", str(root)]) == 0
    assert await _run(cli, ["verify", str(root)]) == 0
    assert "step 1: ok" in capsys.readouterr().out


# -------------------------------------------------- issue 17.4: lease before verify
async def test_step_deleted_by_retention_while_verified_is_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newer commit with keep_last=1 while load(verify=True) hashes the latest: the
    lease taken before the hash keeps it; the load returns it, no FileNotFoundError."""
    root = tmp_path / "ck"
    await _run(_commit, root, 1, 1.0)
    real = _manifest.file_digest
    fired: list[int] = []

    def digest_during_retention(path: Path) -> tuple[int, str]:
        if not fired:
            fired.append(1)
            newer = s.list_steps(root)[-1] + 1
            _commit(root, newer, float(newer))
            fired.extend(_retention.apply_retention(root, 1, None))
        return real(path)

    monkeypatch.setattr(_manifest, "file_digest", digest_during_retention)
    for fallback, expected in ((False, 1), (True, 2)):
        fired.clear()
        out = {"x": torch.zeros(1000)}
        assert await aiodcp.load(out, root, verify=True, fallback=fallback) == expected
        assert fired == [1], fired  # retention spared the leased step
        assert torch.equal(out["x"], torch.full((1000,), float(expected)))
        assert await _run(_retention.apply_retention, root, 1, None) == [expected]


async def test_readers_verifying_while_a_writer_commits_with_keep_last_1(tmp_path: Path) -> None:
    """A real AsyncCheckpointer committing with keep_last=1 and readers running
    load(verify=True) (with and without fallback) in a loop: every load returns a
    step and its data; none fails (no FileNotFoundError, no CheckpointNotFoundError)."""
    root = tmp_path / "ck"
    n = 2 << 20  # 8 MiB: hashing takes long enough to overlap commits
    loads: list[int] = []
    errors: list[BaseException] = []
    async with aiodcp.AsyncCheckpointer(root, keep_last=1) as ckpt:
        await (await ckpt.save({"x": torch.full((n,), 0.0)}, step=0))
        done = anyio.Event()

        async def reader(fallback: bool) -> None:
            out = {"x": torch.zeros(n)}
            while not done.is_set():
                try:
                    step = await aiodcp.load(out, root, verify=True, fallback=fallback)
                except Exception as exc:
                    errors.append(exc)
                    continue
                assert float(out["x"][0]) == float(step) == float(out["x"][-1])
                loads.append(step)

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader, False)
            tg.start_soon(reader, True)
            for step in range(1, 25):
                await (await ckpt.save({"x": torch.full((n,), float(step))}, step=step))
            done.set()
    assert not errors, [f"{type(e).__name__}: {e}" for e in errors[:3]]
    assert len(loads) >= 4
