"""The upload half of an ``s3://`` save: one rank's files, under their final keys.

A file below ``multipart_threshold`` is one PUT; a bigger one a multipart upload whose
parts go out at most ``max_concurrency`` at a time (from a queue shared by all files).
The last part to finish completes its upload; any failure, a stop (``should_stop``
raising: a cancel, a dying daemon) or a stall aborts every multipart upload this rank
opened -- a part still in flight aborts, never completes, its upload. A watchdog fails
the upload when a file shows no sign of life for ``upload_stall_timeout`` seconds,
naming the rank and the object; ``progress(stored, total)`` reports bytes stored, part
by part. Part of :class:`aiodcp._disk._store_s3.S3Store` (a mixin).
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._errors import CheckpointError
from . import _storage

__all__ = ["FileUpload", "UploadStalledError", "Uploading", "run_bounded"]


class UploadStalledError(CheckpointError):
    """An upload made no progress for ``upload_stall_timeout`` seconds."""


class _Counting(io.BytesIO):
    """A part's body that tells the watchdog of each read (botocore reads it as it
    sends -- and before, to checksum it: reads are signs of life, not bytes sent)."""

    def __init__(self, data: bytes, touch: Callable[[], None]) -> None:
        super().__init__(data)
        self._touch = touch

    def read(self, size: int | None = -1) -> bytes:
        out = super().read(size)
        self._touch()
        return out


class FileUpload:
    """One file's upload: bytes of its finished parts, and its last sign of life (for
    the watchdog)."""

    def __init__(self, key: str, size: int) -> None:
        self.key = key
        self.size = size
        self.sent = 0
        self.last = time.monotonic()
        self.done = False
        self._lock = threading.Lock()

    def touch(self) -> None:
        self.last = time.monotonic()

    def finished(self, n: int) -> None:
        """A part (or the whole file) of ``n`` bytes is stored."""
        with self._lock:
            self.sent += n
        self.last = time.monotonic()


class Uploading:
    """The uploader of :class:`aiodcp._disk._store_s3.S3Store` (see the module docstring)."""

    bucket: str
    options: Any
    client: Any

    def url(self, key: str) -> str:
        raise NotImplementedError

    def _upload_all(
        self,
        tmp: Path,
        uploads: list[FileUpload],
        rank: int,
        should_stop: Callable[[], None] | None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        o = self.options
        tasks: queue.Queue[Callable[[], None] | None] = queue.Queue()
        errors: list[tuple[FileUpload, BaseException]] = []
        failed = threading.Event()
        remaining = [len(uploads)]
        lock = threading.Lock()
        finished = threading.Event()
        if not uploads:
            return

        def file_done(up: FileUpload) -> None:
            up.done = True
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    finished.set()

        def fail(up: FileUpload, exc: BaseException) -> None:
            errors.append((up, exc))
            failed.set()
            finished.set()

        aborts: list[Callable[[], None]] = []
        for up in uploads:
            path = tmp / up.key.rsplit("/", 1)[1]
            if up.size < o.multipart_threshold:
                tasks.put(self._put_task(path, up, file_done, fail, failed))
            else:
                aborts.append(self._multipart(path, up, tasks, file_done, fail, failed))
        try:
            self._wait_uploads(uploads, tasks, rank, should_stop, progress, failed, finished)
        except BaseException:
            # stopped, stalled or cancelled: no multipart upload is left open (a part
            # still in flight aborts its upload when it returns, never completes it)
            failed.set()
            for abort in aborts:
                abort()
            raise
        if errors:
            for abort in aborts:
                abort()
            up, exc = errors[0]
            raise CheckpointError(
                f"rank {rank}: upload of {self.url(up.key)} failed: {type(exc).__name__}: {exc}"
            ) from exc
        if progress is not None:
            total = sum(up.size for up in uploads)
            progress(total, total)

    def _wait_uploads(
        self,
        uploads: list[FileUpload],
        tasks: queue.Queue[Callable[[], None] | None],
        rank: int,
        should_stop: Callable[[], None] | None,
        progress: Callable[[int, int], None] | None,
        failed: threading.Event,
        finished: threading.Event,
    ) -> None:
        o = self.options

        def worker() -> None:
            while not failed.is_set():
                try:
                    task = tasks.get_nowait()
                except queue.Empty:
                    if finished.is_set():
                        return
                    time.sleep(0.005)
                    continue
                if task is not None:
                    task()

        # daemon threads: a stuck request never keeps the daemon from exiting
        for i in range(max(1, o.max_concurrency)):
            threading.Thread(target=worker, name=f"aiodcp-upload-{i}", daemon=True).start()
        total = sum(up.size for up in uploads)
        while not finished.wait(0.05):
            if should_stop is not None:
                should_stop()
            if progress is not None:
                progress(sum(up.sent for up in uploads), total)
            now = time.monotonic()
            for up in uploads:
                if not up.done and now - up.last > o.upload_stall_timeout:
                    raise UploadStalledError(
                        f"rank {rank}: upload of {self.url(up.key)} made no progress for "
                        f"{now - up.last:.1f} s ({up.sent} of {up.size} bytes stored; "
                        f"upload_stall_timeout={o.upload_stall_timeout})"
                    )

    def _put_task(
        self,
        path: Path,
        up: FileUpload,
        done: Callable[[FileUpload], None],
        fail: Callable[[FileUpload, BaseException], None],
        failed: threading.Event,
    ) -> Callable[[], None]:
        def run() -> None:
            try:
                data = path.read_bytes()
                up.last = time.monotonic()
                self.client.put_object(
                    Bucket=self.bucket, Key=up.key, Body=_Counting(data, up.touch)
                )
                up.finished(len(data))
                done(up)
            except BaseException as exc:
                fail(up, exc)

        return run

    def _multipart(
        self,
        path: Path,
        up: FileUpload,
        tasks: queue.Queue[Callable[[], None] | None],
        done: Callable[[FileUpload], None],
        fail: Callable[[FileUpload, BaseException], None],
        failed: threading.Event,
    ) -> Callable[[], None]:
        """Queue one file's parts; the last part to finish completes the upload, and any
        failure aborts it (nothing is left behind but what the sweep aborts). Returns
        the abort (idempotent; a no-op once completed)."""
        # S3: parts of at least 5 MiB, at most 10,000 of them (bigger files, bigger parts)
        chunk = max(5 << 20, self.options.multipart_chunksize, -(-up.size // 10_000))
        nparts = max(1, -(-up.size // chunk))
        state: dict[str, Any] = {"id": None, "parts": {}, "left": nparts, "over": False}
        lock = threading.Lock()

        def abort() -> None:
            with lock:
                if state["over"]:
                    return
                state["over"] = True
            if state["id"] is not None:
                with contextlib.suppress(Exception):
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=up.key, UploadId=state["id"]
                    )

        def start() -> None:
            with lock:
                if state["over"]:
                    raise CheckpointError(f"upload of {self.url(up.key)} was aborted")
                if state["id"] is None:
                    resp = self.client.create_multipart_upload(Bucket=self.bucket, Key=up.key)
                    state["id"] = resp["UploadId"]

        def part(number: int) -> Callable[[], None]:
            def run() -> None:
                try:
                    if failed.is_set():
                        abort()
                        return
                    start()
                    with open(path, "rb") as f:
                        f.seek((number - 1) * chunk)
                        data = f.read(chunk)
                    up.last = time.monotonic()
                    resp = self.client.upload_part(
                        Bucket=self.bucket,
                        Key=up.key,
                        UploadId=state["id"],
                        PartNumber=number,
                        Body=_Counting(data, up.touch),
                    )
                    up.finished(len(data))
                    _storage._fault_point("mid_upload")
                    if failed.is_set():
                        abort()
                        return
                    with lock:
                        state["parts"][number] = resp["ETag"]
                        state["left"] -= 1
                        last = state["left"] == 0
                    if last:
                        parts = [
                            {"PartNumber": n, "ETag": e} for n, e in sorted(state["parts"].items())
                        ]
                        self.client.complete_multipart_upload(
                            Bucket=self.bucket,
                            Key=up.key,
                            UploadId=state["id"],
                            MultipartUpload={"Parts": parts},
                        )
                        with lock:
                            state["over"] = True
                        up.touch()
                        done(up)
                except BaseException as exc:
                    abort()
                    fail(up, exc)

            return run

        for n in range(1, nparts + 1):
            tasks.put(part(n))
        return abort


def run_bounded(tasks: list[Callable[[], None]], concurrency: int) -> None:
    """Run ``tasks`` in at most ``concurrency`` daemon threads; wait for all."""
    pending = list(reversed(tasks))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                task = pending.pop()
            task()

    n = max(1, min(concurrency, len(tasks)))
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
