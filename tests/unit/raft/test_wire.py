"""Raft messages survive the trip through protobuf bytes exactly, and bad bytes are refused."""

from __future__ import annotations

import pytest

from dcl.api.dcl.v1 import raft_pb2 as pb
from dcl.errors import InvalidRequest
from dcl.raft.types import (
    AppendEntries,
    AppendResponse,
    Entry,
    EntryType,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Message,
    RequestVote,
    SnapshotMeta,
    SnapshotResponse,
    TimeoutNow,
    VoteResponse,
)
from dcl.raft.wire import decode_message, encode_message, encode_message_into

META = SnapshotMeta(7, 2, frozenset({"a", "b"}), frozenset({"c"}))

MESSAGES: list[Message] = [
    AppendEntries(3, "a", "b", 10, 2, (
        Entry(3, 11, EntryType.NORMAL, b"\x01payload"),
        Entry(3, 12, EntryType.CONF_CHANGE, b"cc"),
        Entry(3, 13, EntryType.NORMAL, b""),
    ), 9, want_response=False),
    # All-default fields: an empty body must still decode as its kind, not "no body".
    AppendEntries(0, "a", "b", 0, 0, (), 0),
    AppendResponse(0, "b", "a", 0),
    AppendResponse(4, "b", "a", 12, reject=True, hint_index=5, hint_term=1),
    RequestVote(0, "a", "b", 0, 0),
    RequestVote(5, "a", "b", 20, 4, pre_vote=True, transfer=True),
    VoteResponse(0, "b", "a", False),
    VoteResponse(5, "b", "a", True, pre_vote=True),
    Heartbeat(0, "a", "b", 0),
    Heartbeat(5, "a", "b", 18, context=77),
    HeartbeatResponse(0, "b", "a"),
    HeartbeatResponse(5, "b", "a", context=77),
    HeartbeatResponse(5, "b", "a", context=78, disk_low=True),
    InstallSnapshot(5, "a", "b", META, 0, b"", False),
    InstallSnapshot(5, "a", "b", META, 4096, b"\x00" * 100, True),
    InstallSnapshot(5, "a", "b", META, 0, b"\x01" * 10, False, size=1 << 40),
    SnapshotResponse(0, "b", "a", 0, 0),
    SnapshotResponse(5, "b", "a", 7, 4196, done=True),
    TimeoutNow(5, "a", "b"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_kind_round_trips_through_bytes(message: Message) -> None:
    wire = encode_message(message, "127.0.0.1:8400").SerializeToString()
    decoded = pb.RaftMessage.FromString(wire)
    assert decoded.src_addr == "127.0.0.1:8400"
    assert decode_message(decoded) == message


def test_a_batch_built_in_place_holds_every_message_in_order() -> None:
    batch = pb.RaftBatch()
    for m in MESSAGES:
        encode_message_into(batch.messages.add(), m)
    parsed = pb.RaftBatch.FromString(batch.SerializeToString())
    assert [decode_message(p) for p in parsed.messages] == MESSAGES
    assert all(p.src_addr == "" for p in parsed.messages)


def test_a_message_without_a_body_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="without a body"):
        decode_message(pb.RaftMessage(term=1, src="a", dst="b"))


def test_a_message_without_src_or_dst_is_refused() -> None:
    raw = encode_message(TimeoutNow(1, "a", "b"))
    raw.dst = ""
    with pytest.raises(InvalidRequest, match="src/dst"):
        decode_message(raw)


def test_an_unknown_entry_type_is_refused() -> None:
    raw = encode_message(AppendEntries(1, "a", "b", 0, 0, (Entry(1, 1),), 0))
    raw.append.entries[0].type = 99
    with pytest.raises(InvalidRequest, match="entry type"):
        decode_message(raw)
