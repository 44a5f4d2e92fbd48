"""Parent side of one daemon: spawn, handshake, reader/writer/exit-watch tasks, shutdown.

Everything here runs on the event loop and never blocks it: the channel is an
anyio UNIX socket stream over a private ``socketpair``, the process is an anyio
process (its exit is awaited, not polled), and shutdown escalates
Terminate -> wait -> SIGTERM -> SIGKILL -> reap under a shield, bounded in time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import _protocol as p
from ._errors import CheckpointError, ProtocolError, WorkerDiedError

log = logging.getLogger("aiodcp")
_daemon_log = logging.getLogger("aiodcp.daemon")

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


class Worker:
    """A running daemon. Create with :meth:`start` inside the owner's task group."""

    def __init__(
        self,
        process: anyio.abc.Process,
        stream: anyio.abc.UNIXSocketStream,
        rank: int,
        on_message: Callable[[p.Message], None],
        on_exit: Callable[[Worker], None],
    ) -> None:
        self.process = process
        self.pid: int = process.pid
        self.stream = stream
        self.rank = rank
        self.conn = p.Connection(p.Role.PARENT)
        self.on_message = on_message
        self.on_exit = on_exit
        self.ready = anyio.Event()
        self.exited = anyio.Event()
        self.init_error: CheckpointError | None = None
        self.returncode: int | None = None
        self.arenas: set[int] = set()  # arenas this daemon has mapped
        self.terminating = False
        send, recv = anyio.create_memory_object_stream[tuple[p.Message, int | None]](math.inf)
        self._outbox: MemoryObjectSendStream[tuple[p.Message, int | None]] = send
        self._outbox_recv: MemoryObjectReceiveStream[tuple[p.Message, int | None]] = recv

    # ------------------------------------------------------------------ start
    @classmethod
    async def start(
        cls,
        tg: anyio.abc.TaskGroup,
        config: p.DaemonConfig,
        *,
        init_timeout: float,
        on_message: Callable[[p.Message], None],
        on_exit: Callable[[Worker], None],
    ) -> Worker:
        """Spawn the daemon and wait (cancellably, within ``init_timeout``) for ``Ready``."""
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [_PACKAGE_PARENT, *filter(None, [env.get("PYTHONPATH")])]
        )
        argv = [
            sys.executable,
            "-m",
            "aiodcp._daemon",
            "--fd",
            str(child_sock.fileno()),
            "--config",
            json.dumps(asdict(config)),
        ]
        try:
            process = await anyio.open_process(
                argv,
                pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=None,
                stderr=None,
                env=env,
                # Its own session: a signal sent to the trainer's process group (Ctrl-C,
                # a scheduler's SIGTERM) does not cut a save short; the parent decides.
                start_new_session=True,
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            # Our copy of the child's end must go at once: then a dead child is EOF.
            child_sock.close()
        try:
            stream = await anyio.abc.UNIXSocketStream.from_socket(parent_sock)
        except BaseException:
            parent_sock.close()
            await _reap(process, 0.0)
            raise
        worker = cls(process, stream, config.rank, on_message, on_exit)
        tg.start_soon(worker._read_loop, name=f"aiodcp reader pid {worker.pid}")
        tg.start_soon(worker._write_loop, name=f"aiodcp writer pid {worker.pid}")
        tg.start_soon(worker._watch_exit, name=f"aiodcp exit watch pid {worker.pid}")
        try:
            with anyio.fail_after(init_timeout):
                async with anyio.create_task_group() as race:

                    async def _died() -> None:
                        await worker.exited.wait()
                        race.cancel_scope.cancel()

                    race.start_soon(_died)
                    await worker.ready.wait()
                    race.cancel_scope.cancel()
        except TimeoutError:
            await worker.kill()
            raise CheckpointError(
                f"checkpoint daemon (pid {worker.pid}) did not initialise within {init_timeout}s"
            ) from None
        except BaseException:
            await worker.kill()
            raise
        if not worker.ready.is_set() or worker.init_error is not None:
            await worker.kill()
            if worker.init_error is not None:
                raise worker.init_error
            raise WorkerDiedError(
                f"checkpoint daemon (pid {worker.pid}) {describe_exit(worker.returncode)} "
                "during start-up",
                returncode=worker.returncode,
            )
        return worker

    # ---------------------------------------------------------------- tasks
    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    data = await self.stream.receive(1 << 20)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    data = b""
                self.conn.receive_data(data)
                while True:
                    ev = self.conn.next_event()
                    if ev is p.NEED_DATA:
                        break
                    if isinstance(ev, p.Closed):
                        return
                    assert isinstance(ev, p.Message)
                    self._handle(ev)
        except ProtocolError as exc:
            log.error(
                "[rank %d] protocol error from daemon pid %d: %s; killing it",
                self.rank,
                self.pid,
                exc,
            )
            self._kill_now()

    def _handle(self, msg: p.Message) -> None:
        if isinstance(msg, p.Hello):
            return
        if isinstance(msg, p.Ready):
            self.ready.set()
        elif isinstance(msg, p.InitFailed):
            self.init_error = CheckpointError(
                f"checkpoint daemon (pid {self.pid}) failed to initialise: "
                f"{msg.error_type}: {msg.message}\n{msg.traceback}"
            )
            self.ready.set()
        elif isinstance(msg, p.Log):
            _daemon_log.log(msg.level, "[rank %d daemon %d] %s", self.rank, self.pid, msg.message)
        else:
            self.on_message(msg)

    async def _write_loop(self) -> None:
        async with self._outbox_recv:
            async for msg, fd in self._outbox_recv:
                try:
                    frame = self.conn.send(msg)
                    if fd is None:
                        await self.stream.send(frame)
                    else:
                        await self.stream.send_fds(frame, [fd])
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    return  # the exit watcher reports the death
                except ProtocolError as exc:  # pragma: no cover - a bug in the parent
                    log.error("refusing to send %r: %s", msg, exc)

    async def _watch_exit(self) -> None:
        self.returncode = await self.process.wait()
        self.exited.set()
        self._outbox.close()
        if not self.terminating:
            log.warning(
                "[rank %d] checkpoint daemon pid %d %s",
                self.rank,
                self.pid,
                describe_exit(self.returncode),
            )
        self.on_exit(self)
        with anyio.CancelScope(shield=True):
            await self.stream.aclose()

    # ------------------------------------------------------------------ API
    @property
    def alive(self) -> bool:
        return not self.exited.is_set() and not self.terminating

    def send(self, msg: p.Message, fd: int | None = None) -> bool:
        """Queue ``msg`` for the daemon (never blocks); False if it is gone."""
        if self.exited.is_set():
            return False
        try:
            self._outbox.send_nowait((msg, fd))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False
        return True

    def _kill_now(self) -> None:
        if self.process.returncode is None:
            try:
                self.process.kill()
            except ProcessLookupError:  # pragma: no cover
                pass

    async def kill(self) -> None:
        with anyio.CancelScope(shield=True):
            self.terminating = True
            self._kill_now()
            await self.exited.wait()
            await self.stream.aclose()

    async def shutdown(self, grace: float) -> None:
        """Terminate -> wait ``grace`` -> SIGTERM -> 5 s -> SIGKILL -> reap. Shielded."""
        with anyio.CancelScope(shield=True):
            self.terminating = True
            if not self.exited.is_set():
                self.send(p.Terminate())
                with anyio.move_on_after(grace):
                    await self.exited.wait()
            if not self.exited.is_set():
                log.warning(
                    "daemon pid %d ignored Terminate for %.1fs; sending SIGTERM", self.pid, grace
                )
                try:
                    self.process.terminate()
                except ProcessLookupError:  # pragma: no cover
                    pass
                with anyio.move_on_after(5.0):
                    await self.exited.wait()
            if not self.exited.is_set():
                log.warning("daemon pid %d survived SIGTERM; sending SIGKILL", self.pid)
                self._kill_now()
                await self.exited.wait()
            await self.stream.aclose()


async def _reap(process: anyio.abc.Process, grace: float) -> None:
    with anyio.CancelScope(shield=True):
        if process.returncode is None:
            with anyio.move_on_after(grace):
                await process.wait()
        if process.returncode is None:
            try:
                process.kill()
            except ProcessLookupError:  # pragma: no cover
                pass
            await process.wait()
