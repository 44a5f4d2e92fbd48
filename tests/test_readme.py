"""The README's python blocks marked runnable run as pasted, twice in the same place."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

MARK = "<!-- runnable -->\n```python\n"


def _blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(re.escape(MARK) + r"(.*?)\n```", text, flags=re.S)


def test_the_quickstart_blocks_are_marked() -> None:
    blocks = _blocks()
    assert len(blocks) == 2  # the quickstart and the overlapped one
    assert all("asyncio.run(main())" in b for b in blocks)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("index", [0, 1], ids=["quickstart", "overlapped"])
@pytest.mark.slow
def test_a_runnable_block_runs_twice_as_pasted(tmp_path: Path, index: int) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(_blocks()[index])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for run in range(2):
        r = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env=env,
        )
        assert r.returncode == 0, f"run {run + 1}: {r.stderr[-3000:]}"
        assert "committed: [" in r.stdout
