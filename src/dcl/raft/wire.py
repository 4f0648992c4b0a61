"""Conversion between the core's message values and the dcl.v1 Raft protobufs.

The core stays free of protobuf; this module is the only place that knows both shapes, so a
new message type needs exactly one encoder and one decoder here.
"""

from __future__ import annotations

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

__all__ = ["decode_message", "encode_message", "encode_message_into", "payload_bytes"]


def _meta_to_pb(meta: SnapshotMeta) -> pb.RaftSnapshotMeta:
    return pb.RaftSnapshotMeta(
        index=meta.index, term=meta.term, voters=sorted(meta.voters),
        learners=sorted(meta.learners),
    )


def encode_message(m: Message, src_addr: str = "") -> pb.RaftMessage:
    """Core message -> protobuf. `src_addr` lets receivers learn where the sender serves."""
    out = pb.RaftMessage()
    encode_message_into(out, m, src_addr)
    return out


def payload_bytes(m: Message) -> int:
    """The bulk bytes m puts on the wire (entry data, a snapshot chunk); framing excluded.

    Cheap (no encoding), so a sender can size its batches before building them.
    """
    if isinstance(m, AppendEntries):
        return sum(len(e.data) for e in m.entries)
    if isinstance(m, InstallSnapshot):
        return len(m.data)
    return 0


def encode_message_into(out: pb.RaftMessage, m: Message, src_addr: str = "") -> None:
    """Fill `out` (e.g. ``batch.messages.add()``) in place.

    Building sub-messages in place, not constructing them and `CopyFrom`-ing them into a
    parent, matters for AppendEntries: entry payloads are the bulk of replication traffic and
    every intermediate message would copy them once more.
    """
    out.term, out.src, out.dst = m.term, m.src, m.dst
    if src_addr:
        out.src_addr = src_addr
    if isinstance(m, AppendEntries):
        a = out.append
        a.prev_index, a.prev_term, a.commit = m.prev_index, m.prev_term, m.commit
        a.want_response = m.want_response
        add = a.entries.add
        for e in m.entries:
            add(term=e.term, index=e.index, type=int(e.type), data=e.data)
        if not m.entries:
            a.SetInParent()
    elif isinstance(m, AppendResponse):
        r = out.append_response
        r.index, r.reject, r.hint_index, r.hint_term = m.index, m.reject, m.hint_index, m.hint_term
        r.SetInParent()
    elif isinstance(m, RequestVote):
        v = out.vote
        v.last_index, v.last_term, v.pre_vote, v.transfer = (
            m.last_index, m.last_term, m.pre_vote, m.transfer)
        v.SetInParent()
    elif isinstance(m, VoteResponse):
        vr = out.vote_response
        vr.granted, vr.pre_vote = m.granted, m.pre_vote
        vr.SetInParent()
    elif isinstance(m, Heartbeat):
        h = out.heartbeat
        h.commit, h.context = m.commit, m.context
        h.SetInParent()
    elif isinstance(m, HeartbeatResponse):
        hr = out.heartbeat_response
        hr.context, hr.disk_low = m.context, m.disk_low
        hr.SetInParent()
    elif isinstance(m, InstallSnapshot):
        sn = out.snapshot
        sn.meta.CopyFrom(_meta_to_pb(m.meta))
        sn.offset, sn.data, sn.done, sn.size = m.offset, m.data, m.done, m.size
    elif isinstance(m, SnapshotResponse):
        sr = out.snapshot_response
        sr.index, sr.offset, sr.done = m.index, m.offset, m.done
        sr.SetInParent()
    else:
        out.timeout_now.SetInParent()


def decode_message(p: pb.RaftMessage) -> Message:
    """Protobuf -> core message; a message with no known body is the sender's fault."""
    kind = p.WhichOneof("body")
    t, s, d = p.term, p.src, p.dst
    if not s or not d:
        raise InvalidRequest("raft message without src/dst")
    if kind == "append":
        a = p.append
        try:
            entries = tuple(Entry(e.term, e.index, EntryType(e.type), e.data) for e in a.entries)
        except ValueError as exc:
            raise InvalidRequest(f"bad raft entry type: {exc}") from None
        return AppendEntries(t, s, d, a.prev_index, a.prev_term, entries, a.commit,
                             a.want_response)
    if kind == "append_response":
        r = p.append_response
        return AppendResponse(t, s, d, r.index, r.reject, r.hint_index, r.hint_term)
    if kind == "vote":
        v = p.vote
        return RequestVote(t, s, d, v.last_index, v.last_term, v.pre_vote, v.transfer)
    if kind == "vote_response":
        return VoteResponse(t, s, d, p.vote_response.granted, p.vote_response.pre_vote)
    if kind == "heartbeat":
        return Heartbeat(t, s, d, p.heartbeat.commit, p.heartbeat.context)
    if kind == "heartbeat_response":
        hr = p.heartbeat_response
        return HeartbeatResponse(t, s, d, hr.context, hr.disk_low)
    if kind == "snapshot":
        sn = p.snapshot
        meta = SnapshotMeta(sn.meta.index, sn.meta.term, frozenset(sn.meta.voters),
                            frozenset(sn.meta.learners))
        return InstallSnapshot(t, s, d, meta, sn.offset, sn.data, sn.done, sn.size)
    if kind == "snapshot_response":
        r2 = p.snapshot_response
        return SnapshotResponse(t, s, d, r2.index, r2.offset, r2.done)
    if kind == "timeout_now":
        return TimeoutNow(t, s, d)
    raise InvalidRequest("raft message without a body")
