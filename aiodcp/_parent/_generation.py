"""One daemon *generation*: a spawned process and everything that depends on it.

A :class:`Generation` owns, in one place (trio's nursery is the model):

* the daemon process and the parent's end of its private ``socketpair``;
* its tasks -- reader, flusher, exit watch -- in a task group of its own, each
  supervised (an exception is logged, never propagated into the owner's group);
* the save handles sent to it (``pending``) and the arenas it has mapped.

Only its own death fails its handles, and it fails no others: a new generation
never inherits an old one's callbacks, and a late reply or exit of an old one
is recognised by its generation number and touches nothing else (*fencing*).

States (the owner reads ``state``; :data:`TRANSITIONS`, an illegal move raises)::

    state      entered when                       leaves to
    --------   --------------------------------   ------------------------------
    starting   spawned                            serving (Ready) | retiring | exited
    serving    Ready received                     retiring | exited
    retiring   fatal reply, Terminate sent, kill  exited
    exited     process reaped (the one end)       --

Writes to the channel never wait for the event loop: :meth:`send` writes the
frame into the socket at once (frames are small and of bounded size), so the
daemon starts persisting the moment ``save()`` returns; only if the socket is
full is the rest queued for the flusher task. Shutdown escalates Terminate ->
wait -> SIGTERM -> wait -> SIGKILL -> reap, awaiting the process itself, never
an event some task might not set: it is bounded by construction.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, Literal

import anyio
import anyio.abc

from .._errors import CheckpointError, DaemonDiedError, ProtocolError
from .._wire import _protocol as p
from ._spawner import ForkedProcess, start_daemon

log = logging.getLogger("aiodcp")
_daemon_log = logging.getLogger("aiodcp.daemon")


def _read_all(fd: int) -> str:
    """Everything in the start-up pipe (its writer has exited), then close it."""
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")


_READ_CHUNK = 1 << 16
_REAP_AFTER_KILL = 10.0


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


State = Literal["starting", "serving", "retiring", "exited"]
TRANSITIONS: dict[str, frozenset[str]] = {
    "starting": frozenset({"serving", "retiring", "exited"}),
    "serving": frozenset({"retiring", "exited"}),
    "retiring": frozenset({"exited"}),
    "exited": frozenset(),
}


class Generation:
    """A running daemon. Create with :meth:`spawn`; it runs in the owner's task group."""

    def __init__(
        self,
        number: int,
        process: anyio.abc.Process | ForkedProcess,
        sock: socket.socket,
        rank: int,
        on_message: Callable[[Generation, p.Message], None],
        on_exit: Callable[[Generation], Awaitable[None]],
    ) -> None:
        self.number = number
        self.process = process
        self.pid: int = process.pid
        self.sock = sock
        self.rank = rank
        self.conn = p.Connection(p.Role.PARENT)
        self._state: State = "starting"
        self.pending: dict[int, Any] = {}  # req_id -> SaveHandle sent to this daemon
        self.arenas: set[int] = set()  # arenas this daemon has mapped
        self.returncode: int | None = None
        self.init_error: CheckpointError | None = None
        self.ready = anyio.Event()
        self.exited = anyio.Event()
        self._on_message = on_message
        self._on_exit = on_exit
        self._queue: deque[tuple[memoryview, int | None]] = deque()
        self._queued = anyio.Event()
        self._reader_done = anyio.Event()
        self.stopping = False  # we asked it to go: its exit is no surprise

    def __repr__(self) -> str:
        return f"<Generation {self.number} pid {self.pid} {self.state}>"

    @property
    def state(self) -> State:
        return self._state

    def _move(self, state: State) -> None:
        """Enter ``state`` (:data:`TRANSITIONS`; retiring again is a no-op); an illegal
        move raises."""
        if state == self._state == "retiring":
            return
        if state not in TRANSITIONS[self._state]:
            raise RuntimeError(f"{self!r}: illegal move {self._state} -> {state}")
        self._state = state

    @property
    def alive(self) -> bool:
        return self.state == "serving" and self.conn.state is p.State.SERVING

    # ------------------------------------------------------------------ start
    @classmethod
    async def spawn(
        cls,
        tg: anyio.abc.TaskGroup,
        number: int,
        config: p.DaemonConfig,
        *,
        init_timeout: float,
        on_message: Callable[[Generation, p.Message], None],
        on_exit: Callable[[Generation], Awaitable[None]],
    ) -> Generation:
        """Spawn the daemon and wait (cancellably, within ``init_timeout``) for ``Ready``."""
        process, channel = await start_daemon(
            ["--config", json.dumps(asdict(config))], start_timeout=init_timeout
        )
        # The daemon's ends are closed already: a dead daemon is EOF at once.
        parent_sock, startup_r = channel.parent, channel.startup_r
        parent_sock.setblocking(False)
        gen = cls(number, process, parent_sock, config.rank, on_message, on_exit)
        tg.start_soon(gen._run, name=f"aiodcp daemon generation {number} pid {gen.pid}")
        try:
            with anyio.fail_after(init_timeout):
                async with anyio.create_task_group() as race:

                    async def _died() -> None:
                        await gen.exited.wait()
                        race.cancel_scope.cancel()

                    race.start_soon(_died)
                    await gen.ready.wait()
                    race.cancel_scope.cancel()
        except TimeoutError:
            os.close(startup_r)
            await gen.kill()
            raise CheckpointError(
                f"checkpoint daemon (pid {gen.pid}) did not initialise within {init_timeout}s"
            ) from None
        except BaseException:
            os.close(startup_r)
            await gen.kill()
            raise
        if gen.state != "serving":
            await gen.kill()
            tb = await anyio.to_thread.run_sync(_read_all, startup_r)  # the child is gone: EOF
            if gen.init_error is not None:
                raise gen.init_error
            last = tb.strip().splitlines()[-1] if tb.strip() else ""
            raise DaemonDiedError(
                f"checkpoint daemon (pid {gen.pid}) {describe_exit(gen.returncode)} "
                "during start-up" + (f": {last}" if last else ""),
                returncode=gen.returncode,
                remote_traceback=tb,
            )
        os.close(startup_r)
        return gen

    # ---------------------------------------------------------------- tasks
    async def _run(self) -> None:
        """The generation's life: its tasks run until its process is reaped."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._supervised, self._read_loop, "reader")
                tg.start_soon(self._supervised, self._flush_loop, "flusher")
                self.returncode = await self.process.wait()
                # Replies the daemon sent before it exited are still in the socket.
                with anyio.move_on_after(2.0):
                    await self._reader_done.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if self.returncode is None:  # our owner is being torn down: no orphan
                    self._signal(signal.SIGKILL)
                    with anyio.move_on_after(_REAP_AFTER_KILL):
                        self.returncode = await self.process.wait()
                self._move("exited")
                self.exited.set()
                self.sock.close()
                if not self.stopping:
                    log.warning(
                        "[rank %d] checkpoint daemon pid %d %s",
                        self.rank,
                        self.pid,
                        describe_exit(self.returncode),
                    )
                await self._supervised(self._on_exit, "exit handler", self)

    async def _supervised(self, fn: Callable[..., Awaitable[None]], what: str, *args: Any) -> None:
        try:
            await fn(*args)
        except Exception:
            log.exception("[rank %d] daemon pid %d: %s failed", self.rank, self.pid, what)
            if what == "reader":
                self._signal(signal.SIGKILL)

    async def _read_loop(self) -> None:
        try:
            while True:
                await anyio.wait_readable(self.sock)
                try:
                    data = self.sock.recv(_READ_CHUNK)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                self.conn.receive_data(data)
                while True:
                    ev = self.conn.next_event()
                    if ev is p.NEED_DATA:
                        break
                    if isinstance(ev, p.Closed):
                        if self.state == "serving":
                            self._move("retiring")  # EOF: the process is on its way out
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
            self._signal(signal.SIGKILL)
        finally:
            self._reader_done.set()

    def _handle(self, msg: p.Message) -> None:
        if isinstance(msg, p.Hello):
            return
        if isinstance(msg, p.Ready):
            if self.state == "starting":
                self._move("serving")
            self.ready.set()
        elif isinstance(msg, p.InitFailed):
            self.init_error = CheckpointError(
                f"checkpoint daemon (pid {self.pid}) failed to initialise: "
                f"{msg.error_type}: {msg.message}\n{msg.traceback}"
            )
            self._move("retiring")
            self.ready.set()
        elif isinstance(msg, p.Log):
            _daemon_log.log(msg.level, "[rank %d daemon %d] %s", self.rank, self.pid, msg.message)
        else:
            if isinstance(msg, p.SaveFailed) and msg.fatal:
                self._move("retiring")  # it exits after this reply
            self._on_message(self, msg)

    async def _flush_loop(self) -> None:
        while True:
            await self._queued.wait()
            self._queued = anyio.Event()
            while self._queue:
                await anyio.wait_writable(self.sock)
                if not self._write_some():
                    return

    # ------------------------------------------------------------------ API
    def send(self, msg: p.Message, fd: int | None = None) -> bool:
        """Write ``msg`` (and ``fd``) to the daemon now; False if it is gone.

        Raises :class:`ProtocolError` at once for a message the protocol forbids.
        ``fd`` is duplicated into the kernel's socket buffer before this returns
        (or, if the socket is full, kept open by us until it is).
        """
        if self.state == "exited" or self.conn.state is p.State.CLOSED:
            return False  # gone, or its channel is at EOF: the exit watch reports it
        frame = self.conn.send(msg)
        self._queue.append((memoryview(frame), None if fd is None else os.dup(fd)))
        if len(self._queue) == 1 and not self._write_some():
            return False
        if self._queue:
            self._queued.set()
        return True

    def _write_some(self) -> bool:
        """Write queued frames until the socket is full; False if the channel is broken."""
        while self._queue:
            data, fd = self._queue[0]
            try:
                if fd is not None:
                    n = self.sock.sendmsg(
                        [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
                    )
                else:
                    n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                self._drop_queue()
                return False
            if fd is not None:
                os.close(fd)  # the kernel holds its own reference now
            rest = data[n:]
            if rest:
                self._queue[0] = (rest, None)
                continue
            self._queue.popleft()
        return True

    def _drop_queue(self) -> None:
        while self._queue:
            _, fd = self._queue.popleft()
            if fd is not None:
                os.close(fd)

    def _signal(self, sig: int) -> None:
        if self.process.returncode is None:
            try:
                self.process.send_signal(signal.Signals(sig))
            except ProcessLookupError:  # pragma: no cover
                pass

    async def kill(self) -> None:
        """SIGKILL and reap. Shielded and bounded."""
        with anyio.CancelScope(shield=True):
            self.stopping = True
            if self.state != "exited":
                self._move("retiring")
            self._signal(signal.SIGKILL)
            with anyio.move_on_after(_REAP_AFTER_KILL):
                await self.process.wait()

    async def stop(self, grace: float) -> None:
        """Terminate -> wait ``grace`` -> SIGTERM -> 5 s -> SIGKILL -> reap. Shielded,
        bounded (``grace`` + 5 s + 10 s at worst) whatever any task did."""
        with anyio.CancelScope(shield=True):
            self.stopping = True
            if self.process.returncode is None and self.state != "exited":
                if self.state == "serving":
                    self._move("retiring")
                    try:
                        self.send(p.Terminate())
                    except ProtocolError:
                        pass
                with anyio.move_on_after(grace):
                    await self.process.wait()
            if self.process.returncode is None:
                log.warning(
                    "daemon pid %d did not exit within %.1fs; sending SIGTERM", self.pid, grace
                )
                self._signal(signal.SIGTERM)
                with anyio.move_on_after(5.0):
                    await self.process.wait()
            if self.process.returncode is None:
                log.warning("daemon pid %d survived SIGTERM; sending SIGKILL", self.pid)
                await self.kill()
            with anyio.move_on_after(_REAP_AFTER_KILL):
                await self.exited.wait()  # its own task reports the exit (bounded anyway)
