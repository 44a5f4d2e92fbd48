"""The state every part of :class:`aiodcp.AsyncCheckpointer` shares, declared once.

``AsyncCheckpointer`` is assembled from one module per concern (``_saving``,
``_outcomes``, ``_preempt``); this base declares the attributes it sets and the
methods each part may call on another, for the type checker only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from .._disk._store import Store
from .._errors import DaemonDiedError
from ._dist import Group
from ._generation import Generation
from ._guard import Guard
from ._handle import SaveEvent, SaveHandle, SaveResult
from ._slots import SlotPool
from ._supervisor import Supervisor

__all__ = ["Parts"]


class Parts:
    # set by AsyncCheckpointer.__init__ / open
    root: Path | str
    store: Store
    when_busy: str
    on_event: Callable[[SaveEvent], None] | None
    _group: Group | None
    _tg: anyio.abc.TaskGroup | None
    _daemons: Supervisor | None
    _slots: SlotPool
    _inflight: set[SaveHandle]  # not yet settled (see SaveHandle)
    _guards: list[Guard]
    _loop_thread: int | None  # ident of the thread running the event loop
    _unobserved: list[SaveHandle]
    _next_req: int
    _high_step: int
    _reserved: set[int]
    _host_done: anyio.Event | None
    _body_scope: anyio.CancelScope | None
    _receivers: list[Any]
    preempted: int | None

    if TYPE_CHECKING:  # provided by the other parts of AsyncCheckpointer

        def _check_open(self) -> None:
            raise NotImplementedError

        def _spawn(self, fn: Callable[..., Awaitable[None]], *args: Any, name: str) -> None:
            raise NotImplementedError

        async def wait(self) -> None:
            raise NotImplementedError

        @property
        def rank(self) -> int:
            raise NotImplementedError

        def _finish(
            self, handle: SaveHandle, result: SaveResult | None, error: BaseException | None
        ) -> bool:
            raise NotImplementedError

        def _emit(self, handle: SaveHandle, phase: Any, written: int, total: int) -> None:
            raise NotImplementedError

        def _died_error(self, gen: Generation, step: int | None) -> DaemonDiedError:
            raise NotImplementedError

        def _send_cancel(self, handle: SaveHandle) -> None:
            raise NotImplementedError

        def _settle(self, handle: SaveHandle) -> None:
            raise NotImplementedError

        async def _reserve_publication(self, version: int) -> Any:
            raise NotImplementedError
