"""Object storage: ``s3://bucket/prefix`` roots against a moto S3 server on loopback."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
import torch

import aiodcp
from aiodcp._disk._roots import open_store
from aiodcp._tools import _cli

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

from tests.s3_server import FaultProxy, S3Server  # noqa: E402

BUCKET = "ckpt"
pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SimpleNamespace:
    """An empty bucket on a fresh server state; credentials and endpoint in the environment
    (inherited by the daemons), as a user would set them."""
    s3_server.reset()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.url)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    client = boto3.client("s3", endpoint_url=s3_server.url)
    client.create_bucket(Bucket=BUCKET)
    return SimpleNamespace(
        url=s3_server.url, client=client, root=f"s3://{BUCKET}/run", auth=s3_server.auth
    )


def keys(client: Any, prefix: str = "run/") -> list[str]:
    resp = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def uploads(client: Any) -> list[str]:
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])]


def state(seed: int = 0, n: int = 4096) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(n, generator=g),
        "b": torch.randint(0, 100, (17, 3), generator=g),
        "extra": {"lr": 0.1 * (seed + 1), "name": f"run-{seed}"},
    }


def blank(n: int = 4096) -> dict[str, Any]:
    return {
        "w": torch.zeros(n),
        "b": torch.zeros(17, 3, dtype=torch.int64),
        "extra": {"lr": 0.0, "name": ""},
    }


# ------------------------------------------------------------------ URL parsing
@pytest.mark.parametrize(
    "root",
    [
        *("gs://bucket/run", "file:///tmp/run", "http://h/r", "s3:/b/r", "s3://", "s3:///run"),
        *("s3://b/../run", "s3://KEY:SECRET@b/run", "s3://b a/run", "s3://b/run\n"),
        *("s3://b/run?versionId=1", "s3://b/run#x"),
    ],
)
async def test_unsupported_or_malformed_url_is_refused_everywhere(
    root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URL aiodcp does not support is an error at once naming s3://, never a local path."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"s3://"):
        aiodcp.AsyncCheckpointer(root)
    with pytest.raises(ValueError, match=r"s3://"):
        await aiodcp.load({}, root)
    with pytest.raises(ValueError, match=r"s3://"):
        async with aiodcp.hold(root, 0):
            pass
    with pytest.raises(ValueError, match=r"s3://"):
        async for _ in aiodcp.watch(root):
            break
    for cmd in (["ls", root], ["verify", root], ["inspect", root], ["gc", root]):
        assert await anyio.to_thread.run_sync(_cli.main, cmd) == 1
    assert await anyio.to_thread.run_sync(os.listdir, tmp_path) == []  # no "gs:", no "s3:"


async def test_credentials_in_a_url_are_refused_and_never_echoed() -> None:
    """``s3://KEY:SECRET@bucket``: refused, and the secret appears in no message."""
    with pytest.raises(ValueError, match="credentials in the URL") as err:
        open_store("s3://AKIAX:hunter2@bucket/run")
    assert "hunter2" not in str(err.value) and "AKIAX" not in str(err.value)


async def test_s3_without_the_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without boto3, an s3:// root asks for ``pip install aiodcp[s3]``."""
    monkeypatch.setitem(sys.modules, "boto3", None)
    monkeypatch.delitem(sys.modules, "aiodcp._disk._store_s3", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'aiodcp\[s3\]'"):
        open_store("s3://bucket/run")


async def test_credentials_are_not_storage_options() -> None:
    """Secrets never travel through aiodcp (nor the daemon's command line)."""
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY"):
        open_store("s3://bucket/run", {"aws_secret_access_key": "x"})
    with pytest.raises(ValueError, match="unknown storage option"):
        open_store("s3://bucket/run", {"endpoint": "x"})


# ---------------------------------------------------------------- save and load


async def test_round_trip_bit_exact_and_resume(
    s3: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Committed steps load bit-exact; step=None continues after the latest; nothing local."""
    monkeypatch.chdir(tmp_path)
    async with aiodcp.AsyncCheckpointer(s3.root) as ckpt:
        r0 = await (await ckpt.save(state(0), step=0))
        r1 = await (await ckpt.save(state(1)))
        assert (r0.step, r1.step) == (0, 1)
        assert r1.path == "s3://ckpt/run/step_1"
        meta = await anyio.to_thread.run_sync(lambda: r1.metadata)
        assert "w" in meta.state_dict_metadata
        assert await ckpt.steps() == [0, 1]
        into = blank()
        assert await ckpt.load(into) == 1
    for key in ("w", "b"):
        assert torch.equal(into[key], state(1)[key])
    assert into["extra"] == state(1)["extra"]
    assert "run/.commits/step_1" in keys(s3.client)
    async with aiodcp.AsyncCheckpointer(s3.root) as ckpt:  # resume: step=None continues
        assert (await (await ckpt.save(state(2)))).step == 2
    into = blank()
    assert await aiodcp.load(into, s3.root, step=0) == 0
    assert torch.equal(into["w"], state(0)["w"])
    assert await anyio.to_thread.run_sync(os.listdir, tmp_path) == []  # no "s3:" directory


async def test_plain_dcp_fsspec_reader_reads_it(s3: SimpleNamespace) -> None:
    """What aiodcp writes to S3 is a plain DCP directory: dcp.load with FsspecReader reads it."""
    pytest.importorskip("s3fs")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    async with aiodcp.AsyncCheckpointer(s3.root) as ckpt:
        await (await ckpt.save(state(3), step=7))
    into = blank()

    def read() -> None:
        reader = FsspecReader(
            "s3://ckpt/run/step_7",
            key="testing",
            secret="testing",
            client_kwargs={"endpoint_url": s3.url},
        )
        dcp.load(into, storage_reader=reader, no_dist=True)

    await anyio.to_thread.run_sync(read)
    assert torch.equal(into["w"], state(3)["w"])
    assert torch.equal(into["b"], state(3)["b"])


async def test_verify_and_load_detect_a_corrupted_object(s3: SimpleNamespace) -> None:
    """A flipped byte in an uploaded object: `aiodcp verify` and load(verify=True) name it."""
    async with aiodcp.AsyncCheckpointer(s3.root) as ckpt:
        await (await ckpt.save(state(0), step=0))
        await (await ckpt.save(state(1), step=1))
    assert await anyio.to_thread.run_sync(_cli.main, ["verify", s3.root]) == 0
    key = "run/step_1/__0_0.distcp"
    data = bytearray(s3.client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    s3.client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    assert await anyio.to_thread.run_sync(_cli.main, ["verify", s3.root, "--step", "1"]) == 1
    with pytest.raises(aiodcp.CheckpointCorruptError, match=r"s3://ckpt/run/step_1") as err:
        await aiodcp.load(blank(), s3.root, verify=True)
    assert err.value.file == "__0_0.distcp"
    into = blank()
    assert await aiodcp.load(into, s3.root, verify=True, fallback=True) == 0
    assert torch.equal(into["w"], state(0)["w"])


async def test_retention_spares_a_leased_step_and_deletes_marker_first(
    s3: SimpleNamespace,
) -> None:
    """keep_last=1 deletes old steps' markers and objects, but not a step a reader holds."""
    async with aiodcp.AsyncCheckpointer(s3.root, keep_last=1) as ckpt:
        await (await ckpt.save(state(0), step=0))
        async with aiodcp.hold(s3.root, 0):
            await (await ckpt.save(state(1), step=1))
            assert await ckpt.steps() == [0, 1]  # held: spared
        await (await ckpt.save(state(2), step=2))
        assert await ckpt.steps() == [2]
    left = keys(s3.client)
    assert not any(k.startswith(("run/step_0/", "run/step_1/")) for k in left), left
    assert not any(k.startswith("run/.holds/") for k in left)
    with pytest.raises(aiodcp.CheckpointNotFoundError):
        async with aiodcp.hold(s3.root, 0):
            pass


async def test_watch_sees_new_commits(s3: SimpleNamespace) -> None:
    """watch() of an s3:// root yields each newly committed step, in order."""
    seen: list[int] = []
    async with aiodcp.AsyncCheckpointer(s3.root) as ckpt:
        await (await ckpt.save(state(0), step=0))

        started = anyio.Event()

        async def follow() -> None:
            async for step in aiodcp.watch(s3.root, include_latest=True, poll_interval=0.1):
                seen.append(step)
                started.set()
                if step == 2:
                    return

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                await started.wait()  # the watch began (it yielded the latest: 0)
                for step in (1, 2):
                    await (await ckpt.save(state(step), step=step))
    assert seen == [0, 1, 2]


# ------------------------------------------------------------------------ faults
BIG = 12 << 20  # three 5 MiB parts with multipart_threshold=5 MiB
MULTIPART = {"multipart_threshold": 5 << 20, "multipart_chunksize": 5 << 20}


async def test_kill9_mid_upload_leaves_nothing_visible_and_is_swept(
    s3: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon SIGKILLed after its first uploaded part: no step (no marker), and the next
    open aborts the multipart upload and deletes the partial objects."""
    monkeypatch.setenv("AIODCP_TEST_KILL_AT", "mid_upload")
    big = {"w": torch.randn(BIG // 4)}
    async with aiodcp.AsyncCheckpointer(
        s3.root, storage_options={**MULTIPART, "max_concurrency": 1}
    ) as ckpt:
        handle = await ckpt.save(big, step=5)
        with pytest.raises(aiodcp.WorkerDiedError, match="SIGKILL"):
            await handle
        assert await ckpt.steps() == []
        assert any(k.startswith("run/step_5/") for k in keys(s3.client)) or uploads(s3.client)
    monkeypatch.delenv("AIODCP_TEST_KILL_AT")
    async with aiodcp.AsyncCheckpointer(s3.root) as ckpt:  # the next writer's open sweeps
        assert await ckpt.steps() == []
        assert uploads(s3.client) == []
        assert keys(s3.client) == ["run/.writer"]  # only the open writer's lock
        await (await ckpt.save({"w": torch.ones(4)}, step=5))  # the step is free again
        assert await ckpt.steps() == [5]


async def test_kill9_before_marker_is_not_committed(
    s3: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the manifest, before the marker: every object is there, yet no step."""
    monkeypatch.setenv("AIODCP_TEST_KILL_AT", "before_marker")
    async with aiodcp.AsyncCheckpointer(s3.root) as ckpt:
        with pytest.raises(aiodcp.WorkerDiedError):
            await (await ckpt.save(state(0), step=3))
        assert "run/step_3/.aiodcp-manifest.json" in keys(s3.client)
        assert await ckpt.steps() == []
        with pytest.raises(aiodcp.CheckpointNotFoundError):
            await ckpt.load(blank())


async def test_kill9_after_marker_is_recovered_as_committed(
    s3: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed right after the marker: the step is committed (recovered=True) and loads."""
    monkeypatch.setenv("AIODCP_TEST_KILL_AT", "after_marker")
    async with aiodcp.AsyncCheckpointer(s3.root) as ckpt:
        result = await (await ckpt.save(state(4), step=4))
        assert result.recovered
    into = blank()
    assert await aiodcp.load(into, s3.root) == 4
    assert torch.equal(into["w"], state(4)["w"])


@pytest.mark.slow
async def test_throttling_and_connection_resets_are_retried(s3: SimpleNamespace) -> None:
    """503 SlowDown and reset connections on uploads are retried with backoff: it commits."""
    faults = {"throttle": 3, "reset": 2}

    def rule(request: str) -> str:
        if request.startswith("PUT "):
            for kind, left in faults.items():
                if left:
                    faults[kind] -= 1
                    return kind
        return "pass"

    proxy = FaultProxy(s3.url, rule)
    try:
        async with aiodcp.AsyncCheckpointer(
            s3.root, storage_options={"endpoint_url": proxy.url}
        ) as ckpt:
            await (await ckpt.save(state(0), step=0))
            assert await ckpt.steps() == [0]
    finally:
        proxy.stop()
    assert faults == {"throttle": 0, "reset": 0}
    acts = [a for _, a in proxy.seen]
    assert acts.count("throttle") == 3 and acts.count("reset") == 2
    into = blank()
    await aiodcp.load(into, s3.root, verify=True)
    assert torch.equal(into["w"], state(0)["w"])


async def test_stuck_upload_fails_the_save_in_bounded_time(s3: SimpleNamespace) -> None:
    """An upload that never progresses fails the save within the stall bound, naming the
    rank and the object; nothing is committed and the daemon serves the next save."""
    stuck = {"on": True}

    def rule(request: str) -> str:
        if stuck["on"] and request.startswith("PUT ") and ".distcp" in request:
            return "stall"
        return "pass"

    proxy = FaultProxy(s3.url, rule)
    try:
        async with aiodcp.AsyncCheckpointer(
            s3.root,
            storage_options={
                "endpoint_url": proxy.url,
                "upload_stall_timeout": 1.5,
                "read_timeout": 30.0,
                "max_attempts": 1,
            },
        ) as ckpt:
            t0 = time.monotonic()
            with pytest.raises(
                aiodcp.SaveFailedError,
                match=r"rank 0: upload of s3://ckpt/run/step_0/__0_0\.distcp made no progress",
            ):
                await (await ckpt.save(state(0), step=0))
            assert time.monotonic() - t0 < 15
            assert await ckpt.steps() == []
            stuck["on"] = False
            await (await ckpt.save(state(1), step=1))
            assert await ckpt.steps() == [1]
    finally:
        proxy.stop()


async def test_missing_bucket_and_bad_credentials_fail_at_open(
    s3: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a checkpointer on a missing bucket, or with refused credentials, is a clear
    CheckpointError at once (before any save)."""
    with pytest.raises(aiodcp.CheckpointError, match="bucket 'nope' does not exist"):
        async with aiodcp.AsyncCheckpointer("s3://nope/run"):
            pass
    s3.auth(True)  # moto's server checks keys against its IAM users from now on
    try:
        with pytest.raises(aiodcp.CheckpointError, match="access refused"):
            async with aiodcp.AsyncCheckpointer(s3.root):
                pass
    finally:
        s3.auth(False)


async def test_overwrite_is_refused_on_object_storage(s3: SimpleNamespace) -> None:
    """overwrite=True would rewrite a committed step's objects in place: refused."""
    async with aiodcp.AsyncCheckpointer(s3.root) as ckpt:
        with pytest.raises(ValueError, match="overwrite"):
            await ckpt.save(state(0), step=0, overwrite=True)
        await (await ckpt.save(state(0), step=0))
        with pytest.raises(aiodcp.CheckpointExistsError):
            await (await ckpt.save(state(0), step=0))


async def test_cli_ls_inspect_gc(s3: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI reads an s3:// root: ls lists committed steps, inspect the tensors, gc sweeps."""
    async with aiodcp.AsyncCheckpointer(s3.root) as ckpt:
        await (await ckpt.save(state(0), step=0))
    capsys.readouterr()
    assert await anyio.to_thread.run_sync(_cli.main, ["ls", s3.root]) == 0
    out = capsys.readouterr().out
    assert "step 0" in out and "(latest)" in out
    assert await anyio.to_thread.run_sync(_cli.main, ["inspect", s3.root]) == 0
    assert "float32" in capsys.readouterr().out
    s3.client.put_object(Bucket=BUCKET, Key="run/.pending/step_9", Body=b"")
    s3.client.put_object(Bucket=BUCKET, Key="run/step_9/__0_0.distcp", Body=b"x")
    assert await anyio.to_thread.run_sync(_cli.main, ["gc", s3.root]) == 0
    assert "run/step_9/__0_0.distcp" in capsys.readouterr().out
    assert not any("step_9" in k for k in keys(s3.client))


TWO_RANKS = """
import asyncio, os, sys, torch, torch.distributed as dist, aiodcp
async def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    root = sys.argv[1]
    mine = {f"w{rank}": torch.arange(1000.0) + rank, "shared": torch.ones(3)}
    async with aiodcp.AsyncCheckpointer(root, keep_last=1) as ckpt:
        await (await ckpt.save(mine, step=0))
        await (await ckpt.save(mine))  # step=None: 1 on both ranks
        if rank == 0:  # retention runs on rank 0 before its handle resolves
            assert await ckpt.steps() == [1], await ckpt.steps()
    back = {f"w{rank}": torch.zeros(1000), "shared": torch.zeros(3)}
    assert await aiodcp.load(back, root) == 1
    assert torch.equal(back[f"w{rank}"], mine[f"w{rank}"])
    assert torch.equal(back["shared"], mine["shared"])
    print(f"OK rank {rank}", flush=True)
    dist.destroy_process_group()
asyncio.run(main())
"""


@pytest.mark.timeout(240)
@pytest.mark.slow
async def test_two_ranks_upload_their_own_files_and_commit_once(
    s3: SimpleNamespace, tmp_path: Path
) -> None:
    """2 ranks under torchrun: each uploads its own file, one marker per step, retention and
    a 2-rank load from S3 work."""
    from tests.conftest import REPO, torchrun

    script = tmp_path / "two_ranks.py"
    await anyio.to_thread.run_sync(script.write_text, TWO_RANKS)
    with anyio.fail_after(220):
        proc = await anyio.run_process(
            torchrun(str(script), s3.root),
            check=False,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO)},  # this checkout's aiodcp
        )
    out = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, out[-6000:]
    assert "OK rank 0" in out and "OK rank 1" in out, out[-6000:]
    names = keys(s3.client)
    assert "run/step_1/__0_0.distcp" in names and "run/step_1/__1_0.distcp" in names, names
    assert [k for k in names if k.startswith("run/.commits/")] == ["run/.commits/step_1"]
    assert not any(k.startswith(("run/step_0/", "run/.pending/")) for k in names), names


TRAINER = """
import asyncio, sys, torch, aiodcp
async def main():
    opts = {"endpoint_url": sys.argv[2], "max_attempts": 1}
    async with aiodcp.AsyncCheckpointer(sys.argv[1], storage_options=opts) as ckpt:
        handle = await ckpt.save({"w": torch.randn(1000)}, step=0)
        print("daemon", ckpt.worker_pid, flush=True)
        await handle
asyncio.run(main())
"""


@pytest.mark.timeout(240)
async def test_trainer_killed_mid_upload_its_daemon_exits_and_nothing_is_visible(
    s3: SimpleNamespace, tmp_path: Path
) -> None:
    """The trainer SIGKILLed while its daemon uploads: the daemon stops the upload and
    exits by itself, no step is visible, and the next open leaves nothing behind."""
    from tests.conftest import REPO

    hit = anyio.Event()
    token = anyio.lowlevel.current_token()

    def rule(request: str) -> str:
        if request.startswith("PUT ") and ".distcp" in request:
            anyio.from_thread.run_sync(hit.set, token=token)
            return "stall"
        return "pass"

    proxy = FaultProxy(s3.url, rule)
    script = tmp_path / "trainer.py"
    await anyio.to_thread.run_sync(script.write_text, TRAINER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        async with await anyio.open_process(
            [sys.executable, str(script), s3.root, proxy.url], env=env, cwd=tmp_path
        ) as trainer:
            assert trainer.stdout is not None
            with anyio.fail_after(120):
                line = b""
                while b"\n" not in line:
                    line += await trainer.stdout.receive()
                daemon = int(line.split()[1])
                await hit.wait()
            trainer.kill()
            await trainer.wait()
        with anyio.fail_after(30):  # its daemon notices, abandons the upload, exits
            while await anyio.to_thread.run_sync(os.path.exists, f"/proc/{daemon}"):  # noqa: ASYNC110
                await anyio.sleep(0.2)
    finally:
        proxy.stop()
    async with aiodcp.AsyncCheckpointer(s3.root) as ckpt:
        assert await ckpt.steps() == []
    assert keys(s3.client) == []
    assert uploads(s3.client) == []


TWO_RANKS_STUCK = """
import asyncio, sys, time, torch, torch.distributed as dist, aiodcp
async def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    opts = {"endpoint_url": sys.argv[2], "upload_stall_timeout": 2.0, "max_attempts": 1}
    async with aiodcp.AsyncCheckpointer(sys.argv[1], storage_options=opts) as ckpt:
        t0 = time.monotonic()
        try:
            await (await ckpt.save({f"w{rank}": torch.randn(1000)}, step=0))
        except aiodcp.SaveFailedError as exc:
            print(f"FAILED on rank {rank} after {time.monotonic() - t0:.1f} s: "
                  + str(exc).splitlines()[0], flush=True)
        assert await ckpt.steps() == []
    dist.destroy_process_group()
asyncio.run(main())
"""


async def _two_ranks_with_rank_1_stalled(
    s3: SimpleNamespace, tmp_path: Path, script_text: str
) -> subprocess.CompletedProcess[bytes]:
    """Run ``script_text`` on 2 ranks (torchrun) through a proxy that never answers
    rank 1's uploads of data objects (``__1_*``)."""
    from tests.conftest import REPO, torchrun

    def rule(request: str) -> str:
        return "stall" if request.startswith("PUT ") and "__1_" in request else "pass"

    proxy = FaultProxy(s3.url, rule)
    script = tmp_path / "two_ranks.py"
    await anyio.to_thread.run_sync(script.write_text, script_text)
    try:
        with anyio.fail_after(220):
            return await anyio.run_process(
                torchrun(str(script), s3.root, proxy.url),
                check=False,
                cwd=tmp_path,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
    finally:
        proxy.stop()


@pytest.mark.timeout(240)
@pytest.mark.slow
async def test_two_ranks_a_stuck_upload_on_one_fails_the_save_on_both(
    s3: SimpleNamespace, tmp_path: Path
) -> None:
    """Rank 1's upload never progresses: the save fails on both ranks within the bound,
    each naming rank 1 and its object; nothing is committed."""
    proc = await _two_ranks_with_rank_1_stalled(s3, tmp_path, TWO_RANKS_STUCK)
    out = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, out[-6000:]
    failed = [ln for ln in proc.stdout.decode().splitlines() if ln.startswith("FAILED")]
    assert len(failed) == 2, out[-6000:]
    for line in failed:
        assert "rank 1: upload of s3://ckpt/run/step_0/__1_0.distcp made no progress" in line
        assert float(line.split(" after ")[1].split(" s")[0]) < 60, line
    assert not any(k.startswith("run/.commits/") for k in keys(s3.client))


async def test_a_held_lease_is_renewed_and_a_dead_readers_lease_lapses(
    s3: SimpleNamespace,
) -> None:
    """With lease_ttl=2 s: a hold() longer than that keeps its step (renewed); a lease
    nobody renews (its reader crashed) stops protecting the step after ~2 s."""
    opts = {"lease_ttl": 2.0}
    async with aiodcp.AsyncCheckpointer(s3.root, keep_last=1, storage_options=opts) as ckpt:
        await (await ckpt.save(state(0), step=0))
        async with aiodcp.hold(s3.root, 0, storage_options=opts):
            await anyio.sleep(3.5)  # past the ttl: only renewal keeps the lease alive
            await (await ckpt.save(state(1), step=1))
            assert await ckpt.steps() == [0, 1]
        s3.client.put_object(Bucket=BUCKET, Key=f"run/.holds/step_1.{'0' * 32}", Body=b"")
        await (await ckpt.save(state(2), step=2))
        assert await ckpt.steps() == [1, 2]  # the crashed reader's lease is still fresh
        await anyio.sleep(3.5)
        await (await ckpt.save(state(3), step=3))
        assert await ckpt.steps() == [3]  # ... and now it has lapsed
    assert not any(k.startswith("run/.holds/") for k in keys(s3.client))


# ------------------------------------------------------------------ writer lock
async def test_a_second_writer_on_the_same_prefix_is_refused_naming_the_holder(
    s3: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two checkpointers on one s3:// prefix: the second is refused (naming who holds the
    lock), and so is `aiodcp gc`; once the first closes, the lock is gone and both work."""
    async with aiodcp.AsyncCheckpointer(s3.root) as ckpt:
        await (await ckpt.save(state(0), step=0))
        with pytest.raises(aiodcp.CheckpointError, match=r"in use by another live.*pid \d+"):
            async with aiodcp.AsyncCheckpointer(s3.root):
                pass
        assert await anyio.to_thread.run_sync(_cli.main, ["gc", s3.root]) == 1
        assert "in use by another live" in capsys.readouterr().err
        assert "run/.writer" in keys(s3.client)
        assert await ckpt.steps() == [0]
    assert "run/.writer" not in keys(s3.client)
    async with aiodcp.AsyncCheckpointer(s3.root) as ckpt:
        await (await ckpt.save(state(1), step=1))
    assert await anyio.to_thread.run_sync(_cli.main, ["gc", s3.root]) == 0
    assert keys(s3.client, "run/.") == ["run/.commits/step_0", "run/.commits/step_1"]


async def test_a_dead_or_lapsed_writers_lock_is_taken_over_and_a_lost_lock_stops_saves(
    s3: SimpleNamespace,
) -> None:
    """The lock of a process of this host that no longer runs is taken over at once; one
    of another host only once it lapsed (lease_ttl, by the server's clock); a writer whose
    lock was taken over refuses further saves and leaves the new holder's lock alone."""
    import json
    import socket

    from aiodcp._disk._s3_leases import _pid_namespace

    proc = await anyio.run_process([sys.executable, "-c", "import os; print(os.getpid())"])
    dead = int(proc.stdout)
    here = {"host": socket.gethostname(), "pidns": await anyio.to_thread.run_sync(_pid_namespace)}

    def put_lock(**info: Any) -> None:
        s3.client.put_object(Bucket=BUCKET, Key="run/.writer", Body=json.dumps(info).encode())

    def open_writer(opts: dict[str, Any] | None = None) -> Any:
        store = open_store(s3.root, opts)
        store.open_writer(0)
        return store

    put_lock(pid=dead, **here)
    store = await anyio.to_thread.run_sync(open_writer)  # its holder is gone: at once
    await anyio.to_thread.run_sync(store.close_writer)
    assert keys(s3.client) == []
    put_lock(pid=1, host="elsewhere", pidns="x")
    with pytest.raises(aiodcp.CheckpointError, match="pid 1 on elsewhere"):
        await anyio.to_thread.run_sync(open_writer)
    await anyio.sleep(2.5)
    store = await anyio.to_thread.run_sync(open_writer, {"lease_ttl": 1.0})  # lapsed
    await anyio.to_thread.run_sync(store.close_writer)

    opts = {"lease_ttl": 1.5}
    async with aiodcp.AsyncCheckpointer(s3.root, storage_options=opts) as ckpt:
        await (await ckpt.save(state(0), step=0))
        put_lock(pid=2, host="thief", pidns="y")  # as if ours had lapsed and was taken
        await anyio.sleep(1.5)  # a renewal (every 0.5 s) finds it
        with pytest.raises(aiodcp.CheckpointError, match=r"lost the writer lock.*pid 2 on thief"):
            await ckpt.save(state(1), step=1)
    body = s3.client.get_object(Bucket=BUCKET, Key="run/.writer")["Body"].read()
    assert json.loads(body)["host"] == "thief"  # not deleted by the writer that lost it


async def test_cancelling_a_save_mid_upload_aborts_it_and_publishes_nothing(
    s3: SimpleNamespace,
) -> None:
    """handle.cancel() while the daemon uploads (before the marker, the commit point): the
    save is cancelled, its multipart upload aborted, no step and no object of it remain;
    the daemon serves the next save."""
    hit = anyio.Event()
    token = anyio.lowlevel.current_token()
    stuck = {"on": True}

    def rule(request: str) -> str:
        if stuck["on"] and request.startswith("PUT ") and re.search(r"[?&]partNumber=2\b", request):
            anyio.from_thread.run_sync(hit.set, token=token)
            return "stall"
        return "pass"

    proxy = FaultProxy(s3.url, rule)
    opts = {**MULTIPART, "max_concurrency": 1, "endpoint_url": proxy.url}
    try:
        async with aiodcp.AsyncCheckpointer(s3.root, storage_options=opts) as ckpt:
            handle = await ckpt.save({"w": torch.randn(BIG // 4)}, step=0)
            with anyio.fail_after(60):
                await hit.wait()  # part 1 is uploaded, part 2 hangs
            assert uploads(s3.client) == ["run/step_0/__0_0.distcp"]
            handle.cancel()
            with anyio.fail_after(30), pytest.raises(aiodcp.CheckpointCancelledError):
                await handle
            assert await ckpt.steps() == []
            assert uploads(s3.client) == []
            assert not any(k.startswith("run/step_0/") for k in keys(s3.client))
            stuck["on"] = False
            await (await ckpt.save(state(1), step=1))
            assert await ckpt.steps() == [1]
    finally:
        proxy.stop()


async def test_a_stopped_upload_aborts_its_multipart_uploads_itself(
    s3: SimpleNamespace, tmp_path: Path
) -> None:
    """S3Store.upload stopped mid-file (any rank, without rank 0's clean-up): it returns
    with no multipart upload of its own left open."""
    hit = threading.Event()

    def rule(request: str) -> str:
        if request.startswith("PUT ") and re.search(r"[?&]partNumber=2\b", request):
            hit.set()
            return "stall"
        return "pass"

    proxy = FaultProxy(s3.url, rule)
    opts = {**MULTIPART, "max_concurrency": 1, "endpoint_url": proxy.url}
    (tmp_path / "__1_0.distcp").write_bytes(os.urandom(BIG))

    def should_stop() -> None:
        if hit.is_set():
            raise aiodcp.CheckpointCancelledError("stop")

    store = open_store(s3.root, opts)
    try:
        with pytest.raises(aiodcp.CheckpointCancelledError):
            await anyio.to_thread.run_sync(store.upload, tmp_path, 3, 1, should_stop)
        assert uploads(s3.client) == []
    finally:
        proxy.stop()
        store.close()


async def test_an_unreachable_endpoint_is_one_clear_error_within_seconds(
    s3: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listens at the endpoint: opening, loading and the CLI each fail within
    seconds (not after max_attempts backed-off retries) with one line naming the cause."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]  # closed again: connections are refused
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    for attempt in (
        lambda: aiodcp.AsyncCheckpointer(s3.root).__aenter__(),
        lambda: aiodcp.load(blank(), s3.root),
    ):
        t0 = time.monotonic()
        with pytest.raises(aiodcp.CheckpointError, match="cannot reach the S3 endpoint"):
            await attempt()
        assert time.monotonic() - t0 < 15
    capsys.readouterr()
    assert await anyio.to_thread.run_sync(_cli.main, ["ls", s3.root]) == 1
    err = capsys.readouterr().err
    assert err.startswith("aiodcp: s3://ckpt/run: cannot reach the S3 endpoint"), err
    assert "Traceback" not in err and err.count("\n") == 1


async def test_upload_progress_is_reported_as_uploading_events(s3: SimpleNamespace) -> None:
    """on_event sees ``uploading`` events between ``written`` and ``committed``: bytes of
    this rank's files stored so far, never more than the total, ending at the total."""
    events: list[aiodcp.SaveEvent] = []
    async with aiodcp.AsyncCheckpointer(
        s3.root, on_event=events.append, storage_options={**MULTIPART, "max_concurrency": 1}
    ) as ckpt:
        await (await ckpt.save({"w": torch.randn(BIG // 4)}, step=0))
    phases = [e.phase for e in events]
    assert phases.index("written") < phases.index("uploading") < phases.index("committed")
    up = [e for e in events if e.phase == "uploading"]
    sizes = {o["Key"]: o["Size"] for o in s3.client.list_objects_v2(Bucket=BUCKET)["Contents"]}
    total = sizes["run/step_0/__0_0.distcp"] + sizes["run/step_0/.metadata"]
    assert all(e.total_bytes == total and 0 <= e.bytes_written <= total for e in up)
    assert [e.bytes_written for e in up] == sorted(e.bytes_written for e in up)
    assert up[-1].bytes_written == total


async def test_read_only_credentials_load_without_a_lease(
    s3: SimpleNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    """Credentials that may read but not write (an evaluation job's): load() reads the
    latest step unleased, with a warning; an explicit hold() is refused clearly."""
    async with aiodcp.AsyncCheckpointer(s3.root) as ckpt:
        await (await ckpt.save(state(5), step=5))

    def rule(request: str) -> str:
        return "deny" if request.startswith(("PUT ", "POST ", "DELETE ")) else "pass"

    proxy = FaultProxy(s3.url, rule)
    opts = {"endpoint_url": proxy.url}
    try:
        into = blank()
        assert await aiodcp.load(into, s3.root, storage_options=opts) == 5
        assert torch.equal(into["w"], state(5)["w"])
        assert "reading it unleased" in caplog.text
        with pytest.raises(aiodcp.CheckpointError, match="access refused"):
            async with aiodcp.hold(s3.root, 5, storage_options=opts):
                pass
        with pytest.raises(aiodcp.CheckpointNotFoundError):
            await aiodcp.load(blank(), s3.root, step=4, storage_options=opts)
    finally:
        proxy.stop()


TWO_RANKS_CANCEL = """
import asyncio, sys, torch, torch.distributed as dist, aiodcp
async def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    opts = {"endpoint_url": sys.argv[2], "upload_stall_timeout": 120.0, "max_attempts": 1}
    async with aiodcp.AsyncCheckpointer(sys.argv[1], storage_options=opts) as ckpt:
        handle = await ckpt.save({f"w{rank}": torch.randn(1000)}, step=0)
        if rank == 1:  # its upload hangs (the proxy): cancel it meanwhile
            await asyncio.sleep(3)
            handle.cancel()
        try:
            await asyncio.wait_for(handle, 60)
        except aiodcp.CheckpointCancelledError:
            print(f"CANCELLED on rank {rank}", flush=True)
        assert await ckpt.steps() == []
    dist.destroy_process_group()
asyncio.run(main())
"""


@pytest.mark.timeout(240)
@pytest.mark.slow
async def test_two_ranks_a_cancel_on_one_mid_upload_cancels_the_save_on_both(
    s3: SimpleNamespace, tmp_path: Path
) -> None:
    """Rank 1 cancels while its upload hangs and rank 0's is done: both ranks' handles
    are cancelled (not failed, not committed), and no object of the step is left."""
    proc = await _two_ranks_with_rank_1_stalled(s3, tmp_path, TWO_RANKS_CANCEL)
    out = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, out[-6000:]
    lines = sorted(ln for ln in proc.stdout.decode().splitlines() if ln.startswith("CANCELLED"))
    assert lines == ["CANCELLED on rank 0", "CANCELLED on rank 1"], out[-6000:]
    assert not any(k.startswith(("run/.commits/", "run/step_0/")) for k in keys(s3.client))


async def test_the_spool_sweep_removes_only_spools_whose_daemon_is_gone(
    s3: SimpleNamespace,
) -> None:
    """Two writers of the same bucket and prefix through different endpoints (two tests
    side by side did it) share this host's spool folder: one's sweep at open once removed
    the other's step being written (FileNotFoundError in its daemon)."""
    await anyio.to_thread.run_sync(_spool_sweep, s3.root)


def _spool_sweep(root: str) -> None:
    store = open_store(root)
    live = store.tmp_dir(3, "ab" * 16)  # named after this process: alive
    dead_pid = 2**22 + 12345  # above pid_max's default: never a live process here
    dead = live.with_name(live.name.replace(f".{os.getpid()}.", f".{dead_pid}."))
    legacy = live.with_name(live.name.replace(f".{os.getpid()}", ""))  # before pids
    other = live.with_name("otherbucket_run_" + live.name.split("_", 2)[2])
    try:
        for path in (live, dead, legacy, other):
            path.mkdir()
        store.cleanup_leftovers()
        assert live.is_dir() and other.is_dir()
        assert not dead.exists() and not legacy.exists()
    finally:
        for path in (live, dead, legacy, other):
            shutil.rmtree(path, ignore_errors=True)
        store.close()
