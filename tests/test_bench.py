"""``aiodcp bench``: the shapes, the interleaving, and smoke runs of both benchmarks.

The runs use tiny sizes and check only that every row and ratio line is printed; timing
is not asserted (the machine is shared and noisy).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aiodcp._tools._bench import interleaved, make_state, tensors_of

from .conftest import REPO


def _bench(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "aiodcp", "bench", "--dir", str(cwd / "b"), *args],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=cwd,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_interleaved_rotates_the_order() -> None:
    """Round r starts at method r, so no method always runs first or last."""
    assert interleaved(["a", "b", "c"], 4) == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]


@pytest.mark.parametrize(
    ("shape", "count"), [("big16", 16), ("dense", 1024), ("moe", 29472), ("small100k", 100_000)]
)
def test_named_shapes_have_their_tensor_counts(shape: str, count: int) -> None:
    """Each named shape has the documented number of tensors and about --mib bytes."""
    state, _ = make_state(shape, 16)
    tensors = tensors_of(state)
    assert len(tensors) == count
    if shape in ("big16", "dense"):
        assert 14 * 2**20 < sum(t.nbytes for t in tensors) < 18 * 2**20


def test_generic_tensors_split_the_size() -> None:
    """--tensors N --mib M: N equal tensors of M/N MiB."""
    state, _ = make_state("big16", 1, tensors=8)
    assert [t.nbytes for t in tensors_of(state)] == [2**17] * 8


@pytest.mark.slow
def test_shape_run_prints_every_row_and_ratio(tmp_path: Path) -> None:
    """One interleaved round of each method, plus memory, on a 2 MiB big16 state."""
    out = _bench(
        "--shape", "big16", "--mib", "2", "--rounds", "1", "--mem", "--rss-saves", "3", cwd=tmp_path
    )
    for row in (
        "dcp.save (sync)",
        "dcp.async_save THREAD",
        "dcp.async_save PROCESS",
        "aiodcp  ",
        "aiodcp first save",
        "aiodcp first, prepare()d",
        "aiodcp overlap=True",
        "floors: copy into preallocated",
    ):
        assert row in out, out
    assert "ratios: aiodcp stall / PROCESS stall" in out
    assert "aiodcp overlap=True stall / PROCESS stall" in out
    assert "aiodcp stall / copy floor" in out and "fdatasync floor" in out
    assert "after 3 saves" in out
    assert "failed" not in out


def test_generic_tensor_count_run(tmp_path: Path) -> None:
    """--tensors N --mib M runs with a subset of the methods; missing ratios read n/a."""
    out = _bench(
        "--tensors", "40", "--mib", "1", "--rounds", "1", "--methods", "sync,aiodcp", cwd=tmp_path
    )
    assert "tensors: 1 MiB in 40 tensors" in out
    assert "aiodcp stall / PROCESS stall n/a" in out


def test_legacy_sizes_map_onto_big16(tmp_path: Path) -> None:
    """--sizes keeps working: big16 at each size."""
    out = _bench("--sizes", "1,2", "--rounds", "1", "--methods", "sync", cwd=tmp_path)
    assert "big16: 1 MiB in 16 tensors" in out and "big16: 2 MiB in 16 tensors" in out


@pytest.mark.slow
def test_train_run_prints_every_method_and_ratio(tmp_path: Path) -> None:
    """--train: a row per method (overlap reads n/a until the API exists) and the ratios."""
    out = _bench(
        "--train", "--mib", "4", "--steps", "4", "--every", "2", "--rounds", "1", "--batch", "4",
        cwd=tmp_path,
    )  # fmt: skip
    for row in (
        "no checkpointing",
        "dcp.save (sync)",
        "dcp.async_save THREAD",
        "dcp.async_save PROCESS",
        "PROCESS + DefaultStager(async)",
        "aiodcp  ",
        "aiodcp overlap=True + guard",
    ):
        assert row in out, out
    assert "ratios: aiodcp overhead / DefaultStager overhead" in out
    assert "save every 2 (2 saves)" in out


def test_dcp_process_info_lines_stay_out_of_the_output_and_the_header_is_measured(
    tmp_path: Path,
) -> None:
    """DCP's PROCESS background process logs INFO to its stderr: it goes to a log file, not
    between the table's lines; the s/step line is what the `none` runs measured."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [
            sys.executable, "-m", "aiodcp", "bench", "--dir", str(tmp_path / "b"), "--train",
            "--mib", "4", "--steps", "4", "--every", "2", "--rounds", "1", "--batch", "4",
            "--methods", "process",
        ],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert " - INFO - " not in r.stdout + r.stderr, r.stderr[-3000:]
    assert "s/step)" not in r.stdout  # no longer a pre-run guess in the header
    assert "training alone (none):" in r.stdout and "measured in these runs" in r.stdout
