"""Preemption: ``handle_signals()`` and the task that answers a signal.

Part of :class:`aiodcp.AsyncCheckpointer` (a mixin).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread

from .._errors import (
    CheckpointError,
)
from ._handle import SaveHandle
from ._parts import Parts

log = logging.getLogger("aiodcp")

__all__ = ["Preemption"]


class Preemption(Parts):
    def handle_signals(
        self,
        *signals: int,
        grace: float = 30.0,
        final_save: Callable[[], Any] | None = None,
    ) -> None:
        """Opt in to preemption handling: on one of ``signals`` (e.g. SIGTERM), finish up.

        The signal receiver is installed before this returns. The signal is then
        received on the event loop (never in a plain signal handler). Within
        ``grace`` seconds: ``final_save()`` is awaited if given (it may return a
        :class:`SaveHandle`, which is awaited too), every in-flight save is
        awaited until committed, and the ``async with`` body is cancelled; the
        block then exits with ``SystemExit(128 + signal)``. Saves still in flight
        when the grace period ends are cancelled, never published. An error in
        ``final_save`` is logged and does not stop the rest.
        """
        self._check_open()
        if self._host_done is not None:
            raise RuntimeError("handle_signals() needs `async with AsyncCheckpointer(...)`")
        if not signals:
            raise ValueError("name at least one signal, e.g. signal.SIGTERM")
        receiver = _Receiver(tuple(signal.Signals(s) for s in signals))  # installed now
        self._receivers.append(receiver)
        self._spawn(self._preemption, receiver, grace, final_save, name="preemption")

    def _restore_signals(self) -> None:
        """Give the program its own handlers back (at close, on the loop's thread):
        whether or not the preemption task ever ran, the last installed first."""
        while self._receivers:
            self._receivers.pop().close()

    async def _preemption(
        self,
        receiver: _Receiver,
        grace: float,
        final_save: Callable[[], Any] | None,
    ) -> None:
        signum = 0
        try:
            async for signum in receiver.received:  # noqa: B007  (the first one is enough)
                break
        finally:
            receiver.close()
        log.warning("received signal %d: committing in-flight saves (grace %.0fs)", signum, grace)
        self.preempted = int(signum)
        with anyio.move_on_after(grace) as scope:
            try:
                if final_save is not None:
                    result = final_save()
                    if hasattr(result, "__await__"):
                        result = await result
                    if isinstance(result, SaveHandle):
                        await result
            except Exception as exc:
                log.error("final checkpoint on signal %d failed: %r", signum, exc)
            try:
                await self.wait()
            except CheckpointError as exc:
                log.error("in-flight checkpoint on signal %d failed: %s", signum, exc)
        if scope.cancelled_caught:
            log.error("grace period of %.0fs ran out; cancelling in-flight saves", grace)
        if self._body_scope is not None:
            self._body_scope.cancel()


class _Receiver:
    """anyio's signal receiver, and the handlers it replaced (restored by :meth:`close`).

    On asyncio and uvloop, leaving the receiver sets ``SIG_DFL``, not the handler that
    was there before: a later SIGTERM would kill a program whose own handler it was.
    """

    def __init__(self, signals: tuple[signal.Signals, ...]) -> None:
        self._previous = {s: signal.getsignal(s) for s in signals}
        self._cm = anyio.open_signal_receiver(*signals)
        self.received: AsyncIterator[int] = self._cm.__enter__()
        self._open = True

    def close(self) -> None:
        """Idempotent; on the thread that installed it (the event loop's, the main one)."""
        if not self._open:
            return
        self._open = False
        try:
            self._cm.__exit__(None, None, None)
        finally:
            for sig, handler in self._previous.items():
                if handler is not None:  # None: not installed from Python, nothing to restore
                    signal.signal(sig, handler)
