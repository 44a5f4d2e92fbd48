"""The exception hierarchy. Errors are named by the state they report."""

from __future__ import annotations

__all__ = [
    "CheckpointCancelledError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "ProtocolError",
    "SaveFailedError",
    "WorkerDiedError",
]


class CheckpointError(Exception):
    """Base class of every error aiodcp raises about a checkpoint or its daemon."""


class WorkerDiedError(CheckpointError):
    """The checkpoint daemon is gone (crashed, killed, or its channel broke).

    ``returncode`` is the daemon's exit status as :mod:`subprocess` reports it
    (negative: killed by that signal), ``step`` the save that was in flight, if any.
    """

    def __init__(self, message: str, *, returncode: int | None = None, step: int | None = None):
        super().__init__(message)
        self.returncode = returncode
        self.step = step


class SaveFailedError(CheckpointError):
    """The daemon tried the save and it failed; the daemon itself keeps serving.

    ``remote_type`` and ``remote_traceback`` describe the exception in the daemon.
    """

    def __init__(
        self,
        message: str,
        *,
        step: int | None = None,
        remote_type: str = "",
        remote_traceback: str = "",
    ):
        super().__init__(message)
        self.step = step
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback


class CheckpointCancelledError(CheckpointError):
    """The save was cancelled before it was committed; nothing was published."""

    def __init__(self, message: str, *, step: int | None = None):
        super().__init__(message)
        self.step = step


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint matches the request."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """The step is already committed (pass ``overwrite=True`` to replace it)."""


class ProtocolError(CheckpointError):
    """A frame on the parent/daemon channel is malformed or out of order."""
