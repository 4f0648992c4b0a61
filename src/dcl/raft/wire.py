"""Conversion between the core's message values and the dcl.v1 Raft protobufs.

The core stays free of protobuf; this module is the only place that knows both shapes, so a
new message type needs exactly one encoder and one decoder here.
"""

from __future__ import annotations

from collections.abc import Iterable

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

__all__ = ["decode_message", "encode_message"]


def _meta_to_pb(meta: SnapshotMeta) -> pb.RaftSnapshotMeta:
    return pb.RaftSnapshotMeta(
        index=meta.index, term=meta.term, voters=sorted(meta.voters),
        learners=sorted(meta.learners),
    )


def _entries_to_pb(entries: Iterable[Entry]) -> list[pb.RaftEntry]:
    return [pb.RaftEntry(term=e.term, index=e.index, type=int(e.type), data=e.data)
            for e in entries]


def encode_message(m: Message, src_addr: str = "") -> pb.RaftMessage:
    """Core message -> protobuf. `src_addr` lets receivers learn where the sender serves."""
    out = pb.RaftMessage(term=m.term, src=m.src, dst=m.dst, src_addr=src_addr)
    if isinstance(m, AppendEntries):
        out.append.CopyFrom(pb.AppendEntriesMsg(
            prev_index=m.prev_index, prev_term=m.prev_term, entries=_entries_to_pb(m.entries),
            commit=m.commit, want_response=m.want_response))
    elif isinstance(m, AppendResponse):
        out.append_response.CopyFrom(pb.AppendResponseMsg(
            index=m.index, reject=m.reject, hint_index=m.hint_index, hint_term=m.hint_term))
    elif isinstance(m, RequestVote):
        out.vote.CopyFrom(pb.RequestVoteMsg(
            last_index=m.last_index, last_term=m.last_term, pre_vote=m.pre_vote,
            transfer=m.transfer))
    elif isinstance(m, VoteResponse):
        out.vote_response.CopyFrom(pb.VoteResponseMsg(granted=m.granted, pre_vote=m.pre_vote))
    elif isinstance(m, Heartbeat):
        out.heartbeat.CopyFrom(pb.HeartbeatMsg(commit=m.commit, context=m.context))
    elif isinstance(m, HeartbeatResponse):
        out.heartbeat_response.CopyFrom(pb.HeartbeatResponseMsg(context=m.context))
    elif isinstance(m, InstallSnapshot):
        out.snapshot.CopyFrom(pb.InstallSnapshotMsg(
            meta=_meta_to_pb(m.meta), offset=m.offset, data=m.data, done=m.done))
    elif isinstance(m, SnapshotResponse):
        out.snapshot_response.CopyFrom(pb.SnapshotResponseMsg(
            index=m.index, offset=m.offset, done=m.done))
    else:
        out.timeout_now.SetInParent()
    return out


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
        return HeartbeatResponse(t, s, d, p.heartbeat_response.context)
    if kind == "snapshot":
        sn = p.snapshot
        meta = SnapshotMeta(sn.meta.index, sn.meta.term, frozenset(sn.meta.voters),
                            frozenset(sn.meta.learners))
        return InstallSnapshot(t, s, d, meta, sn.offset, sn.data, sn.done)
    if kind == "snapshot_response":
        r2 = p.snapshot_response
        return SnapshotResponse(t, s, d, r2.index, r2.offset, r2.done)
    if kind == "timeout_now":
        return TimeoutNow(t, s, d)
    raise InvalidRequest("raft message without a body")
