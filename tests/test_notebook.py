"""The example notebook executes top to bottom in a real kernel and leaves no daemon behind."""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from .conftest import REPO, daemon_pids


@pytest.mark.timeout(360)
@pytest.mark.slow
def test_notebook_runs_and_kernel_shutdown_leaves_no_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIODCP_NOTEBOOK_ROOT", str(tmp_path / "ckpt"))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    for _ in range(2):  # run again in the same place: its cells re-run (overwrite=True)
        nb = nbformat.read(REPO / "examples" / "notebook.ipynb", as_version=4)
        client = NotebookClient(
            nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        )
        client.execute()  # shuts the kernel down at the end, with the checkpointer still open
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "step 0:" in outputs and "weights differ by x10.0" in outputs
    pid = int(outputs.split("daemon pid ")[1].split()[0])
    deadline = time.monotonic() + 10
    while pid in daemon_pids():
        assert time.monotonic() < deadline, "the daemon outlived its kernel"
        time.sleep(0.1)
    assert (tmp_path / "ckpt" / "step_1" / ".metadata").exists()
