"""What a save gives back: ``SaveHandle`` (in flight), ``SaveResult`` (done), ``SaveEvent``.

A handle moves through these states (:data:`TRANSITIONS`; an illegal move raises)::

    state        entered when                            held by
    ----------   -------------------------------------   -------------------------------
    staging      save() took a slot and a step           the save's stage task (it owns
                                                         the copy thread, the slot, the fd)
    persisting   its Save frame is in the daemon's        its daemon Generation
                 socket (``staged()`` has resolved)
    done         committed | failed | cancelled           nobody

Only the holder finishes a handle: before the frame is sent the stage task (or
the checkpointer's close), after it the generation it was sent to -- by its
reply, or by its own death. Independently of that, the handle's *copy thread*
holds the staging slot until it has stopped: a handle that is done while its
copy still runs (its caller was cancelled) gives the slot back only when the
copy ends, and only then is it *settled* (``ckpt.wait()`` waits for that).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio

from .._errors import CheckpointCancelledError

__all__ = ["TRANSITIONS", "SaveEvent", "SaveHandle", "SaveResult"]

HandleState = Literal["staging", "persisting", "done"]
TRANSITIONS: dict[str, frozenset[str]] = {
    "staging": frozenset({"persisting", "done"}),
    "persisting": frozenset({"done"}),
    "done": frozenset(),
}


@dataclass(frozen=True)
class SaveResult:
    """What a committed (or skipped) save produced."""

    step: int
    path: Path | str
    """The step's directory; for an object-store root its URL (``s3://bucket/prefix/step_N``)."""
    nbytes: int
    """Bytes of tensor data staged and written."""
    stage_seconds: float
    """Time the caller was held (``save()``), or staging took (``overlap=True``)."""
    persist_seconds: float
    """Time the daemon took to write, make durable and commit."""
    skipped: bool = False
    """True when ``when_busy="skip"`` dropped this save; nothing was written."""
    recovered: bool = False
    """True when the daemon died after the commit point and the outcome (committed)
    was re-read from disk rather than reported by the daemon."""
    _store: Any = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def metadata(self) -> Any:
        """DCP's ``Metadata`` of the checkpoint (``None`` when skipped).

        Read from ``path/.metadata`` on first access (it can be large: tens of MB
        for 100,000 tensors), so a save that nobody inspects costs nothing here.
        It is unpickled admitting only the types DCP writes there.

        Raises:
            CheckpointNotFoundError: the step's ``.metadata`` is gone (deleted since).
            CheckpointCorruptError: it is not DCP metadata (never unpickled with
                other globals).
        """
        if self.skipped:
            return None
        from .._disk._safe import load_metadata

        if isinstance(self.path, str):  # an object store: fetch it, then read it the same way
            import tempfile

            with tempfile.TemporaryDirectory(prefix="aiodcp-meta-") as tmp:
                local = self._store.download_step(self.step, Path(tmp), names=[".metadata"])
                return load_metadata(local, self.step)
        return load_metadata(self.path, self.step)  # only the types DCP writes there


@dataclass(frozen=True)
class SaveEvent:
    """Progress of one save, for UIs and notebooks (see ``on_event``)."""

    step: int
    phase: Literal["staged", "writing", "written", "uploading", "committed", "failed", "skipped"]
    """``uploading``: an object-store root's upload of this rank's files (``bytes_written``
    of ``total_bytes`` sent), after ``written``."""
    bytes_written: int
    total_bytes: int
    seconds: float
    """Seconds since ``save()`` was called."""


class SaveHandle:
    """A save in flight. ``await handle`` returns its :class:`SaveResult` once committed.

    Awaiting is safe to cancel (e.g. under ``anyio.fail_after``): the save goes
    on, only the waiting stops. :meth:`cancel` cancels the save itself.
    """

    def __init__(self, step: int, cancel: Callable[[SaveHandle], None] | None = None) -> None:
        self.step = step
        self._cancel_hook = cancel
        self._req_id = -1
        self._event = anyio.Event()
        self._staged_event = anyio.Event()
        self._staged_flag = threading.Event()  # the sources may change (guards wait on it)
        self._buffers_flag = threading.Event()  # guarded modules' buffers are copied
        self._settled = anyio.Event()  # done, and its copy has stopped: slot given back
        self._state: HandleState = "staging"
        self._result: SaveResult | None = None
        self._error: BaseException | None = None
        self._observed = False
        self._cancel_requested = False
        self._t0 = time.perf_counter()
        self._stage_seconds = 0.0
        self._nbytes = 0
        # the save's copy not yet handed to its daemon: (CopyThread, Generation, overwrite);
        # whoever hands it over (its stage task or a guard) sets this to None
        self._copying: Any = None
        self._copy: Any = None  # its CopyThread: holds the slot until it has stopped
        self._copy_error: BaseException | None = None  # set by the copy thread itself
        self._ticket: Any = None  # save(publish=True): its place in the publisher's ring
        self._copy_reported = False  # a guard has reported the copy's failure
        self._overwrite = False
        self._gen: Any = None  # the Generation it was sent to
        self._slot: Any = None  # the staging slot it holds until done

    def done(self) -> bool:
        """True once the save is committed, failed or cancelled."""
        return self._event.is_set()

    def is_staged(self) -> bool:
        """True once the state has been copied: the caller may mutate it again."""
        return self._staged_flag.is_set()

    async def staged(self) -> None:
        """Wait until the state has been copied out (the tensors may then be mutated).

        Resolves at once for a save made without ``overlap=True``; also resolves
        when the save failed or was cancelled before its copy finished (then
        nothing reads the tensors any more). Cancelling this wait cancels nothing.
        """
        await self._staged_event.wait()

    def cancel(self) -> bool:
        """Ask the daemon to abort this save at its next write boundary.

        Returns False if the save already finished. If the save reaches its
        commit point first, it commits and ``await handle`` returns normally;
        otherwise ``await handle`` raises :class:`CheckpointCancelledError` and
        nothing is published. With several ranks, the step is cancelled on all.
        """
        if self.done():
            return False
        self._cancel_requested = True
        if self._cancel_hook is not None:
            self._cancel_hook(self)
        return True

    def result(self) -> SaveResult:
        """The result of a finished save (raises its error); never waits."""
        if not self.done():
            raise anyio.WouldBlock(f"save of step {self.step} is still in flight")
        self._observed = True
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    async def wait(self) -> SaveResult:
        """Same as ``await handle``."""
        await self._event.wait()
        return self.result()

    def __await__(self) -> Generator[Any, None, SaveResult]:
        return self.wait().__await__()

    def __repr__(self) -> str:
        state = "staging" if not self.is_staged() else "persisting"
        if self.done():
            state = "failed" if self._error is not None else "committed"
        return f"<SaveHandle step={self.step} {state}>"

    # -- holder side
    def _move(self, state: HandleState) -> None:
        """Enter ``state``; a move :data:`TRANSITIONS` does not allow raises."""
        if state not in TRANSITIONS[self._state]:
            raise RuntimeError(f"save of step {self.step}: illegal move {self._state} -> {state}")
        self._state = state

    def _finish(self, result: SaveResult | None, error: BaseException | None) -> bool:
        """Resolve once; False if already resolved."""
        if self.done():
            return False
        self._move("done")
        self._result, self._error = result, error
        if isinstance(error, CheckpointCancelledError) and self._cancel_requested:
            self._observed = True  # the caller asked for it
        self._staged_flag.set()
        self._buffers_flag.set()
        self._staged_event.set()
        self._event.set()
        return True
