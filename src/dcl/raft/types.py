"""Values exchanged between the Raft core (`dcl.raft.core`) and its driver.

Everything here is an immutable value: the core never mutates a message or entry it received
or emitted, so a simulator may duplicate, reorder or re-deliver the same object freely.

Node ids are strings (the same names SWIM gossip uses), so `dcl.errors.NotLeader(leader_id)`
can carry them unchanged.

Wire/disk encoding of entries: `Entry.encode()` gives "one type byte followed by the opaque
payload" (the payload of a NORMAL entry is the application's protobuf record batch), so the FSM
can route an entry without parsing its payload. Term and index are stored by the raft log
storage next to it and are not part of that encoding.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Protocol

from dcl.errors import DclError, InvalidRequest, Unavailable

NodeId = str


class RandomSource(Protocol):
    """The randomness the core needs: a `random.Random` (seeded in the simulator) fits."""

    def randint(self, a: int, b: int) -> int:
        """Return an integer N with a <= N <= b."""
        ...


class EntryType(enum.IntEnum):
    """What an entry carries; the value is the first byte of `Entry.encode()`."""

    NORMAL = 0
    NOOP = 1
    CONF_CHANGE = 2


@dataclass(frozen=True, slots=True)
class Entry:
    """One raft log entry. Invariant (Log Matching): two logs holding an entry with the same
    (index, term) hold identical entries up to and including it."""

    term: int
    index: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""

    def encode(self) -> bytes:
        """Type byte + opaque payload (term and index are stored alongside by the log)."""
        return bytes((self.type,)) + self.data

    @staticmethod
    def decode(term: int, index: int, raw: bytes | memoryview) -> Entry:
        """Inverse of `encode()`."""
        if len(raw) == 0:
            raise InvalidRequest("empty raft entry encoding")
        return Entry(term, index, EntryType(raw[0]), bytes(raw[1:]))


class ConfChangeType(enum.IntEnum):
    """Single-server membership changes (Raft thesis §4.1), one at a time."""

    ADD_LEARNER = 0
    PROMOTE_LEARNER = 1
    REMOVE_NODE = 2
    # Adds a voter directly. Used by bootstrap (one entry per initial voter at term 1); allowed
    # for operators too, but the safe path for a new server is ADD_LEARNER then PROMOTE_LEARNER.
    ADD_VOTER = 3


_CONF_HEADER = struct.Struct(">BH")


@dataclass(frozen=True, slots=True)
class ConfChange:
    """A membership change carried in a CONF_CHANGE entry. It takes effect on every node as
    soon as the entry is APPENDED to that node's log (not when committed), and is reverted if
    the entry is truncated away."""

    type: ConfChangeType
    node_id: NodeId

    def encode(self) -> bytes:
        """Compact form: type (u8), id length (u16 big-endian), UTF-8 id."""
        raw = self.node_id.encode()
        return _CONF_HEADER.pack(self.type, len(raw)) + raw

    @staticmethod
    def decode(raw: bytes | memoryview) -> ConfChange:
        """Inverse of `encode()`."""
        if len(raw) < _CONF_HEADER.size:
            raise InvalidRequest("truncated conf change")
        kind, n = _CONF_HEADER.unpack_from(raw, 0)
        body = bytes(raw[_CONF_HEADER.size : _CONF_HEADER.size + n])
        if len(body) != n:
            raise InvalidRequest("truncated conf change id")
        return ConfChange(ConfChangeType(kind), body.decode())


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be durable before any message emitted with it is sent: current term, the
    vote cast in that term (None: not voted), and the commit index (an optimisation only:
    losing it is safe)."""

    term: int = 0
    vote: NodeId | None = None
    commit: int = 0


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """Where a snapshot sits in the log and the membership in force at that index."""

    index: int
    term: int
    voters: frozenset[NodeId]
    learners: frozenset[NodeId] = frozenset()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Snapshot metadata plus the application's opaque state bytes (taken at meta.index).

    `data` is bytes, or a read-only memoryview (a snapshot file mapped by RaftStorage, so a
    large snapshot lives in the page cache rather than on the heap).
    """

    meta: SnapshotMeta
    data: bytes | memoryview


class SnapshotSpool(Protocol):
    """Where a follower assembles the chunks of a snapshot it is receiving.

    A snapshot is as large as the application's state, so the driver gives the core one
    that spools to a file (`dcl.raft.storage.FileSpool`); the core itself, and the
    simulator, use `MemorySpool`.
    """

    def __len__(self) -> int: ...

    def restart(self, first: bytes) -> None:
        """Drop what is held and start over with `first` (b"" to hold nothing)."""

    def extend(self, chunk: bytes) -> None:
        """Append the next chunk."""

    def take(self) -> bytes | memoryview:
        """The assembled bytes, read-only; the spool holds nothing afterwards."""


class MemorySpool:
    """A SnapshotSpool on the heap."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def __len__(self) -> int:
        return len(self._buf)

    def restart(self, first: bytes) -> None:
        self._buf = bytearray(first)

    def extend(self, chunk: bytes) -> None:
        self._buf += chunk

    def take(self) -> memoryview:
        # A view, not a copy: the buffer is replaced, never written again.
        buf, self._buf = self._buf, bytearray()
        return memoryview(buf).toreadonly()


@dataclass(frozen=True, slots=True)
class ReadState:
    """Result of `read_index(request_id)`: once the local applied index reaches `index`, a read
    served from local state is linearizable."""

    request_id: int
    index: int


# --------------------------------------------------------------------------- messages
# Every message carries `term`, `src` and `dst`. The core sends to ids it knows (voters and
# learners); the driver maps ids to addresses.
#
# Messages and Ready are immutable BY CONTRACT but not `frozen=True`: a frozen dataclass sets
# each field through object.__setattr__, which measured 780 ns per 7-field message against
# 100 ns here, and several are built per replicated round (bench/raft_core.py). Nobody --
# core, driver, simulator -- may mutate one after creation; use dataclasses.replace().
# Their payloads (Entry, SnapshotMeta, tuples, bytes) are truly immutable.


@dataclass(slots=True, unsafe_hash=True)
class AppendEntries:
    """Leader -> follower: entries following (prev_index, prev_term), and the leader's commit.

    `want_response=False` marks an empty append that only announces a new commit index to a
    follower whose whole log the leader already knows matches: a follower that accepts it
    does not answer (a rejection is still answered). Saves a message per follower per commit.
    """

    term: int
    src: NodeId
    dst: NodeId
    prev_index: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit: int
    want_response: bool = True

    @property
    def announces_commit_only(self) -> bool:
        return not self.want_response and not self.entries


@dataclass(slots=True, unsafe_hash=True)
class AppendResponse:
    """Follower -> leader. On success `index` is the last index now known to match the leader
    (and persisted, by the driver contract). On rejection `index` is the rejected prev_index and
    (hint_index, hint_term) is the follower's last entry that may still match: the leader skips
    back to it in one round trip instead of one entry per round trip."""

    term: int
    src: NodeId
    dst: NodeId
    index: int
    reject: bool = False
    hint_index: int = 0
    hint_term: int = 0


@dataclass(slots=True, unsafe_hash=True)
class RequestVote:
    """Candidate (or pre-candidate when `pre_vote`) -> voters. For a pre-vote, `term` is the
    term the sender WOULD campaign in; nobody changes term because of it. `transfer` marks a
    campaign started by TimeoutNow, which voters honour even within a leader lease."""

    term: int
    src: NodeId
    dst: NodeId
    last_index: int
    last_term: int
    pre_vote: bool = False
    transfer: bool = False


@dataclass(slots=True, unsafe_hash=True)
class VoteResponse:
    """Voter -> (pre-)candidate. A granted pre-vote echoes the requested term."""

    term: int
    src: NodeId
    dst: NodeId
    granted: bool
    pre_vote: bool = False


@dataclass(slots=True, unsafe_hash=True)
class Heartbeat:
    """Leader -> follower: asserts leadership. `commit` is min(leader commit, follower's match)
    so it never points past what the follower is known to hold. `context` is the leader's
    latest ReadIndex sequence number, echoed in the response."""

    term: int
    src: NodeId
    dst: NodeId
    commit: int
    context: int = 0


@dataclass(slots=True, unsafe_hash=True)
class HeartbeatResponse:
    """Follower -> leader: echoes `context` (confirms leadership for ReadIndex). `disk_low`:
    the follower takes no new entries for lack of disk (set by its driver, not the core)."""

    term: int
    src: NodeId
    dst: NodeId
    context: int = 0
    disk_low: bool = False


@dataclass(slots=True, unsafe_hash=True)
class InstallSnapshot:
    """Leader -> follower: one chunk of the leader's snapshot, `data` starts at byte `offset`
    of the snapshot data; `done` marks the last chunk; `size`: the whole snapshot's bytes."""

    term: int
    src: NodeId
    dst: NodeId
    meta: SnapshotMeta
    offset: int
    data: bytes
    done: bool
    size: int = 0


@dataclass(slots=True, unsafe_hash=True)
class SnapshotResponse:
    """Follower -> leader: `offset` is the next byte the follower expects of the snapshot at
    `index` (0 means restart from the beginning). `done` means the snapshot was installed
    (and, by the driver contract, persisted) so the follower's log matches up to `index`."""

    term: int
    src: NodeId
    dst: NodeId
    index: int
    offset: int
    done: bool = False


@dataclass(slots=True, unsafe_hash=True)
class TimeoutNow:
    """Leader -> transfer target: campaign now, skipping pre-vote and leader leases."""

    term: int
    src: NodeId
    dst: NodeId


Message = (
    AppendEntries
    | AppendResponse
    | RequestVote
    | VoteResponse
    | Heartbeat
    | HeartbeatResponse
    | InstallSnapshot
    | SnapshotResponse
    | TimeoutNow
)


# --------------------------------------------------------------------------- driver output


@dataclass(slots=True, unsafe_hash=True)
class Ready:
    """Everything the driver must do, in this order:

    1. persist `snapshot` (if any) and reset the raft log to it;
    2. persist `entries`: truncate the stored log after `entries[0].index - 1`, then append;
    3. persist `hard_state` (if not None) -- steps 1-3 must be durable (fsync) before 4
       (if only `hard_state.commit` changed and nothing else is in 1-2, it needs no fsync of
       its own: losing a commit index is safe, it is relearned from the leader);
    4. send `messages` (they may acknowledge the entries/vote persisted above);
    5. restore the FSM from `snapshot` (if any), then apply `committed_entries` in order;
    6. hand `read_states` to waiting readers once applied >= their index;
    7. call `RaftNode.advance(ready)`.

    The one allowed relaxation: when `send_before_persist` is True (a leader, same term and
    vote as the previous Ready, and every message created while leader), the driver may do
    step 4 BEFORE steps 1-3 -- replication overlaps the leader's own fsync. It is safe because
    the leader counts itself toward a commit quorum only for entries acknowledged by `advance`,
    and none of these messages acknowledges anything; `hard_state` can then differ from the
    durable one only in its commit index, which is safe to lose. Steps 5-7 still wait for
    steps 1-3.
    """

    hard_state: HardState | None = None
    entries: tuple[Entry, ...] = ()
    messages: tuple[Message, ...] = ()
    committed_entries: tuple[Entry, ...] = ()
    snapshot: Snapshot | None = None
    read_states: tuple[ReadState, ...] = ()
    send_before_persist: bool = False

    def is_empty(self) -> bool:
        """True when the driver has nothing to do for this Ready."""
        return (
            self.hard_state is None
            and not self.entries
            and not self.messages
            and not self.committed_entries
            and self.snapshot is None
            and not self.read_states
        )


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class Mutations:
    """Deliberate bugs for mutation testing of the simulator; all False in production.

    Each flag breaks exactly one rule so the simulator's invariant checks can be shown to catch
    it. The core checks each flag with a single attribute read on the relevant path.
    """

    # Grant votes without the §5.4.1 "candidate's log is at least as up-to-date" check.
    skip_log_up_to_date_check: bool = False
    # Commit entries of earlier terms by counting replicas (the Figure 8 bug, §5.4.2).
    commit_previous_term_by_counting: bool = False
    # Leave the vote out of HardState, so a restarted node may vote twice in one term.
    skip_persist_vote: bool = False
    # Follower accepts AppendEntries whose prev_term does not match its log (only checks index).
    skip_term_check_on_append: bool = False
    # Leader counts its own unpersisted entries toward the commit quorum.
    count_unpersisted_self: bool = False
    # ReadIndex answers immediately, without confirming leadership with a quorum.
    read_index_without_quorum: bool = False


class ProgressState(enum.Enum):
    """Leader's replication mode for one peer (as in etcd-io/raft)."""

    PROBE = "probe"  # one append in flight until a response: finding the match point
    REPLICATE = "replicate"  # pipelined, up to max_inflight_msgs appends in flight
    SNAPSHOT = "snapshot"  # sending InstallSnapshot chunks; appends paused


class Role(enum.Enum):
    """Node role as seen by status readers."""

    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"
    LEARNER = "learner"  # a follower that is not a voter (learner, not yet added, or removed)


@dataclass(frozen=True, slots=True)
class Config:
    """Tuning knobs. Time is counted in ticks; the driver decides how long a tick is."""

    election_tick: int = 10
    heartbeat_tick: int = 1
    max_entries_per_msg: int = 1024
    max_bytes_per_msg: int = 1 << 20
    max_inflight_msgs: int = 256
    #: In-flight appends to a follower that are read back from storage (entries below the
    #: snapshot): each holds its own copy of up to `max_bytes_per_msg` until answered.
    max_inflight_retained: int = 8
    snapshot_chunk_size: int = 1 << 20
    pre_vote: bool = True
    check_quorum: bool = True
    #: When commit advances with nothing new to replicate, hold the empty appends that tell
    #: followers until the driver calls `RaftNode.announce_commit` (or a later append or
    #: heartbeat carries the index). A steady writer's next append then carries it, and
    #: nobody pays for two extra messages and an extra answer per write.
    defer_commit_announcement: bool = False
    mutations: Mutations = field(default_factory=Mutations)

    def __post_init__(self) -> None:
        if self.heartbeat_tick < 1 or self.election_tick <= self.heartbeat_tick:
            raise InvalidRequest("need 1 <= heartbeat_tick < election_tick")
        if (
            self.max_entries_per_msg < 1
            or self.max_inflight_msgs < 1
            or self.max_inflight_retained < 1
        ):
            raise InvalidRequest(
                "max_entries_per_msg, max_inflight_msgs and max_inflight_retained must be >= 1")
        if self.snapshot_chunk_size < 1:
            raise InvalidRequest("snapshot_chunk_size must be >= 1")


@dataclass(frozen=True, slots=True)
class PeerProgress:
    """Leader's view of one peer, for status readers."""

    match: int
    next: int
    state: ProgressState
    is_learner: bool
    recent_active: bool
    inflight: int
    #: Heard from in this or the previous election-timeout window (recent_active resets at
    #: each window, so alone it can read False for a healthy peer just after a reset).
    #: Windows exist only with check_quorum (the default); without it this stays True.
    heard_recently: bool = False


@dataclass(frozen=True, slots=True)
class Status:
    """A consistent snapshot of a node's state, for the admin API, logs and the simulator."""

    id: NodeId
    role: Role
    term: int
    vote: NodeId | None
    leader_id: NodeId | None
    commit_index: int
    applied_index: int
    first_index: int
    last_index: int
    last_term: int
    voters: frozenset[NodeId]
    learners: frozenset[NodeId]
    progress: dict[NodeId, PeerProgress] = field(hash=False, compare=True)
    transferee: NodeId | None = None


# --------------------------------------------------------------------------- errors


class ProposalDropped(Unavailable):
    """The leader cannot take this proposal now (transfer in progress, conf change pending,
    no entry committed in its term yet); retry later, possibly at another node."""


class InvalidConfChange(InvalidRequest):
    """The conf change makes no sense for the current membership (caller's fault)."""


class SafetyViolation(DclError):
    """The core detected a broken Raft invariant (e.g. asked to overwrite a committed entry).

    Never raised in a correct cluster; raised instead of silently diverging so the simulator
    (and a production node) stop at the first sign of a bug or a lost fsync.
    """
