"""Following new checkpoints: ``watch(root)`` yields each newly committed step.

Commits made in this process wake watchers at once; commits by other
processes are seen through inotify where the kernel has it (a commit is a
rename into ``root``), else by polling every ``poll_interval`` seconds. A step
counts as committed once its directory is renamed into place, whether or not
its committer lived to append it to ``.commits``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from .._disk import _storage
from .._disk._roots import open_store
from .._disk._store import LocalStore, Store

__all__ = ["notify_commit", "watch"]

_waiters: dict[Path | str, set[Any]] = {}

_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_IN_CREATE = 0x100
_IN_MOVED_TO = 0x80
_IN_CLOSE_WRITE = 0x8


def notify_commit(root: Path | str, step: int) -> None:
    """Wake this process's watchers of ``root`` (called on the event loop)."""
    for event in list(_waiters.get(root, ())):
        event.set()


def _inotify(root: Path) -> int | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fd = int(libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC))
        if fd < 0:
            return None
        wd = libc.inotify_add_watch(
            fd, os.fsencode(root), _IN_MOVED_TO | _IN_CREATE | _IN_CLOSE_WRITE
        )
        if wd < 0:
            os.close(fd)
            return None
        return fd
    except (OSError, AttributeError):
        return None


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while os.read(fd, 65536):
            pass


def _start(root: Path) -> tuple[int | None, int]:
    """The latest step now, and where the commit log ends now."""
    try:
        offset = (root / _storage.COMMITS).stat().st_size
    except FileNotFoundError:
        offset = 0
    return _storage.read_latest(root), offset


def _scan(root: Path, offset: int) -> tuple[list[int], int]:
    """New commits: from the log (every one, even if retention deleted it since) and
    from the directory listing (the disk is the truth: a step whose committer died
    between the rename and the log append is committed all the same; the next
    opener's ``reconcile`` appends it to the log later, and the caller yields each
    step once because it only yields steps above the last one)."""
    listed = _storage.list_steps(root)
    logged = _storage.read_commits(root, offset)
    if logged is None:
        return listed, offset
    steps, offset = logged
    return sorted({*steps, *listed}), offset


async def watch(
    root: str | os.PathLike[str] | Store,
    *,
    include_latest: bool = False,
    poll_interval: float = 0.5,
    storage_options: Mapping[str, Any] | None = None,
) -> AsyncIterator[int]:
    """Yield each step committed under ``root`` from now on, in increasing order.

    Iteration starts after the latest step present when it begins;
    ``include_latest=True`` yields that one first. Only committed steps are
    ever yielded, each once, even if the consumer is slower than the writer; a
    step that retention has deleted since may then be gone -- wrap the load in
    :func:`aiodcp.hold`, which raises ``CheckpointNotFoundError`` for it. Stop
    by breaking out of the loop (or cancelling it). An ``s3://`` root is polled
    (its commit markers listed) every ``poll_interval`` seconds.
    """
    store = await anyio.to_thread.run_sync(open_store, root, storage_options)
    if not isinstance(store, LocalStore):
        try:
            async for step in _poll_store(store, include_latest, poll_interval):
                yield step
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(store.close)
        return
    path = store.root
    event = anyio.Event()
    _waiters.setdefault(path, set()).add(event)
    fd = await anyio.to_thread.run_sync(_inotify, path)
    try:
        last, offset = await anyio.to_thread.run_sync(_start, path)
        if include_latest and last is not None:
            yield last
        while True:
            steps, offset = await anyio.to_thread.run_sync(_scan, path, offset)
            for step in steps:
                if last is None or step > last:
                    last = step
                    yield step
            with anyio.move_on_after(poll_interval):
                if fd is not None:
                    await anyio.wait_readable(fd)
                else:
                    await event.wait()
            if fd is not None:
                _drain(fd)
            if event.is_set():
                _waiters[path].discard(event)
                event = anyio.Event()
                _waiters[path].add(event)
    finally:
        waiters = _waiters.get(path)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                del _waiters[path]
        if fd is not None:
            os.close(fd)


async def _poll_store(
    store: Store, include_latest: bool, poll_interval: float
) -> AsyncIterator[int]:
    """``watch`` of a store without change notifications: its committed steps, polled."""
    key = str(store)
    event = anyio.Event()
    _waiters.setdefault(key, set()).add(event)
    try:
        last = await anyio.to_thread.run_sync(store.latest)
        if include_latest and last is not None:
            yield last
        while True:
            for step in await anyio.to_thread.run_sync(store.list_steps):
                if last is None or step > last:
                    last = step
                    yield step
            with anyio.move_on_after(poll_interval):
                await event.wait()
            if event.is_set():
                _waiters[key].discard(event)
                event = anyio.Event()
                _waiters[key].add(event)
    finally:
        waiters = _waiters.get(key)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                del _waiters[key]
