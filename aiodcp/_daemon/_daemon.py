"""The checkpoint daemon: one process per rank, started by ``aiodcp._parent._generation``.

It is the library's own entry point -- never the user's ``__main__`` -- so a
script without an ``if __name__ == "__main__":`` guard, or a notebook, works;
and the trainer's working directory is not on its ``sys.path``, so a user's
``uuid.py`` beside their script cannot shadow a standard module in the daemon.

Threads:

* main: start-up (``Hello``, process group, ``Ready``), then waits for a reason
  to stop (``Terminate``, end of file on the channel, SIGTERM);
* reader: decodes frames with :mod:`aiodcp._wire._protocol`, maps arenas, queues saves
  and flags cancellations;
* saver: runs saves one at a time (DCP's collectives need the same order on
  every rank): agree -> write into a temporary directory -> agree -> commit.

A failed save is sent back as ``SaveFailed`` and the daemon keeps serving. When
the parent goes away (EOF, or a new parent pid) the current save is aborted,
its temporary directory removed, and the daemon exits.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import queue
import select
import shutil
import signal
import socket
import sys
import threading
import traceback
import warnings
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import Any

from .._disk._roots import open_store
from .._errors import ProtocolError
from .._staging._arena import MappedArena, read_fd
from .._staging._staging import MeshSpec
from .._wire import _protocol as p
from .._wire._protocol import DaemonConfig as Config
from ._persist import Persisting, Request, Stop, Stopping

PR_SET_NAME = 15
log = logging.getLogger("aiodcp.daemon")


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


class Daemon(Persisting):
    def __init__(self, sock: socket.socket, cfg: Config) -> None:
        self.sock = sock
        self.cfg = cfg
        # the daemon's own store (and, for an object store, its own client: after spawn)
        self.store = open_store(cfg.root, cfg.storage_options)
        self.root = self.store.spool_root
        self.conn = p.Connection(p.Role.DAEMON)
        self.conn_lock = threading.Lock()  # guards conn (both directions)
        self.send_lock = threading.Lock()  # one frame at a time on the socket
        self.broken = False
        self.parent_pid = os.getppid()
        self.fds: deque[int] = deque()
        self.arenas: dict[int, MappedArena] = {}
        self.doomed: set[int] = set()  # arenas released while a save still reads them
        self.requests: dict[int, Request] = {}
        self.todo: queue.Queue[Request | None] = queue.Queue()
        self.stop = threading.Event()
        self.stopping = Stopping()
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
            req = Request(msg, skeleton)
            self.requests[msg.req_id] = req
            self.todo.put(req)
        elif isinstance(msg, p.Cancel):
            target = self.requests.get(msg.req_id)
            if target is not None:
                target.cancel.set()
        elif isinstance(msg, p.Terminate):
            self.todo.put(None)

    def _halt(self, reason: str, kind: Stop = Stop.HALT) -> None:
        """The parent is gone or unusable (or SIGTERM): abort everything and stop."""
        for req in list(self.requests.values()):
            req.reason = reason
            req.cancel.set()
        self.stopping.enter(kind, reason)
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
        graceful = self.stopping.kind is Stop.TERMINATE
        saver.join(timeout=None if graceful else 3.0)
        for tmp in list(self.tmp_dirs):
            shutil.rmtree(tmp, ignore_errors=True)
        if self.stopping.kind is Stop.SIGTERM:
            log.warning("daemon received SIGTERM; current save aborted")
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        if graceful and self.pg is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
        return 0

    def on_sigterm(self, signum: int, frame: Any) -> None:
        self._halt("SIGTERM", Stop.SIGTERM)

    # ------------------------------------------------------------------ saves
    def _saver(self) -> None:
        while True:
            item = self.todo.get()
            if item is None:
                self.stopping.enter(Stop.TERMINATE, "terminate")
                self.stop.set()
                return
            try:
                self._save(item)
            finally:
                self.requests.pop(item.msg.req_id, None)
            if self.stop.is_set():
                return


def set_name(name: bytes) -> None:
    """The process's name in ``ps`` and ``/proc/PID/comm`` (``aiodcp-daemon``)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aiodcp daemon")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    set_name(b"aiodcp-daemon")
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
