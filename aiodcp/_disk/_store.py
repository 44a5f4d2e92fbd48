"""Where a root's committed steps live: one small interface, and the local store.

A root is parsed once, at the API boundary (:func:`aiodcp._disk._roots.open_store`) into
a store. :class:`LocalStore` wraps the
functions of :mod:`aiodcp._disk._storage`, :mod:`aiodcp._disk._retention` and
:mod:`aiodcp._disk._manifest` unchanged (the on-disk layout stays byte for byte what
it was); :class:`aiodcp._disk._store_s3.S3Store` is the object-store implementation.

What a store does, and who calls it::

    list_steps / latest / is_committed / exists     parent, readers, daemon
    step_path                                       SaveResult.path
    open_writer / close_writer / cleanup_leftovers  the writer (rank 0 locks and sweeps)
    reconcile                                       after a daemon died (rank 0)
    tmp_dir / upload / commit / apply_retention     daemon: one save
    hold / release                                  readers' leases
    poll_commits                                    watch

Functions here block; the parent runs them in worker threads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._errors import CheckpointExistsError
from . import _retention, _storage

__all__ = ["LocalStore", "Store"]


class Store:
    """The committed-step operations of one root (see the module docstring)."""

    remote = False

    def __str__(self) -> str:
        raise NotImplementedError

    # ---------------------------------------------------------------- reading
    def list_steps(self) -> list[int]:
        raise NotImplementedError

    def latest(self) -> int | None:
        steps = self.list_steps()
        return steps[-1] if steps else None

    def is_committed(self, step: int) -> bool:
        raise NotImplementedError

    def exists(self, step: int, *, quick: bool = False) -> bool:
        """Whether a save of ``step`` without ``overwrite`` must be refused (``quick``: only
        if that costs no network round trip; the daemon checks again before writing)."""
        return self.is_committed(step)

    def step_path(self, step: int) -> Any:
        raise NotImplementedError

    def exists_error(self, step: int) -> CheckpointExistsError:
        return CheckpointExistsError(f"step {step} already exists in {self}")

    def highest_taken_step(self) -> int:
        """The highest step whose name is taken, committed or not (-1: none):
        ``save(step=None)`` picks a higher one."""
        latest = self.latest()
        return -1 if latest is None else latest

    # ---------------------------------------------------------------- writing
    def daemon_options(self) -> dict[str, Any] | None:
        """What the daemon needs to open the same store (never a credential)."""
        return None

    def open_writer(self, rank: int) -> None:
        """Check the root is usable for writing; rank 0 takes the writer's lock and sweeps
        what interrupted saves left."""

    def close(self) -> None:
        """Let go of this store's connections (the store may not be used afterwards)."""

    def writer_lost(self) -> str | None:
        """Why this writer no longer holds the root's lock (None: it does, or has none)."""
        return None

    def close_writer(self) -> None:
        """Sweep leftovers (no daemon runs any more) and release the lock."""

    def cleanup_leftovers(self) -> list[Any]:
        return []

    def reconcile(self) -> list[int]:
        return []

    @property
    def spool_root(self) -> Path:
        """The local directory the daemons' temporary directories are in."""
        raise NotImplementedError

    def tmp_dir(self, step: int, token: str) -> Path:
        """The local directory a rank's daemon writes one save's DCP files into."""
        raise NotImplementedError

    def begin(self, step: int) -> None:
        """Rank 0, before any rank writes: record that a save of ``step`` is under way."""

    def abandon(self, step: int) -> None:
        """Rank 0, after a failed save: remove what it published (never a committed step)."""

    def upload(
        self, tmp: Path, step: int, rank: int, should_stop: Any = None, progress: Any = None
    ) -> None:
        """Every rank, after the vote: make this rank's files of ``tmp`` durable where
        readers find them (a no-op for a local root: the rename publishes them).
        ``should_stop()`` is called often and may raise; ``progress(sent, total)`` too."""

    def commit(self, tmp: Path, step: int, *, overwrite: bool) -> None:
        raise NotImplementedError

    def apply_retention(self, keep_last: int | None, keep_every: int | None) -> list[int]:
        raise NotImplementedError

    # ---------------------------------------------------------------- readers
    def hold(self, step: int, *, required: bool = True) -> Any:
        """A reader's lease on committed ``step`` (``CheckpointNotFoundError`` if it is not);
        ``required=False``: None instead of an error where a lease cannot be taken (an
        object store with read-only credentials)."""
        raise NotImplementedError

    def release(self, lease: Any) -> None:
        raise NotImplementedError


class LocalStore(Store):
    """A directory on a local or shared filesystem (:mod:`aiodcp._disk._storage`'s layout)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock: _storage.WriterLock | None = None

    def __str__(self) -> str:
        return str(self.root)

    def list_steps(self) -> list[int]:
        return _storage.list_steps(self.root)

    def latest(self) -> int | None:
        return _storage.read_latest(self.root)

    def is_committed(self, step: int) -> bool:
        return _storage.is_committed(self.root, step)

    def exists(self, step: int, *, quick: bool = False) -> bool:
        return _storage.step_dir(self.root, step).exists()

    @property
    def spool_root(self) -> Path:
        return self.root

    def step_path(self, step: int) -> Path:
        return _storage.step_dir(self.root, step)

    def exists_error(self, step: int) -> CheckpointExistsError:
        return _storage.exists_error(self.root, step)

    def highest_taken_step(self) -> int:
        return _storage.highest_taken_step(self.root)

    def cleanup_leftovers(self) -> list[Any]:
        return _retention.cleanup_leftovers(self.root)

    def reconcile(self) -> list[int]:
        return _storage.reconcile(self.root)

    def tmp_dir(self, step: int, token: str) -> Path:
        return _storage.tmp_dir(self.root, step, token)

    def commit(self, tmp: Path, step: int, *, overwrite: bool) -> None:
        _storage.commit(self.root, tmp, step, overwrite=overwrite)

    def apply_retention(self, keep_last: int | None, keep_every: int | None) -> list[int]:
        return _retention.apply_retention(self.root, keep_last, keep_every)

    def hold(self, step: int, *, required: bool = True) -> int:
        return _retention.hold_step(self.root, step)

    def release(self, lease: Any) -> None:
        _retention.release_hold(self.root, lease)
