"""The checkpoint daemon: one process per rank, started by ``aiodcp._generation``.

It is the library's own entry point -- never the user's ``__main__`` -- so a
script without an ``if __name__ == "__main__":`` guard, or a notebook, works;
and the trainer's working directory is not on its ``sys.path``, so a user's
``uuid.py`` beside their script cannot shadow a standard module in the daemon.

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
import select
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
from . import _retention, _storage
from ._arena import MappedArena, read_fd
from ._errors import ProtocolError
from ._protocol import DaemonConfig as Config
from ._staging import MeshSpec, PickledLeaf, rebuild

log = logging.getLogger("aiodcp.daemon")


# Seconds to sleep before each write item; lets tests kill or cancel mid-persist.
_SLOW_WRITE = float(os.environ.get("AIODCP_TEST_SLOW_WRITE", "0") or 0)


class SaveCancelled(Exception):
    """Raised inside DCP's write path when a save is cancelled."""


class DaemonExiting(SaveCancelled):
    """Raised inside DCP's write path when this daemon is going away (SIGTERM, no parent).

    Its peers must not mistake it for a cancellation: for them it is a failure.
    """


@dataclass
class _Request:
    msg: p.Save
    skeleton: bytes
    cancel: threading.Event = field(default_factory=threading.Event)
    reason: str = "cancelled by the parent"


# How a rank votes at each agreement point of a save.
_OK, _CANCEL, _DYING = "ok", "cancel", "dying"


class PeerFailed(Exception):
    """Another rank's daemon is exiting (or failed) in the middle of this save."""


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
            if not self.daemon.send(p.Log(record.levelno, record.name, p.clip(msg))):
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
        self.conn_lock = threading.Lock()  # guards conn (both directions)
        self.send_lock = threading.Lock()  # one frame at a time on the socket
        self.broken = False
        self.parent_pid = os.getppid()
        self.fds: deque[int] = deque()
        self.arenas: dict[int, MappedArena] = {}
        self.doomed: set[int] = set()  # arenas released while a save still reads them
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
        """Send one frame, blocking until the parent has room for it.

        The socket is blocking and has no timeout: a parent whose event loop is
        busy for a while just delays the reply; it is never dropped. Only a dead
        channel makes the daemon stop talking.
        """
        with self.conn_lock:
            if self.broken:
                return False
            try:
                frame = self.conn.send(msg)
            except ProtocolError as exc:
                sys.stderr.write(f"[aiodcp daemon] refusing to send {type(msg).__name__}: {exc}\n")
                return False
        with self.send_lock:
            try:
                self.sock.sendall(frame)
                return True
            except OSError:
                self.broken = True
                return False

    def _reader(self) -> None:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        while True:
            # Wait with a timeout only to notice a vanished parent whose end of the
            # channel another process still holds open; the socket itself blocks.
            if not poller.poll(1000):
                if os.getppid() != self.parent_pid:
                    return self._halt("parent process is gone")
                continue
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 16, 16)
            except OSError as exc:
                return self._halt(f"channel error: {exc}")
            self.fds.extend(fds)
            try:
                with self.conn_lock:
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
            except (ProtocolError, OSError, ValueError, IndexError) as exc:
                log.error("bad request from parent: %s", exc)
                return self._halt(f"protocol error: {exc}")

    def _take_fd(self, msg: p.Message) -> int:
        if not self.fds:
            raise ProtocolError(f"{type(msg).__name__} arrived without its file descriptor")
        return self.fds.popleft()

    def _dispatch(self, msg: p.Message) -> None:
        if isinstance(msg, p.Arena):
            fd = self._take_fd(msg)
            try:
                self.arenas[msg.arena_id] = MappedArena(
                    fd, msg.nbytes, msg.layout_offset, msg.layout_nbytes
                )
            finally:
                os.close(fd)
        elif isinstance(msg, p.ReleaseArena):
            if any(r.msg.arena_id == msg.arena_id for r in list(self.requests.values())):
                self.doomed.add(msg.arena_id)  # the saver releases it when that save ends
            else:
                arena = self.arenas.pop(msg.arena_id, None)
                if arena is not None:
                    arena.release()
        elif isinstance(msg, p.Save):
            fd = self._take_fd(msg)
            try:
                skeleton = read_fd(fd, msg.skeleton_nbytes)
            finally:
                os.close(fd)
            req = _Request(msg, skeleton)
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
        try:
            dist.all_gather_object(out, obj)
        except RuntimeError as exc:  # gloo: a peer's daemon vanished mid-collective
            raise PeerFailed(f"lost contact with another rank's daemon: {exc}") from exc
        return out

    def _vote(self, req: _Request) -> str:
        if self.stop_reason and self.stop_reason != "terminate":
            return _DYING
        return _CANCEL if req.cancel.is_set() else _OK

    def _check_votes(self, req: _Request, votes: list[str]) -> None:
        """Dying peers fail the save on every rank; a cancel anywhere cancels it."""
        if self._vote(req) == _DYING:
            raise DaemonExiting(req.reason)
        dying = [rank for rank, v in enumerate(votes) if v == _DYING]
        if dying:
            raise PeerFailed(f"the checkpoint daemon of rank(s) {dying} is exiting mid-save")
        if _CANCEL in votes:
            raise SaveCancelled(req.reason)

    def _save(self, req: _Request) -> None:
        msg = req.msg
        t0 = time.perf_counter()
        tmp: Path | None = None
        try:
            token = uuid.uuid4().hex[:12]
            votes = self._agree((msg.step, self._vote(req), token))
            steps = {v[0] for v in votes}
            if len(steps) != 1:
                raise RuntimeError(f"ranks disagree on the step to save: {sorted(steps)}")
            self._check_votes(req, [v[1] for v in votes])
            tmp = _storage.tmp_dir(self.root, msg.step, votes[0][2])
            self.tmp_dirs.add(tmp)
            if not msg.overwrite and _storage.step_dir(self.root, msg.step).exists():
                from ._errors import CheckpointExistsError

                raise CheckpointExistsError(f"step {msg.step} already exists in {self.root}")
            nbytes = self._write(req, tmp)
            self._check_votes(req, self._agree(self._vote(req)))
            err = self._commit(msg, tmp)
            if err:
                raise RuntimeError(err)
            self.tmp_dirs.discard(tmp)
            # Retention runs before the reply: once the handle resolves, steps() is final.
            self._retain()
            path = _storage.step_dir(self.root, msg.step)
            seconds = time.perf_counter() - t0
            self.send(p.Saved(msg.req_id, msg.step, str(path), nbytes, seconds))
            log.info("step %d committed (%d bytes, %.3fs)", msg.step, nbytes, seconds)
        except BaseException as exc:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                self.tmp_dirs.discard(tmp)
            cancelled = _classify(exc, self.cfg.rank) == "cancel"
            if self.stop_reason and self.stop_reason != "terminate":
                return  # dying (SIGTERM, parent gone): the parent reports our death
            # With several ranks, a failure (unlike a cancellation, which the ranks
            # agree on by vote) may have left the daemons' group mid-collective or
            # broken (a peer died). Rather than trust it, every daemon exits and the
            # parents start a fresh group for the next save.
            fatal = self.pg is not None and not cancelled
            if cancelled:
                text, tb = req.reason, ""
            else:
                text = self._diagnose(msg) + (str(exc) or repr(exc))
                tb = traceback.format_exc()
                log.warning("save of step %d failed: %s: %s", msg.step, type(exc).__name__, text)
            self.send(
                p.SaveFailed(
                    msg.req_id,
                    type(exc).__name__,
                    p.clip(text),
                    p.clip(tb),
                    cancelled=cancelled,
                    fatal=fatal,
                )
            )
            if fatal:
                self._halt("process group is no longer trusted after a failed save")
        finally:
            self._after_save(req)

    def _diagnose(self, msg: p.Save) -> str:
        """A plain-words prefix for errors whose cause DCP's message hides (a full disk)."""
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            return ""
        arena = self.arenas.get(msg.arena_id)
        needed = (arena.nbytes if arena is not None else 0) + msg.skeleton_nbytes
        if free < needed + (1 << 20):
            return (
                f"no space left on device ({free} bytes free in {self.root}, "
                f"save needs ~{needed}): "
            )
        return ""

    def _write(self, req: _Request, tmp: Path) -> int:
        from . import _writer

        msg = req.msg
        arena = self.arenas[msg.arena_id]
        state = rebuild(pickle.loads(req.skeleton), arena.views, self.mesh)
        total = sum(s.nbytes for s in arena.specs)
        planner = _Planner(req, self, total, caching=self.pg is not None)
        # any writer thread's error fails the save; the bytes are hashed for the manifest
        writer = _writer.VerifiedWriter(
            tmp, step=msg.step, thread_count=self.cfg.thread_count, sync_files=self.cfg.sync_files
        )
        _writer.save(state, writer=writer, planner=planner, rank=self.cfg.rank, pg=self.pg)
        planner.report(final=True)
        return total

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
            deleted = _retention.apply_retention(self.root, self.cfg.keep_last, self.cfg.keep_every)
            if deleted:
                log.info("retention deleted steps %s", deleted)
        except Exception as exc:
            log.warning("retention failed: %s", exc)

    def _after_save(self, req: _Request) -> None:
        arena_id = req.msg.arena_id
        if arena_id in self.doomed and not any(
            r is not req and r.msg.arena_id == arena_id for r in list(self.requests.values())
        ):
            self.doomed.discard(arena_id)
            arena = self.arenas.pop(arena_id, None)
            if arena is not None:
                arena.release()
        if self.cfg.disable_automatic_gc and not self.cfg.disable_manual_gc:
            gc.collect()
            if self.first_save:
                gc.freeze()
        self.first_save = False


def _classify(exc: BaseException, rank: int) -> str:
    """``"cancel"`` (a cancellation the ranks share), ``"peer"`` (another rank's daemon
    went away), ``"exiting"`` (this one is) or ``"error"``."""
    if isinstance(exc, DaemonExiting):
        return "exiting"
    if isinstance(exc, SaveCancelled):
        return "cancel"
    if isinstance(exc, PeerFailed):
        return "peer"
    failures = getattr(exc, "failures", None)  # DCP's CheckpointException: rank -> error
    if isinstance(failures, dict):
        inner = {r: (f[0] if isinstance(f, tuple) else f) for r, f in failures.items()}
        if isinstance(inner.get(rank), DaemonExiting):
            return "exiting"
        if any(isinstance(e, DaemonExiting) for e in inner.values()):
            return "peer"
        if any(isinstance(e, SaveCancelled) for e in inner.values()):
            return "cancel"
    return "error"


class _Planner(DefaultSavePlanner):
    """DCP's default planner, plus: cancellation at each write item, progress,
    and values the parent already serialised written as they are."""

    def __init__(self, req: _Request, daemon: Daemon, total: int, caching: bool) -> None:
        # Plan caching (torch >= 2.6) skips re-sending unchanged plans between ranks.
        super().__init__(enable_plan_caching=caching)
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
            if self._daemon.stop_reason and self._daemon.stop_reason != "terminate":
                raise DaemonExiting(self._req.reason)
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
    parser = argparse.ArgumentParser(prog="aiodcp daemon")
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
