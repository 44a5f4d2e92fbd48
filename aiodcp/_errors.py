"""The exception hierarchy. Errors are named by the state they report."""

from __future__ import annotations

__all__ = [
    "CheckpointCancelledError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "DaemonDiedError",
    "ProtocolError",
    "PublisherGoneError",
    "SaveFailedError",
    "WorkerDiedError",
]


class CheckpointError(Exception):
    """Base class of every error aiodcp raises about a checkpoint or its daemon."""


class DaemonDiedError(CheckpointError):
    """The checkpoint daemon is gone (crashed, killed, or its channel broke).

    ``returncode`` is the daemon's exit status as :mod:`subprocess` reports it
    (negative: killed by that signal), ``step`` the save that was in flight, if any,
    ``remote_traceback`` the daemon's own traceback when it died of an exception while
    starting (an import that failed), else empty.
    """

    def __init__(
        self,
        message: str,
        *,
        returncode: int | None = None,
        step: int | None = None,
        remote_traceback: str = "",
    ):
        super().__init__(message)
        self.returncode = returncode
        self.step = step
        self.remote_traceback = remote_traceback


WorkerDiedError = DaemonDiedError
"""The same class, by its older name (the daemon was once called the worker)."""


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


class PublisherGoneError(CheckpointError):
    """The publisher a reader followed exited without closing (killed, crashed).

    Versions the reader still holds stay readable until released; what it copied
    is its own."""


class CheckpointCorruptError(CheckpointError):
    """A committed step's files do not match what was committed.

    A file ``.metadata`` or the commit manifest names is missing, shorter than
    needed, or (when checksums are checked) its bytes changed. ``step`` and
    ``file`` (a name inside the step directory) say where; either may be None.
    """

    def __init__(self, message: str, *, step: int | None = None, file: str | None = None):
        super().__init__(message)
        self.step = step
        self.file = file

    def __reduce__(self) -> tuple[object, ...]:  # keeps step/file across ranks (pickle)
        return (_rebuild, (type(self), self.args, self.__dict__))


class CheckpointMismatchError(CheckpointError):
    """The state dict does not fit the checkpoint: keys it lacks, or other shapes.

    ``missing``: keys of the state dict the checkpoint does not have;
    ``mismatched``: key -> (shape in the state dict, shape in the checkpoint, None
    where the checkpoint holds a python object there);
    ``unexpected``: keys only the checkpoint has (not an error by themselves:
    as in DCP, a state dict may load a subset of a checkpoint).
    """

    def __init__(
        self,
        message: str,
        *,
        step: int | None = None,
        missing: tuple[str, ...] = (),
        unexpected: tuple[str, ...] = (),
        mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...] | None]] | None = None,
    ):
        super().__init__(message)
        self.step = step
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = dict(mismatched or {})

    def __reduce__(self) -> tuple[object, ...]:  # keeps the key lists across ranks (pickle)
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(
    cls: type[BaseException], args: tuple[object, ...], state: dict[str, object]
) -> BaseException:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc
