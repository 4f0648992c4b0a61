"""The single mapping from dcl.errors to gRPC statuses."""

from __future__ import annotations

import pytest
from grpclib.const import Status

from dcl.client.errors import from_status
from dcl.errors import (
    CorruptRecord,
    DclError,
    InsufficientStorage,
    InvalidRequest,
    NotLeader,
    OffsetOutOfRange,
    PermissionDenied,
    Unavailable,
)
from dcl.server.errors import LEADER_METADATA_KEY, grpc_status
from dcl.storage import LogClosed

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidRequest("bad"), Status.INVALID_ARGUMENT),
        (OffsetOutOfRange(9, 0, 3), Status.OUT_OF_RANGE),
        (NotLeader("n1", "h:1"), Status.FAILED_PRECONDITION),
        (PermissionDenied("nobody", "produce"), Status.PERMISSION_DENIED),
        (Unavailable("no leader"), Status.UNAVAILABLE),
        (CorruptRecord("/x/0.store", 17), Status.DATA_LOSS),
        (InsufficientStorage("n1", 10, 20), Status.RESOURCE_EXHAUSTED),
        (LogClosed("closed"), Status.UNAVAILABLE),
        (DclError("unclassified"), Status.INTERNAL),
    ],
)
def test_each_error_maps_to_its_status(error: DclError, status: Status) -> None:
    assert grpc_status(error)[0] is status


def test_subclasses_inherit_their_parents_status() -> None:
    class Stale(OffsetOutOfRange):
        pass

    assert grpc_status(Stale(1))[0] is Status.OUT_OF_RANGE


def test_out_of_range_message_names_the_offset() -> None:
    assert "123" in grpc_status(OffsetOutOfRange(123, 0, 5))[1]


def test_a_client_rebuilds_out_of_range_with_the_range_the_server_named() -> None:
    """Across the wire only the status message travels: the held range must survive it (a
    reader below a retention cut learns where the log starts), and so must the wording."""
    status, message, _ = grpc_status(OffsetOutOfRange(0, 5120, 9000))
    assert status is Status.OUT_OF_RANGE and message is not None
    back = from_status(status, message, offset=0)
    assert isinstance(back, OffsetOutOfRange)
    assert (back.offset, back.lowest, back.next_offset) == (0, 5120, 9000)
    assert str(back) == message
    bare = from_status(Status.OUT_OF_RANGE, None, offset=7)
    assert isinstance(bare, OffsetOutOfRange) and bare.lowest is None
    assert str(bare) == "offset out of range: 7"


def test_a_client_tells_a_full_disk_from_an_oversize_message() -> None:
    """Both are RESOURCE_EXHAUSTED, but a retry of the first succeeds once space is freed
    and a retry of the second never does: the client must get the disk's own error, with
    the node and figures the server named, and still InvalidRequest for the other."""
    status, message, _ = grpc_status(InsufficientStorage("node-0", 1000, 268435456))
    assert status is Status.RESOURCE_EXHAUSTED
    back = from_status(status, message)
    assert isinstance(back, InsufficientStorage)
    assert (back.node, back.free_bytes, back.reserve_bytes) == ("node-0", 1000, 268435456)
    assert str(back) == message and "--min-free-bytes" in message
    for error in (InsufficientStorage("n1", 5 << 30, 1 << 28, snapshot_bytes=6 << 30),
                  InsufficientStorage.of_peers(["n2", "n3"], 3),
                  InsufficientStorage.of_peers(["n2"], 2)):
        status, message, _ = grpc_status(error)
        back = from_status(status, message)
        assert isinstance(back, InsufficientStorage) and str(back) == str(error)
        assert (back.node, back.free_bytes, back.reserve_bytes, back.snapshot_bytes) == (
            error.node, error.free_bytes, error.reserve_bytes, error.snapshot_bytes)
    snapshot = InsufficientStorage("n1", 5 << 30, 1 << 28, snapshot_bytes=6 << 30)
    assert "plus the 6442450944 the snapshot" in str(snapshot)
    assert "node n2 has no room on disk" in str(InsufficientStorage.of_peers(["n2"], 2))
    oversize = from_status(Status.RESOURCE_EXHAUSTED, "message of 9 bytes exceeds the limit")
    assert type(oversize) is InvalidRequest
    assert str(oversize) == "message of 9 bytes exceeds the limit"


def test_not_leader_carries_the_leader_address_in_trailing_metadata() -> None:
    assert grpc_status(NotLeader("n1", "10.0.0.2:8400"))[2] == {
        LEADER_METADATA_KEY: "10.0.0.2:8400"
    }
    assert grpc_status(NotLeader())[2] == {}


def test_unexpected_errors_are_internal_without_leaking_details() -> None:
    status, message, metadata = grpc_status(KeyError("/secret/path"))
    assert (status, metadata) == (Status.INTERNAL, {})
    assert "secret" not in message
