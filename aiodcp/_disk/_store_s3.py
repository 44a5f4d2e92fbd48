"""Checkpoints in an S3-compatible object store: ``s3://bucket/prefix``.

Layout (the same DCP step directories as on a filesystem, under their final keys)::

    prefix/step_100/.metadata, __0_0.distcp, ...   data: written once, never renamed
    prefix/step_100/.aiodcp-manifest.json          size + xxh3_64 of every file
    prefix/.commits/step_100                       the commit marker: created with
                                                   If-None-Match: * after all of the above
    prefix/.pending/step_200                       a save in progress (its intent)
    prefix/.holds/step_100.<id>                    a reader's lease, renewed while held

A step is committed iff its marker exists: ``steps``, ``latest``, ``watch``, loading and
retention look at the markers only. The commit (see the README, "Object storage"):
rank 0 writes the intent; every rank writes its DCP files into a local spool exactly as
for a local root (same writer, hashing, checks), the ranks vote, then every rank uploads
*its own* files (multipart with bounded concurrency above ``multipart_threshold``;
every multipart upload completed or aborted; a per-upload progress watchdog); the ranks
agree that every upload succeeded; rank 0 checks the objects against ``.metadata`` and
the manifest (sizes), puts the manifest, then the marker (create-only). Leftovers of an
interrupted save (objects of a step with an intent and no marker, multipart uploads
under an uncommitted step) are swept by the next writer at open, and after a failed save.
One writer per prefix: rank 0 holds the ``.writer`` lock object while open. The uploader
lives in :mod:`aiodcp._disk._s3_upload`, the writer's lock and readers' leases in
:mod:`aiodcp._disk._s3_leases`.

The client is boto3 (botocore), created lazily in the process that uses it (so the
daemon creates its own after spawn): its full S3 API (conditional puts,
ListMultipartUploads/Abort, ranged GETs), its ``standard`` retry mode (exponential
backoff with jitter on throttling, 5xx, connection errors and timeouts), credentials
and endpoint from the standard chain (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
profiles, instance roles). Credentials are never passed through aiodcp: not in
``storage_options``, not on the daemon's command line, not in logs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import botocore.exceptions  # ~0.1 s; boto3 itself (~1 s) is imported with the first client

from .._errors import CheckpointError, CheckpointExistsError, CheckpointNotFoundError
from . import _manifest, _storage
from ._s3_leases import Lease, WriterLock, server_now
from ._s3_upload import FileUpload, Uploading, UploadStalledError, run_bounded
from ._safe import safe_relative
from ._store import Store

__all__ = ["S3Options", "S3Store", "UploadStalledError"]

log = logging.getLogger("aiodcp")

COMMITS = ".commits"
PENDING = ".pending"
HOLDS = ".holds"
_MARKER_RE = re.compile(r"^step_(0|[1-9][0-9]{0,17})$", re.ASCII)
_HOLD_RE = re.compile(r"^step_(0|[1-9][0-9]{0,17})\.[0-9a-f]{32}$", re.ASCII)
_STEP_KEY_RE = re.compile(r"^step_(0|[1-9][0-9]{0,17})/", re.ASCII)
_BUCKET_RE = re.compile(r"[A-Za-z0-9._-]{1,255}")  # botocore's own check (legacy names too)
_SECRETISH = ("secret", "key_id", "token", "password", "credential")


class AccessRefusedError(CheckpointError):
    """The store refused a request (credentials, or their permissions)."""


@dataclass(frozen=True)
class S3Options:
    """``storage_options`` of an ``s3://`` root (credentials come from the environment)."""

    endpoint_url: str | None = None
    """Default: ``AWS_ENDPOINT_URL(_S3)`` or AWS itself."""
    region_name: str | None = None
    max_attempts: int = 8
    """Attempts per request (botocore's ``standard`` retry mode: backoff with jitter)."""
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    multipart_threshold: int = 64 << 20
    multipart_chunksize: int = 32 << 20
    max_concurrency: int = 8
    """Part (or small-file) uploads in flight per rank."""
    upload_stall_timeout: float = 300.0
    """Seconds an upload may make no progress before the save fails."""
    lease_ttl: float = 60.0
    """A reader's lease lapses this long after its holder stops renewing it."""
    spool_dir: str | None = None
    """Local directory of the daemons' spools (default: the system temp directory)."""

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> S3Options:
        known = {f.name for f in fields(cls)}
        for key in options or {}:
            if any(word in key.lower() for word in _SECRETISH):
                raise ValueError(
                    f"storage_options[{key!r}]: aiodcp takes no credentials; use the standard "
                    "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...)"
                )
            if key not in known:
                raise ValueError(
                    f"unknown storage option {key!r} for an s3:// root; known: {sorted(known)}"
                )
        return cls(**dict(options or {}))

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _code(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def _status(exc: BaseException) -> int:
    if isinstance(exc, botocore.exceptions.ClientError):
        return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return 0


class S3Store(Uploading, Store):
    remote = True
    options: S3Options

    def __init__(self, bucket: str, prefix: str, options: S3Options) -> None:
        self.bucket = bucket
        self.prefix = prefix  # "" or "a/b/" (always ends with a slash)
        self.options = options
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._lock: WriterLock | None = None

    @classmethod
    def from_url(cls, url: str, storage_options: Mapping[str, Any] | None) -> S3Store:
        m = re.fullmatch(r"[sS]3://([^/]*)(?:/(.*))?", url, re.DOTALL)
        if not m or not m.group(1):
            raise ValueError(f"checkpoint root {url!r}: expected s3://bucket/prefix")
        bucket, prefix = m.group(1), (m.group(2) or "").strip("/")
        if "@" in bucket:  # s3://KEY:SECRET@bucket: never echoed, never used
            raise ValueError(
                f"checkpoint root s3://...@{bucket.rpartition('@')[2]}/{prefix}: credentials "
                "in the URL are not supported; use the standard environment "
                "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...)"
            )
        if not _BUCKET_RE.fullmatch(bucket):
            raise ValueError(
                f"checkpoint root {url!r}: {bucket!r} is not a bucket name (letters, digits, "
                "'.', '-', '_'; at most 255)"
            )
        if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
            raise ValueError(f"checkpoint root {url!r}: empty, '.' or '..' in the prefix")
        if re.search(r"[\x00-\x1f\x7f?#]", prefix):
            raise ValueError(
                f"checkpoint root {url!r}: control characters, '?' and '#' are not supported "
                "in the prefix (a query or fragment is not part of an s3:// root)"
            )
        return cls(bucket, prefix + "/" if prefix else "", S3Options.parse(storage_options))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def __repr__(self) -> str:
        return f"S3Store({str(self)!r})"

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    # ------------------------------------------------------------------ client
    @property
    def client(self) -> Any:
        """The boto3 client, created on first use in this process (never inherited), after
        a quick look at the bucket (:meth:`_probe`)."""
        with self._client_lock:
            if self._client is None:
                import boto3

                o = self.options
                session = boto3.session.Session()
                self._probe(session)
                self._client = session.client(
                    "s3",
                    endpoint_url=o.endpoint_url,
                    region_name=o.region_name,
                    config=self._config(
                        o.max_attempts, o.connect_timeout, o.read_timeout, o.max_concurrency
                    ),
                )
            return self._client

    def close(self) -> None:
        """Close the client's connections now, not whenever the garbage collector runs
        (the store makes a new client if used again)."""
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    @staticmethod
    def _config(attempts: int, connect: float, read: float, concurrency: int) -> Any:
        import botocore.config

        return botocore.config.Config(
            retries={"mode": "standard", "max_attempts": attempts},
            connect_timeout=connect,
            read_timeout=read,
            max_pool_connections=max(10, concurrency * 2),
        )

    def _probe(self, session: Any) -> None:
        """``HEAD`` the bucket with few retries and short timeouts: an unreachable endpoint,
        missing credentials or bucket, or refused access is one clear ``CheckpointError``
        within seconds (the client proper retries each request ``max_attempts`` times)."""
        o = self.options
        quick = session.client(
            "s3",
            endpoint_url=o.endpoint_url,
            region_name=o.region_name,
            config=self._config(2, min(o.connect_timeout, 5.0), min(o.read_timeout, 10.0), 1),
        )
        try:
            self._call(quick.head_bucket, Bucket=self.bucket)
        except botocore.exceptions.ClientError as exc:
            if _status(exc) == 404:
                raise CheckpointError(f"{self}: bucket {self.bucket!r} does not exist") from None
            if _status(exc) == 403:
                raise CheckpointError(
                    f"{self}: access refused (403): check the S3 credentials and their "
                    "permissions on this bucket"
                ) from None
            raise
        finally:
            quick.close()

    def _keys(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Every object under ``prefix`` (``Key``, ``Size``, ``LastModified``)."""
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            resp = self._call(self.client.list_objects_v2, **kw)
            yield from resp.get("Contents", [])
            if not resp.get("IsTruncated"):
                return
            token = resp.get("NextContinuationToken")

    def _call(self, fn: Callable[..., Any], **kw: Any) -> Any:
        """A request; a missing bucket or refused credentials as a ``CheckpointError``."""
        try:
            return fn(**kw)
        except botocore.exceptions.NoCredentialsError:
            raise CheckpointError(
                f"{self}: no S3 credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "or a profile)"
            ) from None
        except (
            botocore.exceptions.EndpointConnectionError,
            botocore.exceptions.ConnectTimeoutError,
            botocore.exceptions.ReadTimeoutError,
            botocore.exceptions.ConnectionClosedError,
        ) as exc:
            raise CheckpointError(
                f"{self}: cannot reach the S3 endpoint ({exc}); check endpoint_url or "
                "AWS_ENDPOINT_URL, and the network"
            ) from None
        except botocore.exceptions.ClientError as exc:
            code = _code(exc)
            if code == "NoSuchBucket":
                raise CheckpointError(f"{self}: bucket {self.bucket!r} does not exist") from None
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
                raise AccessRefusedError(
                    f"{self}: access refused ({code}): check the S3 credentials and their "
                    "permissions on this bucket"
                ) from None
            raise

    def _marker(self, step: int) -> str:
        return f"{self.prefix}{COMMITS}/step_{step}"

    def _step_prefix(self, step: int) -> str:
        return f"{self.prefix}step_{step}/"

    # ----------------------------------------------------------------- reading
    def list_steps(self) -> list[int]:
        steps = []
        base = f"{self.prefix}{COMMITS}/"
        for obj in self._keys(base):
            m = _MARKER_RE.match(obj["Key"][len(base) :])
            if m:
                steps.append(int(m.group(1)))
        return sorted(steps)

    def is_committed(self, step: int) -> bool:
        try:
            self._call(self.client.head_object, Bucket=self.bucket, Key=self._marker(step))
            return True
        except botocore.exceptions.ClientError as exc:
            if _status(exc) == 404 or _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def exists(self, step: int, *, quick: bool = False) -> bool:
        if self.is_committed(step):
            return True
        if quick:  # one round trip in the caller's copy thread; the daemon checks it all
            return False
        resp = self._call(
            self.client.list_objects_v2,
            Bucket=self.bucket,
            Prefix=self._step_prefix(step),
            MaxKeys=1,
        )
        return bool(resp.get("KeyCount", 0))

    def highest_taken_step(self) -> int:
        """The highest committed step or step prefix with objects (``step=None`` goes above)."""
        taken = self.list_steps()
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix, "Delimiter": "/"}
        while True:
            resp = self._call(self.client.list_objects_v2, **kw)
            for common in resp.get("CommonPrefixes", []):
                m = _STEP_KEY_RE.match(common["Prefix"][len(self.prefix) :])
                if m:
                    taken.append(int(m.group(1)))
            if not resp.get("IsTruncated"):
                return max(taken, default=-1)
            kw["ContinuationToken"] = resp.get("NextContinuationToken")

    def daemon_options(self) -> dict[str, Any]:
        return self.options.to_json()

    def step_path(self, step: int) -> str:
        return self.url(self._step_prefix(step).rstrip("/"))

    def step_sizes(self, step: int) -> dict[str, int]:
        base = self._step_prefix(step)
        return {o["Key"][len(base) :]: int(o["Size"]) for o in self._keys(base)}

    def get_bytes(self, key: str) -> bytes:
        resp = self._call(self.client.get_object, Bucket=self.bucket, Key=key)
        data: bytes = resp["Body"].read()
        return data

    def download_step(self, step: int, dest: Path, *, names: list[str] | None = None) -> Path:
        """Copy a committed step's files into ``dest/step_<step>`` (the files its manifest
        names, or ``names``); returns that directory, ready for the local, safe reader.

        Raises:
            CheckpointNotFoundError: the step is not committed.
        """
        if not self.is_committed(step):
            raise CheckpointNotFoundError(f"step {step} is not committed in {self}")
        target = dest / f"step_{step}"
        target.mkdir(parents=True, exist_ok=True)
        base = self._step_prefix(step)
        if names is None:
            names = sorted(self.step_sizes(step))
        errors: list[BaseException] = []

        def fetch(name: str) -> None:
            if not safe_relative(name) or "/" in name:
                return  # never written outside the step (nor into a subdirectory)
            try:
                resp = self._call(self.client.get_object, Bucket=self.bucket, Key=base + name)
                with open(target / name, "wb") as f:
                    shutil.copyfileobj(resp["Body"], f, 8 << 20)
            except BaseException as exc:
                errors.append(exc)

        run_bounded([functools.partial(fetch, n) for n in names], self.options.max_concurrency)
        if errors:
            raise errors[0]
        return target

    # ----------------------------------------------------------------- writing
    def open_writer(self, rank: int) -> None:
        # an unreachable endpoint, a missing bucket or refused credentials fail here, at
        # open (the client's probe), not at the first save
        _ = self.client
        if rank == 0:
            self.lock_writer()
            try:
                swept = self.cleanup_leftovers()
            except BaseException:
                self.close_writer()
                raise
            if swept:
                log.info("removed leftovers of interrupted saves in %s: %s", self, swept)

    def lock_writer(self) -> None:
        """Take the root's writer lock (``CheckpointError`` naming a live holder)."""
        lock = WriterLock(self)
        lock.acquire()
        self._lock = lock

    def writer_lost(self) -> str | None:
        return self._lock.lost if self._lock is not None else None

    def close_writer(self) -> None:
        if self._lock is not None and self._lock.lost is None:
            with contextlib.suppress(Exception):
                self.cleanup_leftovers()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def cleanup_leftovers(self) -> list[Any]:
        """Abort multipart uploads under uncommitted steps; delete the objects of steps
        with an intent and no marker. Call it with no save in flight (one writer)."""
        committed = set(self.list_steps())
        removed: list[Any] = []
        pending_base = f"{self.prefix}{PENDING}/"
        pending = []
        for obj in self._keys(pending_base):
            m = _MARKER_RE.match(obj["Key"][len(pending_base) :])
            if m:
                pending.append((int(m.group(1)), obj["Key"]))
        removed += self._abort_uploads(lambda s: s not in committed)
        spool = self.spool_root
        if spool.is_dir():  # this host's spools of killed daemons: never a live one's
            for entry in spool.iterdir():
                if self._dead_spool(entry.name):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(str(entry))
        for step, key in pending:
            if step not in committed:
                removed += self._delete_prefix(self._step_prefix(step))
            self._call(self.client.delete_object, Bucket=self.bucket, Key=key)
            removed.append(self.url(key))
        return removed

    def _abort_uploads(self, doomed: Callable[[int], bool]) -> list[str]:
        aborted = []
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix}
        while True:
            resp = self._call(self.client.list_multipart_uploads, **kw)
            for up in resp.get("Uploads", []):
                m = _STEP_KEY_RE.match(up["Key"][len(self.prefix) :])
                if m and doomed(int(m.group(1))):
                    with contextlib.suppress(botocore.exceptions.ClientError):
                        self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
                        )
                    aborted.append(f"upload {self.url(up['Key'])}")
            if not resp.get("IsTruncated"):
                return aborted
            kw["KeyMarker"] = resp.get("NextKeyMarker")
            kw["UploadIdMarker"] = resp.get("NextUploadIdMarker")

    def _delete_prefix(self, prefix: str) -> list[str]:
        keys = [o["Key"] for o in self._keys(prefix)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self._call(
                self.client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": batch, "Quiet": True},
            )
        return [self.url(k) for k in keys]

    @property
    def spool_root(self) -> Path:
        base = Path(self.options.spool_dir or tempfile.gettempdir())
        return base / f"aiodcp-spool-{os.getuid()}"

    def tmp_dir(self, step: int, token: str) -> Path:
        """A daemon's spool of one step, named after the daemon (its pid): another
        process's sweep -- a writer of the same bucket and prefix through another
        endpoint, a test beside this one -- removes it only once that pid is gone."""
        base = self.spool_root
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = f"{self._spool_name()}.{os.getpid()}{_storage.TMP_PREFIX}step_{step}-{token}"
        return base / name

    def _dead_spool(self, name: str) -> bool:
        """``name`` is a spool of this bucket and prefix whose daemon is gone."""
        own = re.escape(self._spool_name())
        tmp = re.escape(_storage.TMP_PREFIX)
        m = re.fullmatch(rf"{own}(?:\.(\d+))?{tmp}step_\d+-[0-9a-f]+", name)
        if m is None:
            return False
        return m.group(1) is None or not _pid_alive(int(m.group(1)))

    def _spool_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{self.bucket}_{self.prefix}")

    def begin(self, step: int) -> None:
        """Rank 0, before any rank uploads: record the save's intent (what the sweep reads)."""
        self._call(
            self.client.put_object,
            Bucket=self.bucket,
            Key=f"{self.prefix}{PENDING}/step_{step}",
            Body=b"",
        )

    def abandon(self, step: int) -> None:
        """After a failed save: abort its uploads and delete its objects (never a committed
        step's)."""
        if self.is_committed(step):
            return
        self._abort_uploads(lambda s: s == step)
        # the intent stays: a rank still uploading is swept by the next writer's open
        self._delete_prefix(self._step_prefix(step))

    def upload(
        self,
        tmp: Path,
        step: int,
        rank: int,
        should_stop: Callable[[], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Upload the files this rank wrote (rank 0: also ``.metadata``; never the manifest,
        which rank 0 writes at the commit) under their final keys."""
        names = sorted(
            n
            for n in os.listdir(tmp)
            if re.fullmatch(rf"__{rank}_[0-9]+\.distcp", n)
            or (rank == 0 and n == _manifest.METADATA)
        )
        uploads = [FileUpload(self._step_prefix(step) + n, os.path.getsize(tmp / n)) for n in names]
        self._upload_all(tmp, uploads, rank, should_stop, progress)

    def commit(self, tmp: Path, step: int, *, overwrite: bool) -> None:
        """Rank 0, once every rank's upload succeeded: check the objects, put the manifest,
        then the marker (create-only: the commit point)."""
        if overwrite:
            raise CheckpointError("overwrite=True is not supported on object-store roots")
        manifest = _manifest.read_manifest(tmp, step=step)
        if manifest is None:
            raise CheckpointError(f"refusing to commit step {step}: the writer left no manifest")
        metadata = _manifest._load_metadata(tmp, step)
        needed = _manifest._needed_bytes(metadata, step)
        sizes = self.step_sizes(step)
        for name, (size, _) in sorted(manifest.items()):
            if sizes.get(name) != size:
                have = "missing" if name not in sizes else f"{sizes[name]} bytes"
                raise CheckpointError(
                    f"refusing to commit step {step}: {self.url(self._step_prefix(step) + name)} "
                    f"is {have}, committed {size} bytes"
                )
        for name, size in sorted(needed.items()):
            if sizes.get(name, -1) < size:
                raise CheckpointError(
                    f"refusing to commit step {step}: {name} holds {sizes.get(name)} bytes, "
                    f".metadata needs {size}"
                )
        self.client.put_object(
            Bucket=self.bucket,
            Key=self._step_prefix(step) + _manifest.MANIFEST,
            Body=(tmp / _manifest.MANIFEST).read_bytes(),
        )
        _storage._fault_point("before_marker")
        body = json.dumps({"format": "aiodcp-commit", "version": 1, "step": step}).encode()
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._marker(step), Body=body, IfNoneMatch="*"
            )
        except botocore.exceptions.ClientError as exc:
            if _status(exc) in (409, 412) or _code(exc) in ("PreconditionFailed",):
                raise CheckpointExistsError(f"step {step} already exists in {self}") from None
            raise
        _storage._fault_point("after_marker")
        with contextlib.suppress(botocore.exceptions.ClientError):
            self.client.delete_object(Bucket=self.bucket, Key=f"{self.prefix}{PENDING}/step_{step}")

    # --------------------------------------------------------- leases, retention
    def hold(self, step: int, *, required: bool = True) -> Lease | None:
        lease = Lease(self, f"{self.prefix}{HOLDS}/step_{step}.{uuid.uuid4().hex}")
        try:
            lease.put()
        except AccessRefusedError as exc:
            if required:
                raise
            # read-only credentials (an evaluation job's): read without a lease
            if not self.is_committed(step):
                raise CheckpointNotFoundError(f"step {step} is not committed in {self}") from None
            log.warning(
                "could not lease step %d of %s (%s): reading it unleased; the writer's "
                "retention may delete it meanwhile",
                step,
                self,
                exc,
            )
            return None
        if not self.is_committed(step):  # after the lease is visible: see apply_retention
            lease.release()
            raise CheckpointNotFoundError(f"step {step} is not committed in {self}")
        lease.start()
        return lease

    def release(self, lease: Any) -> None:
        if lease is not None:
            lease.release()

    def _held(self) -> set[int]:
        """Steps with a live lease (by the server's clock: LastModified + ttl > its Date)."""
        base = f"{self.prefix}{HOLDS}/"
        resp = self._call(self.client.list_objects_v2, Bucket=self.bucket, Prefix=base)
        now = server_now(resp)
        held = set()
        for obj in self._keys(base):
            m = _HOLD_RE.match(obj["Key"][len(base) :])
            if not m:
                continue
            age = (now - obj["LastModified"]).total_seconds()
            if age <= self.options.lease_ttl:
                held.add(int(m.group(1)))
            else:  # its holder is gone
                with contextlib.suppress(botocore.exceptions.ClientError):
                    self.client.delete_object(Bucket=self.bucket, Key=obj["Key"])
        return held

    def delete_step(self, step: int) -> None:
        """Marker first (the step stops being committed), then its objects."""
        self.client.delete_object(Bucket=self.bucket, Key=self._marker(step))
        self._delete_prefix(self._step_prefix(step))

    def apply_retention(self, keep_last: int | None, keep_every: int | None) -> list[int]:
        from ._retention import retention_victims

        victims = retention_victims(self.list_steps(), keep_last, keep_every)
        if not victims:
            return []
        held = self._held()
        deleted = []
        for step in victims:
            if step in held:
                continue
            self.client.delete_object(Bucket=self.bucket, Key=self._marker(step))
            if step in self._held():
                # a reader leased it between the two looks and may have seen the marker:
                # the step comes back (its objects were never touched)
                body = json.dumps({"format": "aiodcp-commit", "version": 1, "step": step})
                self.client.put_object(
                    Bucket=self.bucket, Key=self._marker(step), Body=body.encode()
                )
                continue
            self._delete_prefix(self._step_prefix(step))
            deleted.append(step)
        return deleted


def _pid_alive(pid: int) -> bool:
    """A process with ``pid`` runs on this host (and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False
