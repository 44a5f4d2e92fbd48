"""The daemon's storage writer: DCP's ``FileSystemWriter`` with writer threads of its own.

DCP's writer runs ``thread_count - 1`` extra threads and joins them without
looking at how they ended: an error in one (a full disk, ``File too large``) is
only printed by ``threading.excepthook``, its files' entries are missing from
``.metadata``, and the save "succeeds" with a checkpoint that cannot load.
:class:`VerifiedWriter` replaces that part:

* each thread writes its own files (thread ``i`` writes files ``i``, ``i + n``, ...);
  every exception is caught and kept (nothing reaches ``threading.excepthook``),
  the other threads stop at their next item, and ``write_data`` re-raises the
  first one, so any writer's failure fails the save;
* each tensor's ``torch.save`` record is written from a template of its kind
  (:mod:`aiodcp._daemon._records`: the same bytes, ~15x less CPU per record);
* every byte is hashed (xxh3_64) as it is written (torch.save's own zip CRC-32,
  which cost more CPU than the hash and is never checked by ``torch.load``, is
  off in these threads); the digests travel with the
  write results to the coordinator, whose ``finish`` writes ``.metadata`` and then
  the step's manifest (:func:`aiodcp._disk._manifest.write_manifest`), so the commit needs
  no second read of the data.

Call order (as DCP documents for a ``StorageWriter``): ``write_data`` on every
rank, then ``finish`` on the coordinator with every rank's results.
:func:`save` runs DCP's ``save`` and turns its ``CheckpointException`` (a
``BaseException`` whose text embeds tracebacks) back into the exception that
caused it.
"""

from __future__ import annotations

import io
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint.filesystem import FileSystemWriter, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from .._disk import _manifest
from . import _direct, _records

__all__ = ["FileDigest", "VerifiedWriter"]


@dataclass(frozen=True)
class FileDigest:
    """What one writer thread wrote to one file: its size and xxh3_64. Carried to the
    coordinator as the ``storage_data`` of an extra write result; never in ``.metadata``."""

    name: str
    size: int
    xxh3_64: str


_DIGEST_FQN = "\0aiodcp-digest/"
_SLICE = 1 << 20


def _slow_mib() -> float:
    """Test-only: seconds to sleep per MiB written, so tests can watch the progress of a
    single big write (read at each write: a forked daemon has its own spawn's environment)."""
    return float(os.environ.get("AIODCP_TEST_SLOW_WRITE_MIB", "0") or 0)


def _ignore(n: int) -> None:
    pass


class _HashingStream:
    """A write-only stream that hashes what it passes on and counts its position.

    Of the bytes it writes it reports, about every MiB, those that ``count`` says are
    tensor data (a record's header and a pickled value are not counted): the save's
    progress moves as its bytes reach the file, not as its items are looked up.
    """

    def __init__(self, raw: Any, on_bytes: Callable[[int], None] = _ignore) -> None:
        self.raw = raw
        self.hash = xxhash.xxh3_64()
        self.pos = 0
        self.count = 0  # bytes still to report of the record being written
        self.unreported = 0  # counted, not yet reported (reported per MiB: cheap per byte)
        self.reported_at = 0.0
        self.on_bytes = on_bytes
        # torch.save's zip writer (C++) swallows an exception of write() and fails
        # later with "unexpected pos": the real error (EFBIG, ENOSPC) is kept here.
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        # slice by slice, so each slice is hashed while the write's copy left it in cache
        for start in range(0, view.nbytes, _SLICE):
            piece = view[start : start + _SLICE]
            try:
                self.raw.write(piece)  # writes all of it or raises
            except OSError as exc:
                self.error = self.error or exc
                raise
            self.hash.update(piece)
            if slow := _slow_mib():  # fault-injection hook for tests: a slow disk
                time.sleep(slow * piece.nbytes / _SLICE)
            counted = min(piece.nbytes, self.count)
            self.count -= counted
            self.unreported += counted
            if self.unreported >= _SLICE:
                self.report()
        self.pos += view.nbytes
        return view.nbytes

    def report(self) -> None:
        if self.unreported:
            self.on_bytes(self.unreported)
            self.unreported = 0
            self.reported_at = time.monotonic()

    def report_if_due(self) -> None:
        """At a record's end: report small records' bytes too, a few times a second."""
        if self.unreported and time.monotonic() - self.reported_at >= 0.05:
            self.report()

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass  # torch.save flushes after every record: the file writes whole buffers


class VerifiedWriter(FileSystemWriter):
    """``FileSystemWriter`` whose threads' errors fail the save and whose bytes are hashed.

    ``step`` is recorded in the manifest. One file per thread per rank
    (``single_file_per_rank``), written in DCP's torch.save format; with
    ``direct_io`` past the page cache where the filesystem allows
    (:class:`aiodcp._daemon._direct.DirectFile`). ``on_bytes(n)`` is called from the
    writer threads as tensor bytes are written (about every MiB, and at each file's end).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        step: int,
        thread_count: int = 1,
        sync_files: bool = True,
        direct_io: bool = True,
        on_bytes: Callable[[int], None] = _ignore,
    ) -> None:
        super().__init__(
            path, single_file_per_rank=True, sync_files=sync_files, thread_count=thread_count
        )
        self.step = step
        self.direct_io = direct_io
        self.on_bytes = on_bytes

    def _write_data(
        self, planner: SavePlanner, file_queue: queue.Queue[Any]
    ) -> Future[list[WriteResult]]:
        files: list[tuple[Any, str, list[Any]]] = []
        while not file_queue.empty():
            files.append(file_queue.get_nowait())
        n = max(1, min(self.thread_count, len(files)))
        results: list[list[WriteResult]] = [[] for _ in files]
        errors: list[BaseException] = []
        lock = threading.Lock()
        failed = threading.Event()

        def work(first: int) -> None:
            # torch.save's zip CRC-32 of every record was a quarter of the daemon's CPU
            # per byte; each file's xxh3_64 (hashed as written) is the integrity check
            # instead, and torch.load does not read the CRC. The setting is per thread from
            # torch 2.13 and process-wide before it: harmless, the daemon's torch.save
            # calls are all its writers'.
            try:
                torch.serialization.set_crc32_options(False)
                for k in range(first, len(files), n):
                    if failed.is_set():
                        return
                    path, name, items = files[k]
                    results[k] = self._write_file(planner, path, name, items, failed)
            except BaseException as exc:  # kept and re-raised by the caller
                with lock:
                    errors.append(exc)
                failed.set()

        threads = [
            threading.Thread(target=work, args=(i,), name=f"aiodcp-write-{i}", daemon=True)
            for i in range(n)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        fut: Future[list[WriteResult]] = Future()
        fut.set_result([wr for rs in results for wr in rs])
        return fut

    def _write_file(
        self,
        planner: SavePlanner,
        path: Any,
        name: str,
        items: list[Any],
        failed: threading.Event,
    ) -> list[WriteResult]:
        out: list[WriteResult] = []
        # DCP's order: byte items first, then tensors
        ordered = [wi for wi in items if wi.type == WriteItemType.BYTE_IO] + [
            wi for wi in items if wi.type != WriteItemType.BYTE_IO
        ]
        stream: _HashingStream | None = None
        try:
            with _direct.DirectFile(path, direct=self.direct_io) as raw:
                stream = _HashingStream(raw, self.on_bytes)
                for item in ordered:
                    if failed.is_set():
                        return out  # another thread failed: the save fails anyway
                    out.append(self._write_item(planner, stream, item, name))
                stream.report()
                raw.finish()
                if self.sync_files:
                    os.fsync(raw.fileno())
        except Exception as exc:
            cause = stream.error if stream is not None and stream.error is not None else exc
            if not isinstance(cause, OSError):
                raise
            if cause.filename is None:
                cause.filename = str(path)  # "[Errno 27] File too large: '.../__0_1.distcp'"
            if cause is exc:
                raise
            raise cause from None
        digest = FileDigest(name, stream.pos, stream.hash.hexdigest())
        out.append(WriteResult(MetadataIndex(_DIGEST_FQN + name), 0, digest))
        return out

    def _write_item(
        self, planner: SavePlanner, stream: _HashingStream, item: Any, name: str
    ) -> WriteResult:
        offset = stream.tell()
        data = planner.resolve_data(item)
        if item.type == WriteItemType.BYTE_IO:
            assert isinstance(data, io.BytesIO)
            stream.write(data.getbuffer())
        else:
            assert isinstance(data, torch.Tensor)
            tensor = data.detach().cpu()
            if tensor.untyped_storage().size() != tensor.nbytes:
                tensor = tensor.clone()  # torch.save would write the whole storage
            stream.count = tensor.nbytes
            _records.write_tensor(tensor, stream)  # torch.save's bytes, at a fraction of its cost
            stream.report_if_due()
        length = stream.tell() - offset
        return WriteResult(item.index, length, _StorageInfo(name, offset, length))

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        digests: dict[str, tuple[int, str]] = {}
        kept: list[list[WriteResult]] = []
        for rank_results in results:
            kept.append([])
            for wr in rank_results:
                if isinstance(wr.storage_data, FileDigest):
                    d = wr.storage_data
                    digests[d.name] = (d.size, d.xxh3_64)
                else:
                    kept[-1].append(wr)
        super().finish(metadata, kept)
        path = Path(self.path)
        digests[_manifest.METADATA] = _manifest.file_digest(path / _manifest.METADATA)
        _manifest.write_manifest(path, self.step, digests)
