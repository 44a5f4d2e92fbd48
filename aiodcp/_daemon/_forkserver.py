"""The fork server: one warm process per trainer that daemons are forked from.

A daemon needs torch and DCP, and importing them costs ~4 s of CPU. The fork server
imports them once, then forks each daemon on request (~20 ms): a checkpointer's second
daemon, a restarted generation and every later checkpointer in the same process start
at once. It is started by :mod:`aiodcp._parent._spawner` (``python -c`` with the same
path rules as a daemon) and lives in a session of its own.

It speaks one request at a time over a ``SOCK_SEQPACKET`` socket (one datagram per
message, JSON, file descriptors with ``SCM_RIGHTS``)::

    parent -> server                              server -> parent
    ready                                         (sent once, when warm)
    {"op": "fork", "argv", "env", "cwd"}          {"pid"} + [pidfd]  |  {"error"}
      + [daemon socket, start-up pipe, stdout, stderr]
    {"op": "reap", "pid"}                         {"pid", "status"}  (waitpid of an
                                                   exited child; null if unknown)

EOF on the socket (the trainer is gone) ends the server; its daemons are not touched
(each watches its own channel). The forked child takes the trainer's *current*
environment, working directory, stdout and stderr, so it is the daemon a plain spawn
would have started -- except for what torch read from the environment at import.
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import sys
import traceback
from typing import Any

_MAX_MESSAGE = 1 << 20  # one request (argv + environment) fits; bounded
_MAX_FDS = 4


def _receive(ctl: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    fds = array.array("i")
    data, ancdata, _flags, _addr = ctl.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(_MAX_FDS * 4))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), list(fds)


def _reply(ctl: socket.socket, msg: dict[str, Any], fd: int | None = None) -> None:
    data = json.dumps(msg).encode()
    if fd is None:
        ctl.sendmsg([data])
    else:
        ctl.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def _child(ctl: socket.socket, req: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: become the daemon a spawn would have started; never return."""
    code = 1
    startup = fds[1]
    try:
        ctl.close()
        os.setsid()
        os.dup2(fds[2], 1)
        os.dup2(fds[3], 2)
        os.close(fds[2])
        os.close(fds[3])
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(req["env"])
        os.chdir(req["cwd"])
        from ._daemon import main

        os.environ.pop("AIODCP_STARTUP_FD", None)
        os.environ.pop("AIODCP_PACKAGE_PARENT", None)
        code = main(["--fd", str(fds[0]), *req["argv"]])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        try:
            os.write(startup, traceback.format_exc()[-65536:].encode())
        except OSError:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(ctl_fd: int) -> int:
    """The server's loop (the bootstrap calls it once torch and DCP are imported)."""
    ctl = socket.socket(fileno=ctl_fd)
    ctl.setblocking(True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Warm what every daemon imports, so that no daemon pays for it.
    import torch
    import torch.distributed
    import torch.distributed.checkpoint  # noqa: F401

    from . import _persist, _writer  # noqa: F401
    from ._daemon import set_name

    set_name(b"aiodcp-forksrv")

    ctl.sendmsg([b'"ready"'])
    while True:
        try:
            req, fds = _receive(ctl)
        except (OSError, ValueError):
            return 0
        if req is None:
            return 0  # the trainer is gone
        if req.get("op") == "fork" and len(fds) == 4:
            try:
                pid = os.fork()
            except OSError as exc:
                _reply(ctl, {"error": f"fork failed: {exc}"})
                pid = -1
            if pid == 0:
                _child(ctl, req, fds)
            for fd in fds:
                os.close(fd)
            if pid > 0:
                pidfd = os.pidfd_open(pid)  # never reaped before this: the pid is ours
                try:
                    _reply(ctl, {"pid": pid}, pidfd)
                finally:
                    os.close(pidfd)
        elif req.get("op") == "reap":
            pid = int(req["pid"])
            status: int | None = None
            try:
                _, raw = os.waitpid(pid, 0)
                status = os.waitstatus_to_exitcode(raw)
            except ChildProcessError:
                pass
            _reply(ctl, {"pid": pid, "status": status})
        else:
            for fd in fds:
                os.close(fd)
            _reply(ctl, {"error": f"unknown request {req!r}"})
