"""The one place where DCL errors become gRPC statuses.

Handlers raise dcl.errors exceptions; ``send_error`` turns them into trailers. Keeping the
mapping here means every service, present and future (Raft, admin), answers a given failure
with the same status, and clients can rely on it (e.g. FAILED_PRECONDITION + ``dcl-leader``
trailing metadata means "retry on that node").
"""

from __future__ import annotations

import logging
from typing import Any

import h2.exceptions
from grpclib.const import Status
from grpclib.exceptions import ProtocolError, StreamTerminatedError
from grpclib.server import Stream

from dcl.errors import (
    CommitTimeout,
    CorruptRecord,
    DclError,
    InsufficientStorage,
    InvalidRequest,
    NotLeader,
    OffsetOutOfRange,
    PermissionDenied,
    Unavailable,
)
from dcl.storage import LogClosed

__all__ = ["LEADER_METADATA_KEY", "grpc_status", "send_error"]

log = logging.getLogger(__name__)

#: Trailing metadata key naming the leader's RPC address on FAILED_PRECONDITION.
LEADER_METADATA_KEY = "dcl-leader"

_STATUS: dict[type, Status] = {
    InvalidRequest: Status.INVALID_ARGUMENT,
    OffsetOutOfRange: Status.OUT_OF_RANGE,
    NotLeader: Status.FAILED_PRECONDITION,
    PermissionDenied: Status.PERMISSION_DENIED,
    Unavailable: Status.UNAVAILABLE,
    CorruptRecord: Status.DATA_LOSS,
    # The disk is below its reserve: nothing appended; a retry succeeds once space is freed.
    InsufficientStorage: Status.RESOURCE_EXHAUSTED,
    # Proposed but not seen committed in time: the client must treat the outcome as unknown.
    CommitTimeout: Status.DEADLINE_EXCEEDED,
    # The node is shutting down under the call: another node (or a retry) can serve it.
    LogClosed: Status.UNAVAILABLE,
}


def grpc_status(exc: BaseException) -> tuple[Status, str, dict[str, str]]:
    """Status, message and trailing metadata for exc; INTERNAL for anything unexpected."""
    for cls in type(exc).__mro__:
        status = _STATUS.get(cls)
        if status is not None:
            metadata: dict[str, str] = {}
            if isinstance(exc, NotLeader) and exc.leader_addr:
                metadata[LEADER_METADATA_KEY] = exc.leader_addr
            return status, str(exc), metadata
    if isinstance(exc, DclError):
        return Status.INTERNAL, str(exc), {}
    # Do not leak internals (paths, reprs) to clients; the traceback goes to the log.
    return Status.INTERNAL, "internal error", {}


async def send_error(stream: Stream[Any, Any], exc: BaseException) -> bool:
    """Finish stream with the status exc maps to; False if the client was already gone.

    Unexpected (non-DclError) exceptions are logged with their traceback: they are bugs, and
    the server keeps serving other calls. A client that already went away cannot receive the
    trailers; that is not an error worth more than a debug line.
    """
    status, message, metadata = grpc_status(exc)
    if not isinstance(exc, DclError):
        log.error("unexpected error in handler", exc_info=exc)
    try:
        await stream.send_trailing_metadata(
            status=status, status_message=message, metadata=metadata
        )
    except (ProtocolError, StreamTerminatedError, h2.exceptions.StreamClosedError) as err:
        log.debug("could not send error status=%s: %s", status.name, err)
        return False
    return True
