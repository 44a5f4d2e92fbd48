"""How a daemon process comes to be: forked from the fork server, or spawned.

A spawned daemon imports torch and DCP before it can serve (~4 s of CPU). So the
first daemon of a trainer process starts a *fork server*
(:mod:`aiodcp._daemon._forkserver`) that imports them once, and every daemon is then
forked from it in ~20 ms: a restarted generation, a second checkpointer, the next
test. The server holds no checkpoint state (no root, no group, no save): it is a warm
interpreter, shared by the process's checkpointers the way a C library's allocator
is, and it exits when this process does (EOF on its socket).

The forked daemon is the one a spawn would start -- this process's current
environment, working directory, stdout and stderr, its own session -- and
:class:`ForkedProcess` gives the generation what it needs of a process (``pid``,
``wait()``, ``returncode``, ``send_signal``) through a pidfd, which names that one
process and no later holder of its pid. If the server cannot start, or
``AIODCP_FORKSERVER=0`` is set, the daemon is spawned as before.
"""

from __future__ import annotations

import array
import atexit
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

log = logging.getLogger("aiodcp")

__all__ = ["BOOTSTRAP", "Channel", "ForkedProcess", "start_daemon"]

PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])  # the folder holding aiodcp/

# ``python -c BOOTSTRAP --fd N --config JSON``: the working directory ('' with -c)
# leaves sys.path before anything is imported, so a user's ``uuid.py`` beside the
# training script cannot shadow a standard module in the daemon. Whatever kills the
# daemon before or while it starts (an import that fails) is written, as a traceback,
# to the start-up pipe ``AIODCP_STARTUP_FD``: the parent puts it on the error it raises.
_PATH = (
    "import os, sys; sys.path[:] = [p for p in sys.path if p not in ('', os.getcwd())]; "
    "sys.path.insert(0, os.environ.pop('AIODCP_PACKAGE_PARENT')); "
)
BOOTSTRAP = (
    _PATH + "fd = int(os.environ.pop('AIODCP_STARTUP_FD'))\n"
    "try:\n"
    "    from aiodcp._daemon._daemon import main; code = main(sys.argv[1:])\n"
    "except BaseException:\n"
    "    import traceback; os.write(fd, traceback.format_exc()[-65536:].encode()); raise\n"
    "sys.exit(code)"
)
SERVER_BOOTSTRAP = (
    _PATH + "from aiodcp._daemon._forkserver import serve; os._exit(serve(int(sys.argv[1])))"
)
_REPLY_TIMEOUT = 30.0  # a fork or a reap of an exited child: milliseconds, bounded
_UNKNOWN_EXIT = 255  # the server died before it could tell us


class Unavailable(Exception):
    """The fork server cannot be used (did not start, died): spawn instead."""


class ForkServer:
    """The process's fork server (one per process, see :func:`server`). Blocking:
    callers use it from a worker thread, one request at a time."""

    def __init__(self, start_timeout: float) -> None:
        self._lock = threading.Lock()
        self._broken = False  # a request went unanswered: never ask again
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            env = {**os.environ, "AIODCP_PACKAGE_PARENT": PACKAGE_PARENT}
            self.process = subprocess.Popen(
                [sys.executable, "-c", SERVER_BOOTSTRAP, str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # Ctrl-C to the trainer's group is not for it
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.sock = parent
        try:
            parent.settimeout(start_timeout)
            first = parent.recv(64)
            parent.settimeout(_REPLY_TIMEOUT)
        except OSError as exc:
            self.close()
            raise Unavailable(f"the fork server did not start: {exc}") from None
        if first != b'"ready"':
            self.close()
            raise Unavailable(f"the fork server exited ({self.process.poll()}) while starting")

    @property
    def alive(self) -> bool:
        return not self._broken and self.process.poll() is None

    def _give_up(self) -> None:
        """Kill the server (SIGKILL ends a stopped one too) and never ask it again."""
        self._broken = True
        self.sock.close()
        self.process.kill()
        try:
            self.process.wait(timeout=2.0)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass

    def _request(self, msg: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        data = json.dumps(msg).encode()
        with self._lock:
            if self._broken:
                raise Unavailable("the fork server was given up")
            try:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                self.sock.sendmsg([data], anc if fds else [])
                reply, ancdata, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(4))
            except OSError as exc:
                # No answer in time (a stopped or frozen server): the answer may still
                # come, and be read as the answer to the next request, and the request
                # may still be carried out. Neither may happen: the server goes.
                self._give_up()
                raise Unavailable(f"the fork server is gone: {exc}") from None
            if not reply:
                self._give_up()
        got = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
        if not reply:
            raise Unavailable("the fork server is gone")
        out = json.loads(reply)
        if "error" in out:
            for fd in got:
                os.close(fd)
            raise Unavailable(out["error"])
        return out, list(got)

    def fork(self, argv: list[str], fds: list[int]) -> ForkedProcess:
        """Fork a daemon: ``fds`` = its socket and start-up pipe (this process keeps its
        own copies; the child gets this process's stdout and stderr)."""
        std = [_usable(1), _usable(2)]
        try:
            req = {"op": "fork", "argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}
            out, got = self._request(req, [*fds, *std])
        finally:
            for fd in std:
                os.close(fd)
        if len(got) != 1:
            for fd in got:
                os.close(fd)
            raise Unavailable(f"the fork server sent {len(got)} descriptors for one pidfd")
        return ForkedProcess(int(out["pid"]), got[0], self)

    def reap(self, pid: int) -> int | None:
        """The exit code of ``pid`` (an exited child of the server), or None."""
        try:
            out, _ = self._request({"op": "reap", "pid": pid}, [])
        except Unavailable:
            return None
        status = out["status"]
        return None if status is None else int(status)

    def close(self) -> None:
        self.sock.close()  # EOF: the server exits; its daemons go on
        try:
            self.process.wait(timeout=2.0)
        except subprocess.TimeoutExpired:  # pragma: no cover
            self.process.kill()


def _usable(fd: int) -> int:
    """A duplicate of ``fd`` for the child, or of /dev/null where ``fd`` is closed."""
    try:
        return os.dup(fd)
    except OSError:
        return os.open(os.devnull, os.O_RDWR)


_server: ForkServer | None = None
_server_lock = threading.Lock()


def server(start_timeout: float) -> ForkServer:
    """This process's fork server, started (blocking, up to ``start_timeout``) if there
    is none or it died. Raises :class:`Unavailable`."""
    global _server
    with _server_lock:
        if _server is not None and not _server.alive:
            _server.sock.close()
            _server = None
        if _server is None:
            try:
                _server = ForkServer(start_timeout)
            except OSError as exc:
                raise Unavailable(f"cannot start the fork server: {exc}") from None
        return _server


def _forget_after_fork() -> None:
    """In a child of ``os.fork()``: the parent's server is the parent's (sharing its
    socket would interleave two processes' requests); start another when needed."""
    global _server, _server_lock
    _server_lock = threading.Lock()
    if _server is not None:
        _server.sock.close()
        _server = None


@atexit.register
def _close_server() -> None:
    if _server is not None:
        _server.close()


os.register_at_fork(after_in_child=_forget_after_fork)


class ForkedProcess:
    """A daemon forked by the server: not our child, so we watch it through a pidfd and
    learn its exit code from the server (which reaps it)."""

    def __init__(self, pid: int, pidfd: int, server: ForkServer) -> None:
        self.pid = pid
        self._pidfd: int | None = pidfd
        self._server = server
        self._lock = threading.Lock()  # the pidfd (closed once reaped)
        self._reaping = threading.Lock()  # one reap request at a time
        self.returncode: int | None = None

    def send_signal(self, sig: int) -> None:
        with self._lock:
            if self._pidfd is not None and self.returncode is None:
                signal.pidfd_send_signal(self._pidfd, sig)

    def _collect(self) -> int:
        with self._reaping:
            if self.returncode is None:
                status = self._server.reap(self.pid)
                if status is None:
                    log.warning("daemon pid %d: exit status unknown (fork server gone)", self.pid)
                    status = _UNKNOWN_EXIT
                with self._lock:
                    self.returncode = status
                    if self._pidfd is not None:
                        os.close(self._pidfd)
                        self._pidfd = None
            return self.returncode

    def discard(self) -> None:
        """Kill and reap (blocking, bounded): a daemon that no generation took."""
        self.send_signal(signal.SIGKILL)
        with self._lock:
            fd = os.dup(self._pidfd) if self._pidfd is not None else None
        if fd is not None:
            try:
                select.select([fd], [], [], 10.0)
            finally:
                os.close(fd)
        self._collect()

    async def wait(self) -> int:
        """Until the process has exited (any number of tasks may wait); its exit code."""
        if self.returncode is not None:
            return self.returncode
        with self._lock:
            fd = os.dup(self._pidfd) if self._pidfd is not None else None
        if fd is not None:
            try:
                await anyio.wait_readable(fd)  # a pidfd is readable once the process exited
            finally:
                os.close(fd)
        with anyio.CancelScope(shield=True):
            code = await anyio.to_thread.run_sync(self._collect)
        return code


class Channel:
    """One daemon's start-up descriptors: the two ends of its socket and of its
    start-up pipe. The daemon's ends go to the daemon and are closed here once it
    has them; the parent's ends go to the generation."""

    def __init__(self) -> None:
        self.parent, self.child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.startup_r, self.startup_w = os.pipe()

    def close_child_ends(self) -> None:
        if self.startup_w >= 0:
            self.child.close()
            os.close(self.startup_w)
            self.startup_w = -1

    def close(self) -> None:
        self.close_child_ends()
        self.parent.close()
        os.close(self.startup_r)


class _Fork:
    """One fork request, run in a worker thread that its caller may abandon.

    Whoever comes second -- the thread finishing, or the caller abandoning it -- owns
    what is left: the channel, and a daemon nobody took (killed and reaped)."""

    def __init__(self, srv: ForkServer, argv: list[str], channel: Channel) -> None:
        self.srv, self.argv, self.channel = srv, argv, channel
        self._lock = threading.Lock()
        self._done = False
        self._abandoned = False
        self._process: ForkedProcess | None = None

    def run(self) -> ForkedProcess:
        process: ForkedProcess | None = None
        try:
            fds = [self.channel.child.fileno(), self.channel.startup_w]
            process = self.srv.fork(self.argv, fds)
            return process
        finally:
            with self._lock:
                self._done, self._process = True, process
                abandoned = self._abandoned
            if abandoned:
                self._discard()

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            done = self._done
        if done and self._process is None:
            self.channel.close()
        elif done:  # the thread finished, its daemon was not taken: kill it, off the loop
            threading.Thread(target=self._discard, name="aiodcp discard", daemon=True).start()

    def _discard(self) -> None:
        self.channel.close()
        if self._process is not None:
            self._process.discard()


async def start_daemon(
    argv: list[str], *, start_timeout: float
) -> tuple[ForkedProcess | anyio.abc.Process, Channel]:
    """Start a daemon (``--fd N`` + ``argv``); the daemon's ends of its channel are
    closed here, the parent's ends are the caller's.

    Each attempt has a channel of its own: a fork whose answer was lost may have made a
    daemon, and that daemon must not share its socket with the one spawned instead (it
    sees EOF when the lost channel is closed here, and exits)."""
    if os.environ.get("AIODCP_FORKSERVER", "1") != "0":
        try:
            # Starting the server may take seconds: abandoned if we are cancelled (it is
            # then ready for the next caller).
            srv = await anyio.to_thread.run_sync(server, start_timeout, abandon_on_cancel=True)
            # The fork is abandoned too: a shield does not hold off asyncio's own
            # cancellation (task.cancel(), asyncio.timeout), so the daemon's owner is the
            # thread until this task takes it, and the thread kills and reaps a daemon
            # nobody took (it once stayed a zombie in the server, its pidfd open here).
            call = _Fork(srv, argv, Channel())
            try:
                process = await anyio.to_thread.run_sync(call.run, abandon_on_cancel=True)
            except BaseException:
                call.abandon()
                raise
            call.channel.close_child_ends()
            return process, call.channel
        except Unavailable as exc:
            log.info("spawning the daemon (%s)", exc)
    channel = Channel()
    sock_fd, startup_w = channel.child.fileno(), channel.startup_w
    env = {
        **os.environ,
        "AIODCP_PACKAGE_PARENT": PACKAGE_PARENT,
        "AIODCP_STARTUP_FD": str(startup_w),
    }
    try:
        spawned = await anyio.open_process(
            [sys.executable, "-c", BOOTSTRAP, "--fd", str(sock_fd), *argv],
            pass_fds=(sock_fd, startup_w),
            stdin=subprocess.DEVNULL,
            stdout=None,
            stderr=None,
            env=env,
            # Its own session: a signal sent to the trainer's process group (Ctrl-C, a
            # scheduler's SIGTERM) does not cut a save short; the parent decides.
            start_new_session=True,
        )
    except BaseException:
        channel.close()
        raise
    channel.close_child_ends()
    return spawned, channel
