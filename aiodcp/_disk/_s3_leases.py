"""Leases on an ``s3://`` root: the writer's lock and readers' holds, as renewed objects.

An object store has no ``flock``, and nothing that dies with its holder. Both kinds of
lease here are small objects whose ``LastModified`` their holder's thread renews every
``lease_ttl / 3`` seconds; a holder that dies stops renewing, and its lease lapses
``lease_ttl`` seconds after the last renewal, judged by the *server's* clock (its
``Date`` header against ``LastModified``), never by the local one.

:class:`WriterLock` (``prefix/.writer``): one live writer per root. It is created with
``If-None-Match: *`` (create-only: of two writers opening at once, exactly one wins),
renewed and deleted with ``If-Match: <its ETag>`` (compare-and-swap), so a holder whose
lock lapsed and was taken over learns it at its next renewal instead of overwriting the
new holder's. A lapsed lock -- or one whose holder was a process of this host (and pid
namespace) that no longer runs -- is taken over by the same compare-and-swap.

:class:`Lease` (``prefix/.holds/step_N.<id>``): a reader's hold on a step, which
retention spares (see :meth:`aiodcp._disk._store_s3.S3Store.apply_retention`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import botocore.exceptions

from .._errors import CheckpointError

__all__ = ["LOCK", "Lease", "WriterLock", "server_now"]

# ``store`` below is an :class:`aiodcp._disk._store_s3.S3Store` (not imported: that
# module imports this one): its ``client``, ``bucket``, ``prefix``, ``options``, ``url``
# and ``_call``.

log = logging.getLogger("aiodcp")

LOCK = ".writer"


def server_now(resp: Mapping[str, Any]) -> datetime:
    """The server's clock, from a response's ``Date`` header (the local one without it)."""
    date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        return parsedate_to_datetime(date) if date else datetime.now(UTC)
    except (TypeError, ValueError):
        return datetime.now(UTC)


def _conflict(exc: BaseException) -> bool:
    """A conditional request lost: the object exists (create-only), or is not the one we
    named (compare-and-swap: changed, or gone)."""
    if not isinstance(exc, botocore.exceptions.ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return status in (404, 409, 412) or code in (
        "PreconditionFailed",
        "ConditionalRequestConflict",
        "NoSuchKey",
    )


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _gone_here(info: Mapping[str, Any]) -> bool:
    """Whether the lock's holder was a process of this host and pid namespace that no
    longer runs (then its lock need not lapse first)."""
    if info.get("host") != socket.gethostname() or info.get("pidns") != _pid_namespace():
        return False
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it runs (as another user)
        return False
    return False


def _who(info: Mapping[str, Any]) -> str:
    pid, host = info.get("pid"), info.get("host")
    if pid == os.getpid() and host == socket.gethostname():
        return f"this process, pid {pid}"
    return f"pid {pid} on {host}" if host else "unknown holder"


class WriterLock:
    """The writer's lock of an ``s3://`` root (see the module docstring)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.key = f"{store.prefix}{LOCK}"
        self.id = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost: str | None = None
        """Why this process no longer holds the lock (its renewal found another holder)."""
        self._renewals = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        self._renewals += 1  # every body differs, so every ETag does
        info = {
            "format": "aiodcp-writer",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pidns": _pid_namespace(),
            "id": self.id,
            "renewal": self._renewals,
        }
        return json.dumps(info).encode()

    def _put(self, **condition: str) -> str:
        s = self.store
        resp = s._call(
            s.client.put_object, Bucket=s.bucket, Key=self.key, Body=self._body(), **condition
        )
        return str(resp["ETag"])

    def _read(self) -> tuple[str, dict[str, Any], float] | None:
        """The lock as it is: its ETag, its holder's description and its age in seconds
        by the server's clock; None if there is none."""
        s = self.store
        try:
            resp = s._call(s.client.get_object, Bucket=s.bucket, Key=self.key)
        except botocore.exceptions.ClientError as exc:
            if _conflict(exc):
                return None
            raise
        try:
            info = json.loads(resp["Body"].read())
            info = info if isinstance(info, dict) else {}
        except ValueError:
            info = {}
        age = (server_now(resp) - resp["LastModified"]).total_seconds()
        return str(resp["ETag"]), info, age

    def acquire(self) -> None:
        """Take the lock, or raise ``CheckpointError`` naming its live holder."""
        ttl = self.store.options.lease_ttl
        for _ in range(5):
            try:
                self.etag = self._put(IfNoneMatch="*")
                break
            except botocore.exceptions.ClientError as exc:
                if not _conflict(exc):
                    raise
            held = self._read()
            if held is None:
                continue  # released meanwhile: create it again
            etag, info, age = held
            gone = _gone_here(info)
            if age <= ttl and not gone:
                raise CheckpointError(
                    f"{self.store} is in use by another live AsyncCheckpointer ({_who(info)}, "
                    f"its lock {self.store.url(self.key)} renewed {max(age, 0):.0f} s ago); "
                    "close that one first (or give this one another root). A writer that "
                    f"died without closing releases it {ttl:g} s after its last renewal "
                    "(lease_ttl)"
                )
            try:
                self.etag = self._put(IfMatch=etag)
            except botocore.exceptions.ClientError as exc:
                if not _conflict(exc):
                    raise
                continue  # another writer took it over first: look again
            why = "no longer runs" if gone else f"lock not renewed for {age:.0f} s"
            log.warning("took over the writer lock of %s from %s (%s)", self.store, _who(info), why)
            break
        else:
            raise CheckpointError(f"{self.store}: could not take the writer lock (contended)")
        self._thread = threading.Thread(target=self._renew, name="aiodcp-writer-lock", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.store.options.lease_ttl / 3):
            try:
                assert self.etag is not None
                self.etag = self._put(IfMatch=self.etag)
            except Exception as exc:
                if not _conflict(exc):
                    continue  # a network error: the next renewal tries again
                try:
                    held = self._read()
                    who = _who(held[1]) if held else "nobody (it was deleted)"
                except Exception:
                    who = "another writer"
                self.lost = (
                    f"this AsyncCheckpointer lost the writer lock of {self.store}: it was not "
                    f"renewed within lease_ttl and is now held by {who}; open a new one"
                )
                log.error("%s", self.lost)
                return

    def release(self) -> None:
        """Stop renewing and delete the lock, if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.etag is None or self.lost is not None:
            return
        s = self.store
        try:
            s.client.delete_object(Bucket=s.bucket, Key=self.key, IfMatch=self.etag)
        except botocore.exceptions.ClientError as exc:
            if not _conflict(exc):  # a store without conditional deletes: look, then delete
                with contextlib.suppress(Exception):
                    held = self._read()
                    if held is not None and held[1].get("id") == self.id:
                        s.client.delete_object(Bucket=s.bucket, Key=self.key)
        except Exception as exc:
            log.warning("could not delete the writer lock of %s: %s", s, exc)
        self.etag = None


class Lease:
    """A reader's lease object, renewed every ``lease_ttl / 3`` until released."""

    def __init__(self, store: Any, key: str) -> None:
        self.store = store
        self.key = key
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def put(self) -> None:
        self.store._call(
            self.store.client.put_object, Bucket=self.store.bucket, Key=self.key, Body=b""
        )

    def start(self) -> None:
        def renew() -> None:
            while not self._stop.wait(self.store.options.lease_ttl / 3):
                with contextlib.suppress(Exception):
                    self.put()

        self._thread = threading.Thread(target=renew, name="aiodcp-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self.store.client.delete_object(Bucket=self.store.bucket, Key=self.key)
