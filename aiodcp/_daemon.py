"""The checkpoint daemon: one process per rank, started as ``python -m aiodcp._daemon``.

It is the library's own entry point -- never the user's ``__main__`` -- so a
script without an ``if __name__ == "__main__":`` guard, or a notebook, works.

Threads:

* main: start-up (``Hello``, process group, ``Ready``), then waits for a reason
  to stop (``Terminate``, end of file on the channel, SIGTERM);
* reader: decodes frames with :mod:`aiodcp._protocol`, maps arenas, queues saves
  and flags cancellations;
* saver: runs saves one at a time (DCP's collectives need the same order on
  every rank): agree -> write into a temporary directory -> agree -> commit.

A failed save is sent back as ``SaveFailed`` and the daemon keeps serving. When
the parent goes away (EOF, or a new parent pid) the current save is aborted,
its temporary directory removed, and the daemon exits.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import os
import pickle
import queue
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
import warnings
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from . import _protocol as p
from . import _storage
from ._errors import ProtocolError
from ._protocol import DaemonConfig as Config
from ._staging import MeshSpec, PickledLeaf, map_arena, rebuild

log = logging.getLogger("aiodcp.daemon")


# Seconds to sleep before each write item; lets tests kill or cancel mid-persist.
_SLOW_WRITE = float(os.environ.get("AIODCP_TEST_SLOW_WRITE", "0") or 0)


class SaveCancelled(Exception):
    """Raised inside DCP's write path when a save is cancelled."""


@dataclass
class _Request:
    msg: p.Save
    cancel: threading.Event = field(default_factory=threading.Event)
    reason: str = "cancelled by the parent"


class _ForwardHandler(logging.Handler):
    """Sends log records to the parent as ``Log`` messages (stderr if that fails)."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__()
        self.daemon = daemon
        self._busy = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._busy, "on", False):
            return
        self._busy.on = True
        try:
            msg = self.format(record)
            if not self.daemon.send(p.Log(record.levelno, record.name, msg)):
                sys.stderr.write(f"[aiodcp daemon rank {self.daemon.cfg.rank}] {msg}\n")
        except Exception:  # pragma: no cover - logging must never raise
            pass
        finally:
            self._busy.on = False


class Daemon:
    def __init__(self, sock: socket.socket, cfg: Config) -> None:
        self.sock = sock
        self.cfg = cfg
        self.root = Path(cfg.root)
        self.conn = p.Connection(p.Role.DAEMON)
        self.lock = threading.Lock()  # guards conn and the socket's write side
        self.broken = False
        self.parent_pid = os.getppid()
        self.fds: deque[int] = deque()
        self.arenas: dict[int, Any] = {}
        self.requests: dict[int, _Request] = {}
        self.todo: queue.Queue[_Request | None] = queue.Queue()
        self.stop = threading.Event()
        self.stop_reason = ""
        self.tmp_dirs: set[Path] = set()
        self.pg: Any = None
        self.meshes: dict[Any, Any] = {}
        self.first_save = True

    # ------------------------------------------------------------- channel
    def send(self, msg: p.Message) -> bool:
        with self.lock:
            if self.broken:
                return False
            try:
                self.sock.sendall(self.conn.send(msg))
                return True
            except (OSError, ProtocolError):
                self.broken = True
                return False

    def _reader(self) -> None:
        self.sock.settimeout(1.0)
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 20, 16)
            except TimeoutError:
                if os.getppid() != self.parent_pid:
                    return self._halt("parent process is gone")
                continue
            except OSError as exc:
                return self._halt(f"channel error: {exc}")
            self.fds.extend(fds)
            try:
                with self.lock:
                    self.conn.receive_data(data)
                    events: list[p.Message | p.Closed] = []
                    while True:
                        ev = self.conn.next_event()
                        if isinstance(ev, p._NeedData):
                            break
                        events.append(ev)
                        if isinstance(ev, p.Closed):
                            break
                for ev in events:
                    if isinstance(ev, p.Closed):
                        return self._halt("parent closed the channel")
                    self._dispatch(ev)
            except ProtocolError as exc:
                log.error("protocol error from parent: %s", exc)
                return self._halt(f"protocol error: {exc}")

    def _dispatch(self, msg: p.Message) -> None:
        if isinstance(msg, p.Arena):
            fd = self.fds.popleft()
            try:
                self.arenas[msg.arena_id] = map_arena(fd, msg.nbytes)
            finally:
                os.close(fd)
        elif isinstance(msg, p.ReleaseArena):
            self.arenas.pop(msg.arena_id, None)
        elif isinstance(msg, p.Save):
            req = _Request(msg)
            self.requests[msg.req_id] = req
            self.todo.put(req)
        elif isinstance(msg, p.Cancel):
            target = self.requests.get(msg.req_id)
            if target is not None:
                target.cancel.set()
        elif isinstance(msg, p.Terminate):
            self.todo.put(None)

    def _halt(self, reason: str) -> None:
        """The parent is gone or unusable: abort everything and stop."""
        for req in list(self.requests.values()):
            req.reason = reason
            req.cancel.set()
        self.stop_reason = self.stop_reason or reason
        self.todo.put(None)
        self.stop.set()

    # --------------------------------------------------------------- start-up
    def init_group(self) -> None:
        import torch.distributed as dist

        cfg = self.cfg
        store: Any
        timeout = timedelta(seconds=cfg.init_timeout)
        if cfg.use_prefix_store:
            base = dist.TCPStore(  # type: ignore[attr-defined]
                cfg.master_addr, cfg.master_port, is_master=False, timeout=timeout
            )
            store = dist.PrefixStore(  # type: ignore[attr-defined]
                f"aiodcp/{cfg.token}/", base
            )
        else:
            store = dist.TCPStore(  # type: ignore[attr-defined]
                cfg.master_addr,
                cfg.master_port,
                cfg.world_size,
                is_master=cfg.rank == 0,
                timeout=timeout,
            )
        dist.init_process_group(
            backend="gloo",
            store=store,
            rank=cfg.rank,
            world_size=cfg.world_size,
            timeout=timedelta(seconds=cfg.collective_timeout),
        )
        self.pg = dist.group.WORLD
        dist.barrier()

    def mesh(self, spec: MeshSpec) -> Any:
        from torch.distributed.device_mesh import DeviceMesh

        key = (repr(spec.mesh), spec.dim_names)
        if key not in self.meshes:
            import torch

            self.meshes[key] = DeviceMesh(
                "cpu", torch.tensor(spec.mesh), mesh_dim_names=spec.dim_names
            )
        return self.meshes[key]

    def run(self) -> int:
        log.info(
            "daemon pid %d serving %s (rank %d/%d)",
            os.getpid(),
            self.root,
            self.cfg.rank,
            self.cfg.world_size,
        )
        try:
            if self.cfg.world_size > 1:
                self.init_group()
            import torch.distributed.checkpoint  # noqa: F401  (warm the import)
        except BaseException as exc:
            self.send(p.InitFailed(type(exc).__name__, str(exc), traceback.format_exc()))
            return 1
        if self.cfg.disable_automatic_gc:
            gc.disable()
        if self.cfg.niceness:
            try:
                os.nice(self.cfg.niceness)
            except OSError:  # pragma: no cover
                pass
        if not self.send(p.Ready(self.cfg.rank, self.cfg.world_size)):
            return 1
        threading.Thread(target=self._reader, name="aiodcp-reader", daemon=True).start()
        saver = threading.Thread(target=self._saver, name="aiodcp-saver", daemon=True)
        saver.start()
        while not self.stop.wait(0.5):
            pass
        return self._shutdown(saver)

    def _shutdown(self, saver: threading.Thread) -> int:
        graceful = self.stop_reason == "terminate"
        saver.join(timeout=None if graceful else 3.0)
        for tmp in list(self.tmp_dirs):
            shutil.rmtree(tmp, ignore_errors=True)
        if self.stop_reason == "SIGTERM":
            log.warning("daemon received SIGTERM; current save aborted")
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        if graceful and self.pg is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
        return 0

    def on_sigterm(self, signum: int, frame: Any) -> None:
        self._halt("SIGTERM")

    # ------------------------------------------------------------------ saves
    def _saver(self) -> None:
        while True:
            item = self.todo.get()
            if item is None:
                self.stop_reason = self.stop_reason or "terminate"
                self.stop.set()
                return
            try:
                self._save(item)
            finally:
                self.requests.pop(item.msg.req_id, None)
            if self.stop.is_set():
                return

    def _agree(self, obj: Any) -> list[Any]:
        if self.pg is None:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.cfg.world_size
        dist.all_gather_object(out, obj)
        return out

    def _save(self, req: _Request) -> None:
        msg = req.msg
        t0 = time.perf_counter()
        tmp: Path | None = None
        try:
            token = uuid.uuid4().hex[:12]
            votes = self._agree((msg.step, req.cancel.is_set(), token))
            steps = {v[0] for v in votes}
            if len(steps) != 1:
                raise RuntimeError(f"ranks disagree on the step to save: {sorted(steps)}")
            if any(v[1] for v in votes):
                raise SaveCancelled(req.reason)
            tmp = _storage.tmp_dir(self.root, msg.step, votes[0][2])
            self.tmp_dirs.add(tmp)
            if not msg.overwrite and _storage.step_dir(self.root, msg.step).exists():
                from ._errors import CheckpointExistsError

                raise CheckpointExistsError(f"step {msg.step} already exists in {self.root}")
            metadata, nbytes = self._write(req, tmp)
            votes = self._agree(req.cancel.is_set())
            if any(votes):
                raise SaveCancelled(req.reason)
            err = self._commit(msg, tmp)
            if err:
                raise RuntimeError(err)
            self.tmp_dirs.discard(tmp)
            path = _storage.step_dir(self.root, msg.step)
            self.send(
                p.Saved(
                    msg.req_id,
                    msg.step,
                    str(path),
                    nbytes,
                    time.perf_counter() - t0,
                    blob=pickle.dumps(metadata),
                )
            )
            log.info(
                "step %d committed (%d bytes, %.3fs)", msg.step, nbytes, time.perf_counter() - t0
            )
            self._retain()
        except BaseException as exc:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                self.tmp_dirs.discard(tmp)
            cancelled = _is_cancel(exc)
            if self.stop_reason and self.stop_reason != "terminate":
                return  # dying (SIGTERM, parent gone): the parent reports our death
            text = str(exc) or repr(exc)
            # With several ranks, a failure (unlike a cancellation, which the ranks
            # agree on by vote) may have left the daemons' group mid-collective or
            # broken (a peer died). Rather than trust it, every daemon exits and the
            # parents start a fresh group for the next save.
            fatal = self.pg is not None and not cancelled
            if not cancelled:
                text = self._diagnose(msg) + text
                log.warning("save of step %d failed: %s: %s", msg.step, type(exc).__name__, text)
            self.send(
                p.SaveFailed(
                    msg.req_id,
                    type(exc).__name__,
                    text,
                    traceback.format_exc(),
                    cancelled=cancelled,
                    fatal=fatal,
                )
            )
            if fatal:
                self._halt("process group is no longer trusted after a failed save")
        finally:
            self._after_save()

    def _diagnose(self, msg: p.Save) -> str:
        """A plain-words prefix for errors whose cause DCP's message hides (a full disk)."""
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            return ""
        needed = sum(s.nbytes for s in msg.tensors) + len(msg.blob)
        if free < needed + (1 << 20):
            return (
                f"no space left on device ({free} bytes free in {self.root}, "
                f"save needs ~{needed}): "
            )
        return ""

    def _write(self, req: _Request, tmp: Path) -> tuple[Any, int]:
        from . import _writer

        msg = req.msg
        mm = self.arenas[msg.arena_id]
        skeleton = pickle.loads(msg.blob)
        state = rebuild(skeleton, msg.tensors, mm, self.mesh)
        total = sum(s.nbytes for s in msg.tensors)
        planner = _Planner(req, self, total)
        # any writer thread's error fails the save; the bytes are hashed for the manifest
        writer = _writer.VerifiedWriter(
            tmp, step=msg.step, thread_count=self.cfg.thread_count, sync_files=self.cfg.sync_files
        )
        metadata = _writer.save(
            state, writer=writer, planner=planner, rank=self.cfg.rank, pg=self.pg
        )
        planner.report(final=True)
        return metadata, total

    def _commit(self, msg: p.Save, tmp: Path) -> str | None:
        """Rank 0 publishes the step once every rank's data is durable; all learn the result."""
        err: str | None = None
        if self.cfg.rank == 0:
            try:
                _storage.commit(self.root, tmp, msg.step, overwrite=msg.overwrite)
            except BaseException as exc:
                err = f"{type(exc).__name__}: {exc}"
        if self.pg is not None:
            import torch.distributed as dist

            box = [err]
            dist.broadcast_object_list(box, src=0)
            err = box[0]
        return err

    def _retain(self) -> None:
        if self.cfg.rank != 0 or self.cfg.keep_last is None:
            return
        try:
            deleted = _storage.apply_retention(self.root, self.cfg.keep_last, self.cfg.keep_every)
            if deleted:
                log.info("retention deleted steps %s", deleted)
        except Exception as exc:
            log.warning("retention failed: %s", exc)

    def _after_save(self) -> None:
        if self.cfg.disable_automatic_gc and not self.cfg.disable_manual_gc:
            gc.collect()
            if self.first_save:
                gc.freeze()
        self.first_save = False


def _is_cancel(exc: BaseException) -> bool:
    if isinstance(exc, SaveCancelled):
        return True
    failures = getattr(exc, "failures", None)  # DCP's CheckpointException
    if isinstance(failures, dict):
        for f in failures.values():
            inner = f[0] if isinstance(f, tuple) else f
            if isinstance(inner, SaveCancelled):
                return True
    return False


class _Planner(DefaultSavePlanner):
    """DCP's default planner, plus: cancellation at each write item, progress,
    and values the parent already serialised written as they are."""

    def __init__(self, req: _Request, daemon: Daemon, total: int) -> None:
        super().__init__()
        self._req = req
        self._daemon = daemon
        self._total = total
        self._written = 0
        self._last = 0.0
        self._lock = threading.Lock()

    def resolve_data(self, write_item: Any) -> Any:
        if _SLOW_WRITE:  # fault-injection hook for tests: widen the persist window
            time.sleep(_SLOW_WRITE)
        if self._req.cancel.is_set():
            raise SaveCancelled(self._req.reason)
        obj = self.lookup_object(write_item.index)
        if isinstance(obj, PickledLeaf):
            return io.BytesIO(obj.data)
        data = self.transform_object(write_item, obj)
        tensor_data = getattr(write_item, "tensor_data", None)
        if tensor_data is not None:
            with self._lock:
                self._written += _nbytes(tensor_data)
            self.report()
        return data

    def report(self, final: bool = False) -> None:
        now = time.monotonic()
        if final or now - self._last > 0.1:
            self._last = now
            self._daemon.send(
                p.Progress(
                    self._req.msg.req_id,
                    "written" if final else "writing",
                    self._total if final else min(self._written, self._total),
                    self._total,
                )
            )


def _nbytes(tensor_data: Any) -> int:
    n = 1
    for d in tensor_data.chunk.sizes:
        n *= d
    import torch

    return n * torch.empty((), dtype=tensor_data.properties.dtype).element_size()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aiodcp._daemon")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    cfg = Config(**json.loads(args.config))
    sock = socket.socket(fileno=args.fd)
    sock.setblocking(True)
    daemon = Daemon(sock, cfg)
    root_logger = logging.getLogger()
    handler = _ForwardHandler(daemon)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.WARNING)
    logging.getLogger("aiodcp").setLevel(cfg.log_level)
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    signal.signal(signal.SIGTERM, daemon.on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent; it decides
    if not daemon.send(p.Hello(os.getpid())):
        return 1
    return daemon.run()


if __name__ == "__main__":
    sys.exit(main())
