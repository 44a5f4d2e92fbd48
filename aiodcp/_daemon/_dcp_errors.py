"""The daemon's save errors, and DCP's ``CheckpointException`` translated into them.

DCP wraps each rank's failure in ``CheckpointException`` (a ``BaseException`` whose
message is a multi-line traceback). :func:`save` calls DCP and re-raises what caused
the failure, so the save path (``_persist``) and the writer (``_writer``) share one
vocabulary: :class:`SaveCancelled` (the ranks agreed to cancel), :class:`DaemonExiting`
(this daemon is going away), :class:`PeerFailed` (another rank's is), or the error.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DaemonExiting", "PeerFailed", "SaveCancelled", "is_cancellation", "save", "unwrap"]


class SaveCancelled(Exception):
    """Raised inside DCP's write path when a save is cancelled."""


class DaemonExiting(SaveCancelled):
    """Raised inside DCP's write path when this daemon is going away (SIGTERM, no parent).

    Its peers must not mistake it for a cancellation: for them it is a failure.
    """


class PeerFailed(Exception):
    """Another rank's daemon is exiting (or failed) in the middle of this save."""


def is_cancellation(exc: BaseException) -> bool:
    """A cancellation the ranks share (not this daemon going away)."""
    return isinstance(exc, SaveCancelled) and not isinstance(exc, DaemonExiting)


def save(state: dict[str, Any], *, writer: Any, planner: Any, rank: int, pg: Any) -> Any:
    """DCP's ``save`` with ``writer``; a failure raises the exception that caused it.

    DCP wraps a rank's failure in ``CheckpointException`` (a ``BaseException``
    whose message is a multi-line traceback). The first failure is re-raised
    as itself when it is this rank's own and the only one (so a cancellation
    stays a cancellation, an ``OSError`` an ``OSError``); otherwise as a
    ``RuntimeError`` naming the rank. A cancellation on any rank wins.
    """
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    try:
        return dcp_save(
            state, storage_writer=writer, planner=planner, process_group=pg, no_dist=pg is None
        )
    except CheckpointException as wrapped:
        raise unwrap(wrapped, rank) from None


def unwrap(wrapped: Any, rank: int) -> BaseException:
    """The exception inside DCP's ``CheckpointException`` (see :func:`save`)."""
    failures: dict[int, Any] = dict(getattr(wrapped, "failures", {}) or {})
    inner = {r: (f[0] if isinstance(f, tuple) else f) for r, f in sorted(failures.items())}
    own = inner.get(rank)
    if isinstance(own, DaemonExiting):
        return own  # this daemon is going away
    for r, exc in inner.items():
        if isinstance(exc, DaemonExiting):  # a peer going away is a failure, not a cancel
            return PeerFailed(f"the checkpoint daemon of rank {r} is exiting mid-save ({exc})")
    for exc in inner.values():
        if isinstance(exc, SaveCancelled):
            return exc
    if not inner:
        return RuntimeError(str(wrapped).splitlines()[0] if str(wrapped) else repr(wrapped))
    first_rank, first = next(iter(inner.items()))
    if first_rank == rank and len(inner) == 1 and isinstance(first, BaseException):
        return first
    return RuntimeError("; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, e in inner.items()))
