"""The CLI as people use it: in a pipe, pointed at wrong paths, read-only commands that
create nothing, messages that agree, and no torch import where none is needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aiodcp._tools._cli import main

from .conftest import REPO, run_example


@pytest.fixture(scope="module")
def ck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint root with steps 0 and 20, written by the training example."""
    where = tmp_path_factory.mktemp("cli")
    run_example(
        REPO / "examples" / "async_training_loop.py", "--root", "ck", "--steps", "21", cwd=where
    )
    return where / "ck"


def _tree(root: Path) -> list[tuple[str, float]]:
    return sorted((str(p.relative_to(root)), p.stat().st_mtime) for p in root.rglob("*"))


def _cli(*argv: str, stdout: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiodcp", *argv],
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        cwd=REPO,
    )


@pytest.mark.parametrize("argv", [["ls", "--json"], ["inspect"], ["inspect", "--json"]])
def test_output_into_a_closed_pipe_exits_quietly(ck: Path, argv: list[str]) -> None:
    """`aiodcp inspect ROOT --json | head -1`: the reader went away; no traceback, and
    exit 141 (128 + SIGPIPE) as `cat` would give."""
    read, write = os.pipe()
    os.close(read)  # a reader that has already gone: every write gets EPIPE
    try:
        r = _cli(argv[0], str(ck), *argv[1:], stdout=write)
    finally:
        os.close(write)
    assert r.stderr == ""
    assert r.returncode == 141


def test_head_of_a_real_pipe_is_quiet(ck: Path) -> None:
    r = subprocess.run(
        f"{sys.executable} -m aiodcp inspect {ck} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith("step 20 (")


@pytest.mark.parametrize("cmd", ["ls", "inspect", "verify", "gc"])
@pytest.mark.parametrize("kind", ["missing", "file", "plain directory"])
def test_a_wrong_path_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cmd: str, kind: str
) -> None:
    path = tmp_path / "x"
    if kind == "file":
        path.write_text("hi")
    elif kind == "plain directory":
        path.mkdir()
        (path / "notes.txt").write_text("hi")
    before = _tree(tmp_path)
    assert main([cmd, str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    why = {
        "missing": "does not exist",
        "file": "is not a directory",
        "plain directory": "is not a checkpoint directory",
    }[kind]
    assert err == f"aiodcp: {path} {why}" + err.split(why, 1)[1]
    assert err.count("\n") == 1 and why in err
    assert _tree(tmp_path) == before  # in particular, no .lock


def test_read_only_commands_create_nothing(ck: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (ck / ".tmp-step_99-dead").mkdir(exist_ok=True)
    try:
        before = _tree(ck)
        for argv in (["ls"], ["inspect"], ["verify"], ["gc", "--dry-run"]):
            main([argv[0], str(ck), *argv[1:]])
            assert _tree(ck) == before, argv
        assert "would remove" in capsys.readouterr().out
    finally:
        (ck / ".tmp-step_99-dead").rmdir()


def test_a_step_that_is_not_committed_reads_the_same_everywhere(
    ck: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for cmd in ("inspect", "verify"):
        assert main([cmd, str(ck), "--step", "7"]) == 1
        out, err = capsys.readouterr()
        assert (out, err) == ("", f"aiodcp: step 7 is not committed in {ck}\n"), cmd


def test_ls_and_inspect_agree_on_a_missing_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    errs = []
    for cmd in ("ls", "inspect"):
        assert main([cmd, str(tmp_path / "nope")]) == 1
        errs.append(capsys.readouterr().err)
    assert errs[0] == errs[1] == f"aiodcp: {tmp_path / 'nope'} does not exist\n"


def test_ls_verify_gc_do_not_import_torch(ck: Path) -> None:
    code = (
        "import sys; from aiodcp._tools._cli import main\n"
        f"for argv in (['ls', {str(ck)!r}], ['verify', {str(ck)!r}], ['gc', {str(ck)!r}]):\n"
        "    assert main(argv) == 0, argv\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert r.returncode == 0, r.stderr
    assert "step 20: ok (checksums)" in r.stdout


def test_verify_without_torch_still_finds_a_flipped_byte(
    ck: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = next((ck / "step_0").glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    original = bytes(raw)
    raw[len(raw) // 2] ^= 1
    restore = bytes(raw)
    data.write_bytes(original)
    try:
        assert main(["verify", str(ck)]) == 1
        out = capsys.readouterr().out
        assert "step 0: FAILED" in out and "checksum" in out and "step 20: ok" in out
    finally:
        data.write_bytes(restore)
