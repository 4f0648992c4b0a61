"""The error hierarchy shared by every layer.

Each error says whose fault a failure is, so the server can map it to a gRPC status in exactly
one place (dcl.server) and clients can decide whether a retry can help.
"""

from __future__ import annotations

import re

#: How `OffsetOutOfRange` names the range the log holds, in its message (and so on the wire).
_HELD = re.compile(r"\(log holds \[(\d+), (\d+)\)\)")
#: How `InsufficientStorage` names the node and its figures, in its message.
_STORAGE = re.compile(r"node (\S+) has (\d+) bytes of disk free, below its reserve of (\d+)"
                      r"(?: \(--min-free-bytes\) plus the (\d+))?")
#: How `InsufficientStorage.of_peers` names the nodes without room.
_STORAGE_PEERS = re.compile(r"nodes? (.+?) ha(?:ve|s) no room on disk")


class DclError(Exception):
    """Root of every error DCL Store raises on purpose."""


class InvalidRequest(DclError):
    """The caller sent something malformed or out of bounds (its fault; do not retry)."""


class OffsetOutOfRange(DclError):
    """The requested offset is not in the log (below its start or at/after its end)."""

    def __init__(self, offset: int, lowest: int | None = None, next_offset: int | None = None):
        self.offset = offset
        self.lowest = lowest
        self.next_offset = next_offset
        detail = f"offset out of range: {offset}"
        if lowest is not None and next_offset is not None:
            detail += f" (log holds [{lowest}, {next_offset}))"
        super().__init__(detail)

    @classmethod
    def from_message(cls, offset: int, message: str) -> OffsetOutOfRange:
        """Rebuilt on the client from the server's status message, with the held range when
        the message names one (a reader below a retention cut learns where the log starts)."""
        held = _HELD.search(message)
        error = cls(offset, int(held[1]), int(held[2])) if held else cls(offset)
        if message:
            error.args = (message,)  # the server's wording
        return error


class CorruptRecord(DclError):
    """Bytes on disk fail their checksum or framing: never served as data."""

    def __init__(self, path: str, position: int, reason: str = "checksum mismatch"):
        self.path = path
        self.position = position
        self.reason = reason
        super().__init__(f"corrupt record in {path} at position {position}: {reason}")


class NotLeader(DclError):
    """This node cannot accept the write; `leader_hint` names the node that may."""

    def __init__(self, leader_id: str | None = None, leader_addr: str | None = None):
        self.leader_id = leader_id
        self.leader_addr = leader_addr
        super().__init__(f"not the leader (leader: {leader_addr or leader_id or 'unknown'})")


class PermissionDenied(DclError):
    """The caller's identity may not perform this action."""

    def __init__(self, subject: str, action: str):
        self.subject = subject
        self.action = action
        super().__init__(f"{subject!r} may not {action}")


class Unavailable(DclError):
    """The cluster cannot serve the request now (no leader, shutting down); retry may help."""


class InsufficientStorage(DclError):
    """The node's disk has less free space than its reserve (`--min-free-bytes`): it takes
    no new records until space is freed. Nothing was appended, so a retry cannot duplicate;
    it succeeds once retention or an operator frees space.

    Its wire form (RESOURCE_EXHAUSTED, a message starting with `PREFIX`) is how clients tell
    it from an oversize message, which shares the status but will never succeed."""

    PREFIX = "insufficient storage: "

    def __init__(
        self, node: str, free_bytes: int, reserve_bytes: int, *, snapshot_bytes: int = 0
    ) -> None:
        self.node = node
        #: -1 where not known here (a follower's disk, `of_peers`). Above the reserve when
        #: the room lacking is for `snapshot_bytes`: a snapshot that must free the node's
        #: in-memory Raft log before it takes more.
        self.free_bytes = free_bytes
        self.reserve_bytes = reserve_bytes
        self.snapshot_bytes = snapshot_bytes
        below = (f"below its reserve of {reserve_bytes} (--min-free-bytes)" if not snapshot_bytes
                 else f"below its reserve of {reserve_bytes} (--min-free-bytes) plus the "
                      f"{snapshot_bytes} the snapshot that must free its Raft log first needs")
        super().__init__(
            f"{self.PREFIX}node {node} has {free_bytes} bytes of disk free, {below}; nothing "
            "was appended, and writes resume once space is freed")

    @classmethod
    def of_peers(cls, low: list[str], voters: int) -> InsufficientStorage:
        """Too few voters have room for a quorum: `low` are below their reserve."""
        error = cls(", ".join(low), -1, -1)
        nodes = f"nodes {', '.join(low)} have" if len(low) > 1 else f"node {low[0]} has"
        error.args = (
            f"{cls.PREFIX}{nodes} no room on disk for new records (--min-free-bytes), which "
            f"leaves fewer than a quorum of the {voters} voters to take them; nothing was "
            "appended, and writes resume once space is freed",)
        return error

    @classmethod
    def from_message(cls, message: str) -> InsufficientStorage:
        """Rebuilt on the client from the server's status message (its figures included)."""
        found = _STORAGE.search(message)
        peers = _STORAGE_PEERS.search(message)
        error = (cls(found[1], int(found[2]), int(found[3]),
                     snapshot_bytes=int(found[4] or 0)) if found
                 else cls(peers[1] if peers else "<unknown>", -1, -1))
        error.args = (message,)  # the server's wording
        return error


class CommitTimeout(DclError):
    """A write was proposed but its commit was not seen in time: it may or may not be in the
    log. Retrying it can duplicate the record, so clients must treat the outcome as unknown."""
