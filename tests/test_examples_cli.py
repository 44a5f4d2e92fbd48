"""The example runs (twice: the second run resumes) and the CLI's subcommands work."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, run_example, torchrun


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


@pytest.mark.slow
def test_training_example_runs_and_resumes(tmp_path: Path) -> None:
    example = str(REPO / "examples" / "async_training_loop.py")
    first = _run(example, "--root", "ck", "--steps", "41", "--every", "20", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "starting from scratch" in first.stdout and "stall" in first.stdout
    second = _run(example, "--root", "ck", "--steps", "10", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resumed from step 40" in second.stdout


@pytest.mark.slow
def test_cli_demo_runs_twice_in_one_root_and_a_scratch_root_is_removed(tmp_path: Path) -> None:
    r = _run("-m", "aiodcp", "demo", "--root", "demo", "--steps", "41", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "committed" in r.stdout and "[20, 40]" in r.stdout
    assert "writing" not in r.stdout and "staged" not in r.stdout  # not a terminal
    assert sum(ln.startswith("step ") for ln in r.stdout.splitlines()) == 3  # one per save
    again = _run("-m", "aiodcp", "demo", "--root", "demo", "--steps", "41", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resuming after step 40" in again.stdout and "[60, 80]" in again.stdout
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "aiodcp", "demo", "--steps", "21"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert r.returncode == 0, r.stderr
    assert list(scratch.glob("aiodcp-demo-*")) == []


class _Terminal(io.StringIO):
    """What the demo prints to, as a terminal."""

    def isatty(self) -> bool:
        return True


def _lines(text: str) -> list[str]:
    """The lines a terminal shows: each \\r redraw replaces the line it is on."""
    return [ln.rpartition("\r")[2].replace("\x1b[K", "") for ln in text.split("\n")]


def test_demo_progress_is_one_line_per_save(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal one line per save, redrawn in place (\\r, erase to its end) as bytes
    are written: no empty bar while staged, no full bar on failure; in a pipe (or with
    TERM=dumb) only the outcome lines, plain."""
    from aiodcp._parent._checkpointer import SaveEvent
    from aiodcp._tools._cli import _Progress

    events = [
        SaveEvent(3, "staged", 0, 4 << 20, 0.01),
        SaveEvent(3, "writing", 2 << 20, 4 << 20, 0.2),
        SaveEvent(3, "committed", 4 << 20, 4 << 20, 0.4),
        SaveEvent(4, "staged", 0, 4 << 20, 0.01),
        SaveEvent(4, "failed", 0, 0, 0.3),
    ]
    monkeypatch.setenv("TERM", "xterm")
    read, write = os.pipe()
    pipe = os.fdopen(write, "w")
    for out in (_Terminal(), pipe, "dumb"):
        if out == "dumb":
            monkeypatch.setenv("TERM", "dumb")
            out = _Terminal()
        show = _Progress(out)
        for e in events:
            show(e)
        if out is pipe:
            pipe.close()
            with os.fdopen(read) as r:
                text = r.read()
        else:
            text = out.getvalue()
        lines = text.split("\n")
        assert len(lines) == 3 and lines[-1] == ""  # one line per save
        assert "[          " not in text  # never an empty bar
        assert "[####################]" not in text  # never a full bar (failed, committed)
        assert "failed" in lines[1] and "committed" in lines[0]
        if show.live:
            assert "[##########          ]     2.0/4.0 MiB" in lines[0]
            assert _lines(text)[0].startswith("step    3 committed")
        else:
            assert "\r" not in text and "writing" not in text and "\x1b" not in text


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_live_line_moves_with_the_bytes_of_a_real_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real 8 MiB save on a slow disk, shown on a terminal: its one line is redrawn
    several times with more MiB written each time, then shows the commit."""
    import re

    import torch

    import aiodcp
    from aiodcp._tools._cli import _Progress

    monkeypatch.setenv("AIODCP_TEST_SLOW_WRITE_MIB", "0.1")
    monkeypatch.setenv("TERM", "xterm")
    term = _Terminal()
    async with aiodcp.AsyncCheckpointer(tmp_path / "ck", on_event=_Progress(term)) as ckpt:
        await (await ckpt.save({"w": torch.randn(2 << 20)}, step=0))
    text = term.getvalue()
    assert text.count("\n") == 1 and _lines(text)[0].startswith("step    0 committed")
    mib = [float(m) for m in re.findall(r"writing +\[[# ]*\] +([0-9.]+)/8.0 MiB", text)]
    assert len([m for m in mib if m < 8.0]) >= 3 and mib == sorted(set(mib)), text


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_rl_actor_learner_example(tmp_path: Path) -> None:
    """Actors in separate processes follow the published policy, never a partial one, one
    of them killed and restarted midway; run again in the same place, the learner resumes
    from its last checkpoint (30, then 61)."""
    example = str(REPO / "examples" / "rl_actor_learner.py")
    for final in (30, 61):
        r = _run(example, "--root", "rl", "--actors", "2", "--updates", "31", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        for actor in (0, 1):
            assert f"actor {actor}: acting with policy version {final}" in r.stdout
            assert f"actor {actor}: done" in r.stdout
        assert "actors exited with [0, 0]" in r.stdout


@pytest.mark.slow
def test_multirank_example_under_torchrun(tmp_path: Path) -> None:
    example = str(REPO / "examples" / "multirank_torchrun.py")
    cmd = torchrun(example, "--root", "mr")
    for last, kept in ((2, "[1, 2]"), (5, "[4, 5]")):  # run again: it resumes
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"rank 0 reloaded step {last}; committed: {kept}" in r.stdout


def test_the_two_readme_torchrun_commands_use_different_roots() -> None:
    readme = (REPO / "README.md").read_text()
    assert "--root multirank-checkpoints" in readme
    source = (REPO / "examples" / "multirank_torchrun.py").read_text()
    assert 'default="multirank-checkpoints"' not in source


LEFTOVER = ".tmp-step_99-" + "dead" * 8  # exactly a name aiodcp makes


def test_cli_ls_and_gc(tmp_path: Path) -> None:
    run_example(
        REPO / "examples" / "async_training_loop.py", "--root", "ck", "--steps", "21", cwd=tmp_path
    )
    (tmp_path / "ck" / LEFTOVER).mkdir()
    ls = _run("-m", "aiodcp", "ls", "ck", "--json", cwd=tmp_path)
    assert ls.returncode == 0, ls.stderr
    rows = json.loads(ls.stdout)
    assert [r["step"] for r in rows if r["committed"]] == [0, 20]
    assert [r["latest"] for r in rows if r["committed"]] == [False, True]
    assert sum(not r["committed"] for r in rows) == 1
    dry = _run("-m", "aiodcp", "gc", "ck", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0 and "would remove" in dry.stdout
    assert (tmp_path / "ck" / LEFTOVER).exists()
    assert _run("-m", "aiodcp", "gc", "ck", cwd=tmp_path).returncode == 0
    assert not (tmp_path / "ck" / LEFTOVER).exists()
    assert _run("-m", "aiodcp", "ls", "missing", cwd=tmp_path).returncode == 1
    inspect = _run("-m", "aiodcp", "inspect", "ck", "--json", cwd=tmp_path)
    assert inspect.returncode == 0, inspect.stderr
    report = json.loads(inspect.stdout)
    assert report["step"] == 20
    weight = next(e for e in report["entries"] if e["key"] == "model.0.weight")
    assert weight == {
        "key": "model.0.weight",
        "kind": "tensor",
        "dtype": "float32",
        "shape": [256, 64],
        "bytes": 256 * 64 * 4,
        "chunks": 1,
    }
    assert _run("-m", "aiodcp", "inspect", "ck", "--step", "7", cwd=tmp_path).returncode == 1
    assert _run("-m", "aiodcp", "frobnicate", cwd=tmp_path).returncode == 2
