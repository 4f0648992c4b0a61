"""Client-side errors, and the one place where gRPC statuses become dcl.errors again.

The server maps each dcl.errors exception to a status (dcl.server.errors); ``from_status``
is the inverse, so callers of dcl.client catch the same hierarchy the server raises.
"""

from __future__ import annotations

from grpclib.const import Status

from dcl.errors import (
    DclError,
    InsufficientStorage,
    InvalidRequest,
    NotLeader,
    OffsetOutOfRange,
    PermissionDenied,
    Unavailable,
)

__all__ = [
    "BatchPartiallyWritten",
    "ProduceOutcomeUnknown",
    "RemoteError",
    "from_status",
]


class ProduceOutcomeUnknown(DclError):
    """A produce request may or may not have been appended; the client did not retry it.

    Raised when the request left this process and no answer came back: the call timed out,
    the connection broke after the request was sent, or the server answered UNAVAILABLE /
    DEADLINE_EXCEEDED (which it also uses when it shuts down while the append is being made
    durable). Retrying could append the records twice; whether to do so is the caller's call.

    For ``produce_batch``, ``written`` values (from ``first_offset``) were acknowledged
    before the chunk whose outcome is unknown.
    """

    def __init__(
        self,
        address: str,
        cause: BaseException,
        *,
        written: int = 0,
        first_offset: int | None = None,
    ):
        self.address = address
        self.cause = cause
        self.written = written
        self.first_offset = first_offset
        super().__init__(f"outcome of produce to {address} is unknown: {cause!r}")


class BatchPartiallyWritten(DclError):
    """A multi-chunk ``produce_batch`` failed definitely after earlier chunks were appended.

    The first ``written`` values were acknowledged from ``first_offset``; the rest were not
    appended (``cause`` says why).
    """

    def __init__(self, first_offset: int, written: int, cause: DclError):
        self.first_offset = first_offset
        self.written = written
        self.cause = cause
        super().__init__(f"batch partially written ({written} values from {first_offset}): {cause}")


class RemoteError(DclError):
    """A status with no closer dcl.errors counterpart (INTERNAL, DATA_LOSS, UNKNOWN, ...)."""

    def __init__(self, status: Status, message: str | None):
        self.status = status
        super().__init__(f"{status.name}: {message or ''}")


def _with_message(error: DclError, message: str | None) -> DclError:
    # Keep the server's wording (it names the real bounds/subject) over our reconstruction.
    if message:
        error.args = (message,)
    return error


def from_status(
    status: Status,
    message: str | None,
    *,
    offset: int | None = None,
    leader_addr: str | None = None,
) -> DclError:
    """The dcl.errors exception a status stands for (inverse of dcl.server.errors)."""
    if status is Status.OUT_OF_RANGE:
        return OffsetOutOfRange.from_message(-1 if offset is None else offset, message or "")
    if status in (Status.PERMISSION_DENIED, Status.UNAUTHENTICATED):
        return _with_message(PermissionDenied("<this client>", "call"), message)
    if status in (Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED):
        return Unavailable(f"{status.name}: {message or ''}")
    if status is Status.RESOURCE_EXHAUSTED and (message or "").startswith(
            InsufficientStorage.PREFIX):
        return InsufficientStorage.from_message(message or "")
    if status in (Status.INVALID_ARGUMENT, Status.RESOURCE_EXHAUSTED):
        return InvalidRequest(message or status.name)
    if status is Status.FAILED_PRECONDITION:
        return _with_message(NotLeader(leader_addr=leader_addr), message)
    return RemoteError(status, message)
