"""Issue 17 (second review), observations 5-8: each test failed on the code before its fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
import torch
import torch.distributed.checkpoint as dcp

import aiodcp
from aiodcp import CheckpointExistsError, CheckpointNotFoundError, WorkerDiedError
from aiodcp._disk import _storage as s

from .conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO)}  # the subprocesses import this checkout


def _python(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=ENV
    )


def _state(value: float = 1.0) -> dict:
    return {"w": torch.full((100,), value), "b": torch.arange(4.0)}


def _incomplete(root: Path, step: int) -> Path:
    """``step_<step>/`` as a crashed plain ``dcp.save`` leaves it: data, no ``.metadata``."""
    path = s.step_dir(root, step)
    path.mkdir(parents=True, exist_ok=True)
    (path / "__0_0.distcp").write_bytes(b"half a checkpoint")
    return path


# ------------------------------------------------------------------ 5: step=None wedged
@pytest.mark.asyncio
async def test_step_none_skips_an_incomplete_step_dir_and_never_touches_it(root: Path) -> None:
    """Steps 0-2 committed, then a ``step_3/`` without .metadata: step=None saves pick 4, 5
    (not 3 forever); step 3 is never listed, loaded or deleted by retention; save(step=3)
    says what it is."""

    def plain_steps_then_a_crash() -> None:
        for step in range(3):
            dcp.save(_state(), checkpoint_id=s.step_dir(root, step), no_dist=True)
        _incomplete(root, 3)

    await anyio.to_thread.run_sync(plain_steps_then_a_crash)
    async with aiodcp.AsyncCheckpointer(root, keep_last=1) as ckpt:
        assert (await (await ckpt.save(_state(1.0)))).step == 4
        assert (await (await ckpt.save(_state(2.0)))).step == 5
        assert await ckpt.steps() == [0, 1, 2, 5]  # plain DCP steps are never retention's
        with pytest.raises(CheckpointExistsError, match="not a committed checkpoint") as info:
            await ckpt.save(_state(), step=3)
        assert "Remove or move it" in str(info.value)
        with pytest.raises(CheckpointNotFoundError):
            await ckpt.load(_state(), step=3)
        assert (await (await ckpt.save(_state(3.0)))).step == 6  # the failure wedged nothing
    assert await anyio.to_thread.run_sync(lambda: (root / "step_3" / "__0_0.distcp").is_file())
    assert await anyio.to_thread.run_sync(s.highest_taken_step, root) == 6
    assert await anyio.to_thread.run_sync(s.incomplete_steps, root) == [3]


def test_cli_ls_shows_an_incomplete_step_and_gc_keeps_it(tmp_path: Path) -> None:
    """``aiodcp ls`` lists ``step_3/`` without .metadata as not committed; ``gc`` leaves it."""
    root = tmp_path / "ck"
    _incomplete(root, 3)
    ls = _python("-m", "aiodcp", "ls", str(root), "--json", cwd=tmp_path)
    assert ls.returncode == 0, ls.stderr
    rows = json.loads(ls.stdout)
    assert [(Path(r["path"]).name, r["committed"]) for r in rows] == [("step_3", False)]
    text = _python("-m", "aiodcp", "ls", str(root), cwd=tmp_path)
    assert "incomplete step_3" in text.stdout
    assert _python("-m", "aiodcp", "gc", str(root), cwd=tmp_path).returncode == 0
    assert (root / "step_3" / "__0_0.distcp").is_file()


# --------------------------------------------------- 6: containers defined in the script
SCRIPT_CONTAINER = """
import asyncio, dataclasses, enum, sys
import torch
import torch.distributed.checkpoint as dcp
import aiodcp


class Config(dict):
    pass


class Mode(enum.Enum):
    TRAIN = 1


@dataclasses.dataclass
class Opts:
    lr: float
    name: str


def state(value):
    return {
        "model": {"w": torch.full((4,), value)},
        "cfg": Config(a=torch.full((2,), value), depth=int(value), opts=Opts(value, "x")),
        "by_mode": {Mode.TRAIN: torch.full((3,), value)},
        "opts": [Opts(value, "y"), {"t": torch.full((1,), value)}],
    }


async def main(root):
    want = state(0.0)  # plain DCP's semantics, for comparison
    dcp.save(state(7.0), checkpoint_id=root + "-plain", no_dist=True)
    dcp.load(want, checkpoint_id=root + "-plain", no_dist=True)
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        result = await (await ckpt.save(state(7.0)))
        got = state(0.0)
        try:  # a script's own class is not among the types reading admits by default
            await ckpt.load(got)
            raise AssertionError("a __main__ class was unpickled without the opt-in")
        except aiodcp.CheckpointError as exc:
            assert "weights_only" in str(exc), exc
        torch.serialization.add_safe_globals([Opts])  # the documented way to admit it
        got = state(0.0)
        await ckpt.load(got)
    assert type(got["cfg"]) is Config and got["cfg"]["opts"] == Opts(7.0, "x"), got
    assert got["opts"][0] == Opts(7.0, "y") and got["cfg"]["depth"] == 7, got
    assert repr(got) == repr(want), (got, want)
    print("committed step", result.step)


asyncio.run(main(sys.argv[1]))
"""


def test_script_defined_container_and_leaf_round_trip(tmp_path: Path) -> None:
    """A dict subclass, a dataclass leaf and an Enum key defined in ``__main__`` (a real
    script) save and load back as plain dcp.save/load would, instead of failing in the daemon."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT_CONTAINER)
    r = _python(str(script), str(tmp_path / "ck"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "committed step 0" in r.stdout


def test_containers_are_staged_as_plain_dicts() -> None:
    """Every mapping in the skeleton is a plain dict with str/int keys (DCP's view of it)."""
    from collections import OrderedDict

    from aiodcp._staging._staging import flatten

    class Mine(dict):  # type: ignore[type-arg]
        pass

    flat = flatten({"m": OrderedDict(a=torch.ones(1)), "n": {"x": Mine(b=1), 2.5: {}}})
    assert type(flat.skeleton["m"]) is dict and type(flat.skeleton["n"]["x"]) is dict
    assert list(flat.skeleton["n"]) == ["x", "2.5"]


# ------------------------------------------------------- 7: the program's SIGTERM handler
SCRIPT_SIGNALS = """
import os, signal, sys
import anyio
import torch
import aiodcp

ran = []
def handler(signum, frame):
    ran.append(signum)
signal.signal(signal.SIGTERM, handler)


async def check(how):
    assert signal.getsignal(signal.SIGTERM) is handler, (how, signal.getsignal(signal.SIGTERM))
    before = len(ran)
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100):
        if len(ran) > before:
            break
        await anyio.sleep(0.01)
    assert len(ran) == before + 1, how
    print("restored after", how, flush=True)


async def main(root):
    # normal exit, once the preemption task has run
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        ckpt.handle_signals(signal.SIGTERM, grace=5)
        await (await ckpt.save({"x": torch.ones(2)}))
    await check("a normal exit")
    # exit before the preemption task ever ran (the receiver still installed)
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        ckpt.handle_signals(signal.SIGTERM)
    await check("an exit right after handle_signals")
    # exit by exception
    try:
        async with aiodcp.AsyncCheckpointer(root) as ckpt:
            ckpt.handle_signals(signal.SIGTERM)
            await anyio.sleep(0.05)
            raise KeyError("boom")
    except KeyError:
        pass
    await check("an exception")
    # preemption
    before = len(ran)
    try:
        async with aiodcp.AsyncCheckpointer(root) as ckpt:
            ckpt.handle_signals(signal.SIGTERM, grace=5)
            await anyio.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)
            await anyio.sleep(30)
    except SystemExit as exc:
        assert exc.code == 128 + signal.SIGTERM, exc.code
    assert len(ran) == before, ran  # the checkpointer took that one
    await check("preemption")


backend = sys.argv[2]
if backend == "uvloop":
    import uvloop
    uvloop.run(main(sys.argv[1]))
else:
    anyio.run(main, sys.argv[1], backend=backend)
print("done")
"""


@pytest.mark.parametrize("backend", ["asyncio", "uvloop", "trio"])
def test_handle_signals_restores_the_programs_handler(tmp_path: Path, backend: str) -> None:
    """After the block exits (normally, right away, by exception, by preemption) a SIGTERM
    runs the program's own handler again, on asyncio, uvloop and trio."""
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(SCRIPT_SIGNALS))
    r = _python(str(script), str(tmp_path / "ck"), backend, cwd=tmp_path, timeout=240)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-3000:])
    assert r.stdout.count("restored after") == 4 and "done" in r.stdout


# ------------------------------------------------ 8: other programs' files in the root
FOREIGN_DIRS = (".tmp-dataset-shards", ".trash-bin-notes", ".tmp-step_5-abc", ".tmp-step_5")
FOREIGN_FILES = (".latest.json", ".latest.1", f".latest.{'a' * 31}")


def _foreign(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name in FOREIGN_DIRS:
        (root / name).mkdir()
        (root / name / "data").write_text("keep me")
    for name in FOREIGN_FILES:
        (root / name).write_text("keep me")


def _own(root: Path) -> list[str]:
    """aiodcp's own leftovers, by hand, with exactly its names."""
    names = [
        s.tmp_dir(root, 7, s.new_token()).name,
        s.trash_dir(root, 2).name,
        f".latest.{s.new_token()}",
    ]
    (root / names[0]).mkdir()
    (root / names[1]).mkdir()
    (root / names[2]).write_text("7\n")
    return names


def _survivors(root: Path) -> list[str]:
    """The foreign entries still there, with their contents."""
    kept = [n for n in FOREIGN_DIRS if (root / n / "data").is_file()]
    kept += [n for n in FOREIGN_FILES if (root / n).is_file()]
    return sorted(n for n in kept if (root / n).is_file() or (root / n / "data").read_text())


def _writing(root: Path) -> bool:
    return any(n.startswith(".tmp-step_0-") for n in os.listdir(root))


@pytest.mark.asyncio
async def test_foreign_dot_entries_survive_open_close_and_gc(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``.tmp-*``, ``.trash-*``, ``.latest.*`` of other programs survive opening, a killed
    save, closing and ``aiodcp gc``; aiodcp's own leftovers (exact names) are removed."""
    await anyio.to_thread.run_sync(_foreign, root)
    own = await anyio.to_thread.run_sync(_own, root)
    everything = sorted(FOREIGN_DIRS + FOREIGN_FILES)
    monkeypatch.setenv("AIODCP_TEST_SLOW_WRITE", "2.0")  # seconds per item written
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        names = await anyio.to_thread.run_sync(os.listdir, root)
        assert not set(own) & set(names)  # removed at open
        assert await anyio.to_thread.run_sync(_survivors, root) == everything
        handle = await ckpt.save(_state())
        with anyio.fail_after(30):  # the daemon is writing: its temporary directory is there
            while not await anyio.to_thread.run_sync(_writing, root):  # noqa: ASYNC110
                await anyio.sleep(0.02)
        pid = ckpt.worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # leaves its temporary directory behind
        with pytest.raises(WorkerDiedError):
            await handle
        names = await anyio.to_thread.run_sync(os.listdir, root)
        killed = [n for n in names if s.is_leftover(n)]
        assert len(killed) == 1 and killed[0].startswith(".tmp-step_0-"), names
    names = await anyio.to_thread.run_sync(os.listdir, root)
    assert not [n for n in names if s.is_leftover(n)], names  # removed at close
    assert await anyio.to_thread.run_sync(_survivors, root) == everything
    own = await anyio.to_thread.run_sync(_own, root)
    gc = await anyio.to_thread.run_sync(
        lambda: _python("-m", "aiodcp", "gc", str(root), cwd=root.parent)
    )
    assert gc.returncode == 0, gc.stderr
    assert sorted(Path(line.split()[-1]).name for line in gc.stdout.splitlines()) == sorted(own)
    names = await anyio.to_thread.run_sync(os.listdir, root)
    assert not set(own) & set(names)
    assert await anyio.to_thread.run_sync(_survivors, root) == everything
