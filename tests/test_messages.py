"""Errors say what happened and what to do, in a line or two; the daemon's traceback stays
on the exception (and in debug logging), not in its message."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest
import torch

import aiodcp
from aiodcp._disk import _storage
from aiodcp._errors import CheckpointError
from aiodcp._staging import _staging

from .conftest import REPO


@pytest.mark.asyncio
async def test_save_failed_error_is_short_and_keeps_the_daemon_traceback(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = {"x": torch.ones(100_000)}
    async with aiodcp.AsyncCheckpointer(root) as ckpt:
        await (await ckpt.save(state))
        await anyio.run_process(["prlimit", f"--pid={ckpt.worker_pid}", "--fsize=4096"])
        with caplog.at_level(logging.DEBUG, logger="aiodcp"):
            with pytest.raises(aiodcp.SaveFailedError) as info:
                await (await ckpt.save(state))
    message = str(info.value)
    assert len(message.splitlines()) <= 2 and "File too large" in message
    assert "Traceback" not in message
    assert "Traceback (most recent call last)" in info.value.remote_traceback
    assert info.value.remote_traceback in caplog.text


def test_saving_a_bare_module_suggests_a_mapping() -> None:
    with pytest.raises(TypeError, match=r'must be a mapping, not Linear; did you mean \{"model"'):
        _staging.flatten(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def test_a_root_in_use_names_its_holder_and_what_to_do(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys
                from pathlib import Path
                from aiodcp._disk import _storage
                _storage.WriterLock(Path({str(tmp_path)!r})).acquire()
                print("held", flush=True)
                sys.stdin.read()
            """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(CheckpointError) as info:
            _storage.WriterLock(tmp_path).acquire()
        message = str(info.value)
        assert f"in use by another live AsyncCheckpointer (pid {holder.pid} on " in message
        assert "close that one first" in message
    finally:
        holder.kill()
        holder.communicate()  # reaps it and closes both pipes
    mine = _storage.WriterLock(tmp_path)
    mine.acquire()  # the holder died: the kernel dropped its lock
    try:
        with pytest.raises(CheckpointError, match=rf"\(this process, pid {os.getpid()}\)"):
            _storage.WriterLock(tmp_path).acquire()
    finally:
        mine.release()
