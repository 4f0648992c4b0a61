"""The Raft consensus core: a pure, deterministic state machine (sans-I/O, etcd-io/raft style).

No clock, no randomness of its own, no I/O. The driver (production asyncio driver or the
deterministic simulator) feeds it inputs and executes its outputs:

Inputs
    `tick()`                      one unit of logical time (elections, heartbeats, leases).
    `step(message)`               a message from a peer (types in `dcl.raft.types`).
    `propose(data)` / `propose_batch(datas)` / `propose_conf_change(cc)`
                                  leader only; raise `dcl.errors.NotLeader(leader_id)` elsewhere
                                  and `ProposalDropped` while a transfer or conf change blocks.
    `transfer_leadership(to)`     leader hands over to a caught-up voter.
    `read_index(request_id)`      linearizable read barrier; leader only (followers raise
                                  NotLeader with the leader hint: the caller forwards).
    `compact(index, data)`        the application took a snapshot at `index` (<= applied).
    `advance(ready)`              acknowledgement: everything in `ready` was done (see below).

Output: `has_ready()` / `ready()` -> `Ready`, then the driver does, IN ORDER:
    1. persist `ready.snapshot` (reset the stored raft log to it),
    2. persist `ready.entries` (truncate the stored log after entries[0].index - 1, append),
    3. persist `ready.hard_state`; steps 1-3 must be durable (fsync) before step 4,
    4. send `ready.messages`,
       (relaxation: if `ready.send_before_persist`, a leader may send first and overlap its
       own fsync with replication; see `Ready`),
    5. restore the FSM from the snapshot, then apply `ready.committed_entries` in order,
    6. serve `ready.read_states` once the applied index reaches their index,
    7. call `advance(ready)`; call `ready()` again only after that.

Why this order is safe ("persist before send"): every message that acknowledges state -- a
follower's AppendResponse for entries, a granted vote, a SnapshotResponse for an installed
snapshot -- is created after that state entered the core, so it rides in the same Ready as the
state or a later one; the driver makes the state durable before sending. A crash that loses
unpersisted state therefore never loses anything a peer was told about.

Group commit: every proposal made between two `ready()` calls lands in one Ready (one fsync)
and one AppendEntries per follower (sending is deferred to `has_ready()`/`ready()`). The leader
may send AppendEntries for entries it has not persisted yet (`Ready.send_before_persist`), but
counts ITS OWN log toward the commit quorum only up to the last index acknowledged by
`advance`. Commit advances reach followers at once (an empty AppendEntries if nothing else is
due), so followers apply without waiting for a heartbeat.

Snapshot data flow: the application passes the snapshot bytes to `compact(index, data)` after
making them durable itself; the core keeps the latest snapshot in memory and streams it in
`InstallSnapshot` chunks of `Config.snapshot_chunk_size` bytes (stop-and-wait per peer,
resent on heartbeat responses). A follower assembles the chunks in a `SnapshotSpool` (under the
driver, a scratch file); after the last one its Ready
carries `snapshot` (meta + bytes) to persist and restore, and its log is reset to it. On
restart the driver passes the latest persisted snapshot (meta + bytes) to the constructor.
A leader whose storage still holds the entries a follower lacks below the snapshot (the
`retained` source: retention on disk) sends those instead; the snapshot is the fallback.

Membership: derived from the snapshot metadata plus CONF_CHANGE entries in the log, effective
as soon as an entry is appended (reverted if the entry is truncated). One change at a time:
the leader refuses a new one while the last one is uncommitted, and until it has committed an
entry in its own term. A brand-new cluster is bootstrapped by passing the same
`bootstrap_voters` to every founding node: each writes identical ADD_VOTER entries at term 1
(committed by construction), so nodes added later learn the founders from the log.
A node that joins later starts with no state and no bootstrap_voters.

Leadership transfer: `transfer_leadership(to)` stops proposals (ProposalDropped), catches `to`
up, sends TimeoutNow; `to` campaigns at once without pre-vote, its RequestVote marked
`transfer` so voters ignore their leader lease. Aborted after an election timeout.

ReadIndex: the leader records its commit index, broadcasts heartbeats carrying a sequence
number (one round for all reads registered between two `ready()` calls), and emits
`ReadState(request_id, index)` once a quorum of voters echoed it; requests made before the
leader committed an entry in its term wait for that commit.

Pending ReadIndex requests and proposals are forgotten when a leader steps down; the driver
should fail/retry callers it has not heard back from (e.g. after a leader change).

Determinism: given the same inputs and the same rng sequence, the outputs are identical (no
iteration over sets or hash-ordered containers decides what is emitted), so a seeded simulator
replays exactly, whatever PYTHONHASHSEED is.

Errors: NotLeader (wrong node), ProposalDropped (retry later), InvalidConfChange /
InvalidRequest (caller bug), SafetyViolation (a broken Raft invariant: stop the node).

API stability: the public names in this module and `dcl.raft.types` are used by the simulator
(`tests/sim`); change them only compatibly and note it here. Changes so far (all compatible):
  * messages and Ready are slotted but not frozen (speed, see dcl.raft.types); never mutate;
  * Ready gained `send_before_persist` (default False);
  * RaftNode.status() -> Status added;
  * AppendEntries gained `want_response` (default True).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from dcl.errors import InvalidRequest, NotLeader
from dcl.raft.types import (
    AppendEntries,
    AppendResponse,
    ConfChange,
    ConfChangeType,
    Config,
    Entry,
    EntryType,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    InvalidConfChange,
    MemorySpool,
    Message,
    NodeId,
    PeerProgress,
    ProgressState,
    ProposalDropped,
    RandomSource,
    ReadState,
    Ready,
    RequestVote,
    Role,
    SafetyViolation,
    Snapshot,
    SnapshotMeta,
    SnapshotResponse,
    SnapshotSpool,
    Status,
    TimeoutNow,
    VoteResponse,
)

__all__ = ["RaftNode", "RetainedEntries"]

log = logging.getLogger(__name__)

#: The messages a driver may take out of a pending Ready (`_take_messages`).
_M = TypeVar("_M", Heartbeat, HeartbeatResponse)

#: `retained(prev, max_entries, max_bytes)`: the term of entry `prev` and the entries from
#: `prev + 1` on (at most `max_entries`, and `max_bytes` of payload unless the first alone is
#: larger), read back from storage; None when storage no longer holds `prev`. Asked only
#: for indexes at or below the snapshot index, all committed, so any copy is the right one.
RetainedEntries = Callable[[int, int, int], "tuple[int, Sequence[Entry]] | None"]

_PROBE = ProgressState.PROBE
_REPLICATE = ProgressState.REPLICATE
_SNAPSHOT = ProgressState.SNAPSHOT
_CONF = EntryType.CONF_CHANGE

# (index of the entry that made it effective, voters, learners)
_Membership = tuple[int, frozenset[NodeId], frozenset[NodeId]]


class _Progress:
    """Leader-side replication state for one peer.

    Invariants: match < next; entries (match, next) may be in flight; in REPLICATE `inflights`
    holds the last index of each unacknowledged AppendEntries (ascending, at most
    max_inflight_msgs); in PROBE at most one append is outstanding (`probe_sent`); in SNAPSHOT
    appends stop until the snapshot at `snap_index` is acknowledged.
    """

    __slots__ = (
        "commit_sent",
        "inflights",
        "is_learner",
        "match",
        "next",
        "prev_active",
        "probe_sent",
        "read_ack",
        "recent_active",
        "snap_index",
        "snap_offset",
        "state",
    )

    def __init__(self, next_index: int, is_learner: bool) -> None:
        self.match = 0
        self.next = next_index
        self.state = _PROBE
        self.probe_sent = False
        self.inflights: deque[int] = deque()
        self.recent_active = False
        self.prev_active = False  # recent_active of the previous check-quorum window
        self.snap_index = 0
        self.snap_offset = 0
        self.read_ack = 0
        self.is_learner = is_learner
        self.commit_sent = 0  # highest commit index sent to the peer (appends, heartbeats)

    def become_probe(self) -> None:
        self.state = _PROBE
        self.next = self.match + 1
        self.probe_sent = False
        self.inflights.clear()

    def become_replicate(self) -> None:
        self.state = _REPLICATE
        self.next = self.match + 1
        self.probe_sent = False
        self.inflights.clear()


def _payload_bytes(entries: Sequence[Entry]) -> int:
    return sum(len(e.data) for e in entries)


def _apply_conf_change(
    cc: ConfChange, voters: frozenset[NodeId], learners: frozenset[NodeId]
) -> tuple[frozenset[NodeId], frozenset[NodeId]]:
    """Total function: every node replays the same entries to the same membership, so it must
    never fail; the leader validates changes before proposing them."""
    node = cc.node_id
    kind = cc.type
    if kind is ConfChangeType.ADD_LEARNER:
        if node in voters:
            return voters, learners
        return voters, learners | {node}
    if kind is ConfChangeType.PROMOTE_LEARNER or kind is ConfChangeType.ADD_VOTER:
        return voters | {node}, learners - {node}
    return voters - {node}, learners - {node}


class RaftNode:
    """One Raft server's consensus state. Not thread-safe: one driver calls it at a time.

    Invariants kept between calls:
      * the log holds entries (snapshot.index, last_index], contiguous;
      * applied <= commit_index <= last_index and snapshot.index <= commit_index;
      * entries at or below commit_index are never truncated (SafetyViolation otherwise);
      * the membership in force is the last element of the membership history, which holds
        the snapshot's membership and one element per CONF_CHANGE entry in the log.
    """

    def __init__(
        self,
        node_id: NodeId,
        config: Config,
        rng: RandomSource,
        *,
        hard_state: HardState | None = None,
        snapshot: Snapshot | None = None,
        entries: Sequence[Entry] = (),
        bootstrap_voters: Iterable[NodeId] | None = None,
        applied: int = 0,
        spool: SnapshotSpool | None = None,
        retained: RetainedEntries | None = None,
    ) -> None:
        """Build the core from persisted state.

        `hard_state`, `snapshot` and `entries` (the persisted log after the snapshot) are what
        the driver read back from disk; everything passed here counts as persisted. `applied`
        is the index the FSM has durably applied (at least the snapshot index is assumed).
        `bootstrap_voters` is used only when there is no persisted state at all. `spool` is
        where a snapshot being received is assembled (default: in memory). `retained` reads
        entries compacted out of memory back from storage (see `RetainedEntries`).
        """
        self.id: NodeId = node_id
        self._cfg = config
        self._mut = config.mutations
        self._rng = rng
        hs = hard_state or HardState()
        self._term = hs.term
        self._vote: NodeId | None = hs.vote
        self._leader_id: NodeId | None = None
        self._role = Role.FOLLOWER

        self._snap: Snapshot | None = snapshot
        if snapshot is not None:
            self._snap_index = snapshot.meta.index
            self._snap_term = snapshot.meta.term
            membership: _Membership = (
                snapshot.meta.index,
                snapshot.meta.voters,
                snapshot.meta.learners,
            )
        else:
            self._snap_index = 0
            self._snap_term = 0
            membership = (0, frozenset(), frozenset())
        self._log: list[Entry] = []
        self._conf: list[_Membership] = [membership]
        expected = self._snap_index + 1
        for e in entries:
            if e.index <= self._snap_index:
                continue
            if e.index != expected:
                raise InvalidRequest(f"persisted entries not contiguous at index {e.index}")
            self._log.append(e)
            expected += 1
        self._record_conf_entries(self._log)
        #: Payload bytes of the entries in `_log`: what the log costs in memory.
        self._log_bytes = _payload_bytes(self._log)

        last = self.last_index
        self._persisted_index = last
        self._handed_index = last
        self._applied = max(applied, self._snap_index)
        self._commit = min(max(hs.commit, self._applied, self._snap_index), last)
        self._applied = min(self._applied, self._commit)
        self._applied_handed = self._applied
        # The hard state as last handed to the driver (so unchanged state is not re-written).
        self._prev_hs: tuple[int, NodeId | None, int] = (self._term, self._vote, hs.commit)

        if bootstrap_voters is not None and self._term == 0 and snapshot is None and not entries:
            voters = sorted(set(bootstrap_voters))
            if voters:
                self._term = 1
                boot = [
                    Entry(1, i + 1, _CONF, ConfChange(ConfChangeType.ADD_VOTER, v).encode())
                    for i, v in enumerate(voters)
                ]
                self._log.extend(boot)
                self._log_bytes += _payload_bytes(boot)
                self._record_conf_entries(boot)
                self._commit = len(boot)
                self._prev_hs = (0, None, 0)
                self._handed_index = 0
                self._persisted_index = 0

        _, self._voters, self._learners = self._conf[-1]
        self._progress: dict[NodeId, _Progress] = {}
        self._removed_peers = False  # progress still holds peers removed by an uncommitted change
        self._msgs: list[Message] = []
        self._votes: dict[NodeId, bool] = {}
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = config.election_tick
        self._transferee: NodeId | None = None
        self._need_bcast = False
        self._commit_bcast = 0
        self._announce_due = False  # a deferred commit announcement is owed
        self._read_seq = 0
        self._read_round_pending = False
        self._read_queue: deque[tuple[int, int, int]] = deque()
        self._reads_waiting_commit: list[int] = []
        self._read_states: list[ReadState] = []
        self._pending_install: Snapshot | None = None
        # A role change since the last ready(): the messages may include acknowledgements.
        self._role_changed = True
        # (leader term, leader id, meta) of the incoming snapshot `_incoming` assembles.
        self._incoming_key: tuple[int, NodeId, SnapshotMeta] | None = None
        self._incoming: SnapshotSpool = spool if spool is not None else MemorySpool()
        self._retained = retained
        self._become_follower(self._term, None)

    # ------------------------------------------------------------------ status (read-only)

    @property
    def role(self) -> Role:
        return self._role

    @property
    def term(self) -> int:
        return self._term

    @property
    def vote(self) -> NodeId | None:
        return self._vote

    @property
    def leader_id(self) -> NodeId | None:
        return self._leader_id

    @property
    def commit_index(self) -> int:
        return self._commit

    @property
    def applied_index(self) -> int:
        """Last index the driver acknowledged applying (via `advance`)."""
        return self._applied

    @property
    def first_index(self) -> int:
        """First index still held in the log (snapshot index + 1)."""
        return self._snap_index + 1

    @property
    def last_index(self) -> int:
        return self._snap_index + len(self._log)

    @property
    def log_bytes(self) -> int:
        """Payload bytes of the entries held after the snapshot: the log's cost in memory."""
        return self._log_bytes

    @property
    def last_term(self) -> int:
        return self._log[-1].term if self._log else self._snap_term

    @property
    def persisted_index(self) -> int:
        """Last log index the driver acknowledged persisting."""
        return self._persisted_index

    @property
    def voters(self) -> frozenset[NodeId]:
        return self._voters

    @property
    def learners(self) -> frozenset[NodeId]:
        return self._learners

    @property
    def snapshot(self) -> Snapshot | None:
        """The latest snapshot this core holds (from compact, install or restart)."""
        return self._snap

    @property
    def hard_state(self) -> HardState:
        return HardState(self._term, self._vote, self._commit)

    @property
    def pending_conf_index(self) -> int:
        """Index of the last CONF_CHANGE entry in the log (0 if none since the snapshot)."""
        return self._conf[-1][0]

    @property
    def transferee(self) -> NodeId | None:
        """Target of an ongoing leadership transfer (leader only)."""
        return self._transferee

    def progress(self) -> dict[NodeId, PeerProgress]:
        """Leader's per-peer replication state (empty on non-leaders)."""
        return {
            peer: PeerProgress(
                pr.match, pr.next, pr.state, pr.is_learner, pr.recent_active, len(pr.inflights),
                pr.recent_active or pr.prev_active,
            )
            for peer, pr in self._progress.items()
        }

    def status(self) -> Status:
        """Everything above in one immutable value."""
        return Status(
            self.id,
            self._role,
            self._term,
            self._vote,
            self._leader_id,
            self._commit,
            self._applied,
            self.first_index,
            self.last_index,
            self.last_term,
            self._voters,
            self._learners,
            self.progress(),
            self._transferee,
        )

    def term_at(self, index: int) -> int | None:
        """Term of the entry at `index`, or None if compacted away or beyond the log."""
        off = index - self._snap_index
        if off == 0:
            return self._snap_term
        if 0 < off <= len(self._log):
            return self._log[off - 1].term
        return None

    def entry(self, index: int) -> Entry | None:
        """The entry at `index`, or None if compacted away or beyond the log."""
        off = index - self._snap_index
        if 0 < off <= len(self._log):
            return self._log[off - 1]
        return None

    def entries(self, lo: int, hi: int) -> tuple[Entry, ...]:
        """Entries with lo <= index < hi (clipped to what the log holds)."""
        base = self._snap_index + 1
        return tuple(self._log[max(lo - base, 0) : max(hi - base, 0)])

    # ------------------------------------------------------------------ inputs

    def tick(self) -> None:
        """Advance logical time by one tick."""
        if self._role is Role.LEADER:
            self._tick_leader()
            return
        self._election_elapsed += 1
        if (
            self._election_elapsed >= self._randomized_timeout
            and self.id in self._voters
            and self._pending_install is None
        ):
            self._election_elapsed = 0
            self._campaign(pre_vote=self._cfg.pre_vote, transfer=False)

    def take_heartbeats(self) -> list[Heartbeat]:
        """A leader's pending heartbeats of its current term, removed from the next Ready.

        For a driver stuck persisting a Ready (a slow fsync): heartbeats acknowledge nothing
        and depend on nothing unpersisted (term and vote are durable before a leader sends
        anything), so they may go out early; without them, a disk stall longer than the
        election timeout makes the followers elect another leader. Other messages stay.
        """
        if self._role is not Role.LEADER:
            return []
        return self._take_messages(Heartbeat, self._term)

    def take_heartbeat_responses(self, durable_term: int) -> list[HeartbeatResponse]:
        """A follower's pending answers to heartbeats of `durable_term`, removed from the
        next Ready.

        For a driver in the middle of a long Ready (a snapshot saved and restored, seconds
        per GiB): an answer to a heartbeat acknowledges no entry, only the leader's term, so
        it may go out before the Ready completes if that term is already durable. Without
        them a leader that needs this follower for its quorum steps down (check-quorum).
        """
        return self._take_messages(HeartbeatResponse, durable_term)

    def _take_messages(self, kind: type[_M], term: int) -> list[_M]:
        """Remove and return the pending messages of `kind` and `term`; the rest stay."""
        if not self._msgs:
            return []
        taken: list[_M] = []
        rest: list[Message] = []
        for m in self._msgs:
            if isinstance(m, kind) and m.term == term:
                taken.append(m)
            else:
                rest.append(m)
        self._msgs = rest
        return taken

    def propose(self, data: bytes) -> tuple[int, int]:
        """Append a NORMAL entry; returns (term, index). The entry is committed iff an entry
        with this index and term is later handed out in `committed_entries`."""
        self._check_can_propose()
        index = self.last_index + 1
        self._append_local([Entry(self._term, index, EntryType.NORMAL, data)])
        return self._term, index

    def propose_batch(self, datas: Sequence[bytes]) -> tuple[int, int]:
        """Append one NORMAL entry per item; returns (term, first index). Indexes are
        consecutive, so item i got first_index + i."""
        self._check_can_propose()
        term = self._term
        first = self.last_index + 1
        normal = EntryType.NORMAL
        self._append_local([Entry(term, first + i, normal, d) for i, d in enumerate(datas)])
        return term, first

    def propose_conf_change(self, cc: ConfChange) -> tuple[int, int]:
        """Append a membership change (effective immediately on append, on every node).

        Refused (ProposalDropped) while the previous change is uncommitted or before the
        leader committed an entry of its own term (the single-server change rule needs both).
        """
        self._check_can_propose()
        if self._conf[-1][0] > self._commit:
            raise ProposalDropped("a membership change is still uncommitted")
        if self.term_at(self._commit) != self._term:
            raise ProposalDropped("leader has not committed an entry in its term yet")
        node = cc.node_id
        voters, learners = self._voters, self._learners
        kind = cc.type
        if kind is ConfChangeType.ADD_LEARNER:
            if node in voters or node in learners:
                raise InvalidConfChange(f"{node} is already a member")
        elif kind is ConfChangeType.PROMOTE_LEARNER:
            if node not in learners:
                raise InvalidConfChange(f"{node} is not a learner")
        elif kind is ConfChangeType.ADD_VOTER:
            if node in voters:
                raise InvalidConfChange(f"{node} is already a voter")
        elif kind is ConfChangeType.REMOVE_NODE:
            if node not in voters and node not in learners:
                raise InvalidConfChange(f"{node} is not a member")
            if voters == {node}:
                raise InvalidConfChange("cannot remove the last voter")
        index = self.last_index + 1
        self._append_local([Entry(self._term, index, _CONF, cc.encode())])
        return self._term, index

    def transfer_leadership(self, to: NodeId) -> None:
        """Hand leadership to voter `to`: stop taking proposals, catch `to` up, then send it
        TimeoutNow. Aborted if it has not happened within an election timeout."""
        if self._role is not Role.LEADER:
            raise NotLeader(self._leader_id)
        if to == self.id or to == self._transferee:
            return
        if to not in self._voters or to not in self._progress:
            raise InvalidRequest(f"cannot transfer leadership to non-voter {to}")
        self._transferee = to
        self._election_elapsed = 0
        pr = self._progress[to]
        if pr.match == self.last_index:
            self._send(TimeoutNow(self._term, self.id, to))
        else:
            self._maybe_send_append(to, pr, True)

    def read_index(self, request_id: int) -> None:
        """Start a linearizable read. A `ReadState(request_id, index)` appears in a later Ready
        once this leader has confirmed, with a quorum heartbeat round started after this call,
        that it was still leader; `index` is its commit index at the time of the call (or at
        the first commit of its term, if none yet)."""
        if self._role is not Role.LEADER:
            raise NotLeader(self._leader_id)
        if self.term_at(self._commit) != self._term:
            self._reads_waiting_commit.append(request_id)
            return
        self._register_reads([request_id])

    def compact(self, index: int, data: bytes | memoryview) -> None:
        """Record a snapshot of the applied state at `index` and drop log entries up to it.

        The application must have applied `index` (acknowledged via advance) and made `data`
        durable. The core keeps `data` to stream to followers that fall behind the log start.
        """
        if index <= self._snap_index:
            return
        if index > self._applied:
            raise InvalidRequest(f"cannot compact at {index}: applied is {self._applied}")
        term = self.term_at(index)
        assert term is not None
        pos = 0
        for i, m in enumerate(self._conf):
            if m[0] <= index:
                pos = i
        _, voters, learners = self._conf[pos]
        self._conf = [(index, voters, learners), *self._conf[pos + 1 :]]
        dropped = index - self._snap_index
        self._log_bytes -= _payload_bytes(self._log[:dropped])
        del self._log[:dropped]
        self._snap_index = index
        self._snap_term = term
        self._snap = Snapshot(SnapshotMeta(index, term, voters, learners), data)

    def use_snapshot_copy(self, snapshot: Snapshot) -> None:
        """Hold `snapshot` instead of the identical one held now (same meta), such as the
        storage's file-mapped copy of what was just saved, so that a large snapshot's bytes
        need not stay on the heap for as long as followers may need them."""
        held = self._snap
        if held is not None and held.meta == snapshot.meta and len(held.data) == len(
            snapshot.data
        ):
            self._snap = snapshot

    def step(self, m: Message) -> None:
        """Process one message from a peer. Unknown, stale or misaddressed ones are dropped."""
        if m.dst != self.id:
            return
        if m.term != self._term and not self._step_term(m):
            return
        # Ordered by frequency on the replication hot path.
        if isinstance(m, AppendEntries):
            self._handle_append(m)
        elif isinstance(m, AppendResponse):
            self._handle_append_response(m)
        elif isinstance(m, Heartbeat):
            self._handle_heartbeat(m)
        elif isinstance(m, HeartbeatResponse):
            self._handle_heartbeat_response(m)
        elif isinstance(m, RequestVote):
            self._handle_request_vote(m)
        elif isinstance(m, VoteResponse):
            self._handle_vote_response(m)
        elif isinstance(m, InstallSnapshot):
            self._handle_install_snapshot(m)
        elif isinstance(m, SnapshotResponse):
            self._handle_snapshot_response(m)
        else:
            self._handle_timeout_now(m)

    def _step_term(self, m: Message) -> bool:
        """Term rules (§5.1) plus pre-vote and leader-lease exceptions, for m.term != ours.
        Returns whether the message should still be handled."""
        from_leader = isinstance(m, AppendEntries | Heartbeat | InstallSnapshot)
        if m.term > self._term:
            if isinstance(m, RequestVote):
                if (
                    self._cfg.check_quorum
                    and self._leader_id is not None
                    and self._election_elapsed < self._cfg.election_tick
                    and not m.transfer
                ):
                    # Leader lease: we heard from a live leader recently; a disruptive
                    # (e.g. rejoining or partitioned) node must not depose it.
                    return False
                if not m.pre_vote:
                    self._become_follower(m.term, None)
            elif isinstance(m, VoteResponse):
                # A granted pre-vote echoes the term we would campaign in: not a newer term.
                if not (m.pre_vote and m.granted):
                    self._become_follower(m.term, None)
            else:
                self._become_follower(m.term, m.src if from_leader else None)
            return True
        if from_leader:
            # A stale leader (e.g. after a partition heals) learns our term and steps down.
            self._send(HeartbeatResponse(self._term, self.id, m.src, 0))
        elif isinstance(m, RequestVote) and m.pre_vote:
            self._send(VoteResponse(self._term, self.id, m.src, False, True))
        return False

    def has_ready(self) -> bool:
        """True when `ready()` would return something to do."""
        if self._need_bcast:
            self._bcast_append()
        if self._msgs or self._read_states or self._pending_install is not None:
            return True
        if (
            self._handed_index < self._snap_index + len(self._log)
            or self._commit > self._applied_handed
        ):
            return True
        hs = self._prev_hs
        return hs[2] != self._commit or hs[0] != self._term or hs[1] != self._vote

    def ready(self) -> Ready:
        """Collect the work for the driver (see the module docstring for the contract).

        Everything returned is considered handed over: it will not be returned again.
        """
        if self._need_bcast:
            self._bcast_append()
        hs_key = (self._term, self._vote, self._commit)
        prev_hs = self._prev_hs
        hard_state = None
        if hs_key != prev_hs:
            self._prev_hs = hs_key
            vote = None if self._mut.skip_persist_vote else self._vote
            hard_state = HardState(self._term, vote, self._commit)
        base = self._snap_index
        entries: tuple[Entry, ...] = ()
        if self._handed_index < base + len(self._log):
            entries = tuple(self._log[self._handed_index - base :])
            self._handed_index = base + len(self._log)
        committed: tuple[Entry, ...] = ()
        if self._commit > self._applied_handed:
            committed = tuple(self._log[self._applied_handed - base : self._commit - base])
            self._applied_handed = self._commit
        msgs: tuple[Message, ...] = ()
        if self._msgs:
            msgs = tuple(self._msgs)
            self._msgs = []
        reads: tuple[ReadState, ...] = ()
        if self._read_states:
            reads = tuple(self._read_states)
            self._read_states = []
        snap = self._pending_install
        self._pending_install = None
        early = (
            self._role is Role.LEADER
            and not self._role_changed
            and hs_key[0] == prev_hs[0]
            and hs_key[1] == prev_hs[1]
        )
        self._role_changed = False
        return Ready(hard_state, entries, msgs, committed, snap, reads, early)

    def advance(self, rd: Ready) -> None:
        """Acknowledge that everything in `rd` was persisted, sent and applied."""
        if rd.snapshot is not None:
            self._persisted_index = max(self._persisted_index, rd.snapshot.meta.index)
            self._applied = max(self._applied, rd.snapshot.meta.index)
        if rd.entries:
            last = rd.entries[-1]
            index = last.index
            # Entries truncated after ready() are not in the log any more: their ack is void.
            if index > self._persisted_index and self.term_at(index) == last.term:
                self._persisted_index = index
                if self._role is Role.LEADER and self.id in self._voters:
                    self._maybe_commit()
        if rd.committed_entries:
            self._applied = max(self._applied, rd.committed_entries[-1].index)

    # ------------------------------------------------------------------ roles

    def _reset(self, term: int) -> None:
        self._role_changed = True
        if term != self._term:
            self._term = term
            self._vote = None
            self._drop_incoming()
        self._leader_id = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = self._rng.randint(
            self._cfg.election_tick, 2 * self._cfg.election_tick - 1
        )
        self._votes = {}
        self._transferee = None
        self._progress = {}
        self._removed_peers = False
        self._read_queue.clear()
        self._read_round_pending = False
        self._reads_waiting_commit = []
        self._need_bcast = False

    def drop_incoming_snapshot(self) -> None:
        """Drop a partly received snapshot (its spool's disk), as if its chunks were lost:
        the leader's next chunk finds the transfer gone and it starts again from offset 0."""
        self._drop_incoming()

    def _drop_incoming(self) -> None:
        """Drop a partly received snapshot: one from an earlier term can never be completed
        (its chunks are keyed by term), and its spool may hold a commit log's worth of disk.
        Every way to leadership passes a term change, so a leader never holds one."""
        if self._incoming_key is not None or len(self._incoming):
            self._incoming_key = None
            self._incoming.restart(b"")

    def _become_follower(self, term: int, leader: NodeId | None) -> None:
        self._reset(term)
        self._leader_id = leader
        self._role = Role.FOLLOWER if self.id in self._voters else Role.LEARNER

    def _campaign(self, pre_vote: bool, transfer: bool) -> None:
        """Start a (pre-)election. A pre-vote asks for term+1 without changing our term, so a
        node that cannot win (partitioned, stale log) never bumps terms and disrupts others."""
        if pre_vote:
            self._reset(self._term)
            self._role = Role.PRE_CANDIDATE
            term = self._term + 1
        else:
            self._reset(self._term + 1)
            self._role = Role.CANDIDATE
            self._vote = self.id
            term = self._term
        self._votes = {self.id: True}
        if self._poll() == 1:
            if pre_vote:
                self._campaign(pre_vote=False, transfer=False)
            else:
                self._become_leader()
            return
        li, lt = self.last_index, self.last_term
        for peer in sorted(self._voters):
            if peer != self.id:
                self._send(RequestVote(term, self.id, peer, li, lt, pre_vote, transfer))

    def _poll(self) -> int:
        """1 if granted votes reach a quorum of voters, -1 if rejections do, else 0."""
        q = len(self._voters) // 2 + 1
        granted = rejected = 0
        for peer, ok in self._votes.items():
            if peer in self._voters:
                if ok:
                    granted += 1
                else:
                    rejected += 1
        if granted >= q:
            return 1
        if rejected >= q:
            return -1
        return 0

    def _become_leader(self) -> None:
        self._reset(self._term)
        self._role = Role.LEADER
        self._leader_id = self.id
        self._read_seq = 0
        self._commit_bcast = self._commit
        nxt = self.last_index + 1
        for peer in sorted(self._voters | self._learners):
            if peer != self.id:
                self._progress[peer] = _Progress(nxt, peer in self._learners)
        log.debug("raft became leader node=%s term=%d", self.id, self._term)
        # The no-op commits everything before it (§5.4.2) and unblocks ReadIndex/conf changes.
        self._append_local([Entry(self._term, nxt, EntryType.NOOP, b"")])

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        cfg = self._cfg
        if self._election_elapsed >= cfg.election_tick:
            self._election_elapsed = 0
            if cfg.check_quorum:
                active = 1 if self.id in self._voters else 0
                for peer, pr in self._progress.items():
                    if pr.recent_active and peer in self._voters:
                        active += 1
                    pr.prev_active = pr.recent_active
                    pr.recent_active = False
                if active < len(self._voters) // 2 + 1:
                    log.info("raft leader lost quorum node=%s term=%d", self.id, self._term)
                    self._become_follower(self._term, None)
                    return
            self._transferee = None
        if self._heartbeat_elapsed >= cfg.heartbeat_tick:
            self._heartbeat_elapsed = 0
            self._bcast_heartbeat()

    # ------------------------------------------------------------------ log

    def _check_can_propose(self) -> None:
        if self._role is not Role.LEADER:
            raise NotLeader(self._leader_id)
        if self._transferee is not None:
            raise ProposalDropped(f"leadership transfer to {self._transferee} in progress")

    def _append_local(self, new: list[Entry]) -> None:
        """Leader appends its own entries; sending is deferred to the next has_ready/ready so
        all proposals since the last Ready share one AppendEntries per follower."""
        self._log.extend(new)
        self._log_bytes += _payload_bytes(new)
        if self._record_conf_entries(new):
            self._on_membership_changed()
        self._need_bcast = True
        if self._mut.count_unpersisted_self:
            self._maybe_commit()

    def _record_conf_entries(self, new: Sequence[Entry]) -> bool:
        found = False
        for e in new:
            if e.type is _CONF:
                _, voters, learners = self._conf[-1]
                voters, learners = _apply_conf_change(ConfChange.decode(e.data), voters, learners)
                self._conf.append((e.index, voters, learners))
                found = True
        return found

    def _truncate(self, index: int) -> None:
        """Drop entries >= index (a conflicting suffix from an old leader)."""
        if index <= self._commit:
            raise SafetyViolation(
                f"node {self.id} asked to truncate at {index} <= commit {self._commit}"
            )
        cut = index - self._snap_index - 1
        self._log_bytes -= _payload_bytes(self._log[cut:])
        del self._log[cut:]
        self._handed_index = min(self._handed_index, index - 1)
        self._persisted_index = min(self._persisted_index, index - 1)
        if self._conf[-1][0] >= index:
            while self._conf[-1][0] >= index:
                self._conf.pop()
            self._on_membership_changed()

    def _on_membership_changed(self) -> None:
        _, self._voters, self._learners = self._conf[-1]
        members = self._voters | self._learners
        if self._role is Role.LEADER:
            nxt = self.last_index + 1
            for peer in sorted(members):
                if peer == self.id:
                    continue
                pr = self._progress.get(peer)
                if pr is None:
                    pr = self._progress[peer] = _Progress(nxt, False)
                    pr.recent_active = True
                pr.is_learner = peer in self._learners
            for peer in self._progress:
                if peer not in members:
                    # Keep replicating to a removed peer until its removal commits, so it
                    # learns it was removed and stops campaigning; pruned in _maybe_commit.
                    self._progress[peer].is_learner = True
                    self._removed_peers = True
            if self._conf[-1][0] <= self._commit:
                self._prune_removed_peers()
            if self._transferee is not None and self._transferee not in self._voters:
                self._transferee = None
            # A smaller quorum may already be satisfied.
            self._maybe_commit()
            self._advance_reads()
        elif self._role is Role.FOLLOWER or self._role is Role.LEARNER:
            self._role = Role.FOLLOWER if self.id in self._voters else Role.LEARNER
        elif self.id not in self._voters:
            self._become_follower(self._term, None)

    def _maybe_commit(self) -> bool:
        """Advance commit to the highest index replicated (and persisted) on a quorum of voters,
        but only if that entry is from the current term (§5.4.2)."""
        voters = self._voters
        # Progress of non-voters (learners, peers being removed) is flagged is_learner.
        matches = [pr.match for pr in self._progress.values() if not pr.is_learner]
        if self.id in voters:
            own = self.last_index if self._mut.count_unpersisted_self else self._persisted_index
            matches.append(own)
        if not matches:
            return False
        matches.sort(reverse=True)
        q = matches[len(voters) // 2] if len(matches) > len(voters) // 2 else 0
        if q <= self._commit:
            return False
        if self.term_at(q) != self._term and not self._mut.commit_previous_term_by_counting:
            return False
        first_in_term = self.term_at(self._commit) != self._term
        self._commit = q
        self._need_bcast = True
        if first_in_term and self.term_at(q) == self._term and self._reads_waiting_commit:
            waiting, self._reads_waiting_commit = self._reads_waiting_commit, []
            self._register_reads(waiting)
        if self._conf[-1][0] <= q:
            if self._removed_peers:
                self._prune_removed_peers()
            if self.id not in voters:
                # Our own removal is committed: hand over by stepping down (others elect).
                self._become_follower(self._term, None)
        return True

    def _prune_removed_peers(self) -> None:
        self._removed_peers = False
        members = self._voters | self._learners
        for peer in [p for p in self._progress if p not in members]:
            del self._progress[peer]

    def _find_conflict_by_term(self, index: int, term: int) -> int:
        """Largest index <= `index` whose term is <= `term` (or the snapshot index)."""
        base = self._snap_index
        index = min(index, base + len(self._log))
        log_ = self._log
        while index > base and log_[index - base - 1].term > term:
            index -= 1
        return index

    # ------------------------------------------------------------------ sending

    def _send(self, m: Message) -> None:
        self._msgs.append(m)

    def _bcast_append(self) -> None:
        """Send new entries to every peer; if commit advanced since the last broadcast, peers
        with nothing new get an empty append so they learn the commit index without waiting
        for a heartbeat."""
        self._need_bcast = False
        if self._role is not Role.LEADER:
            return
        new_commit = self._commit > self._commit_bcast
        self._commit_bcast = self._commit
        defer = new_commit and self._cfg.defer_commit_announcement
        for peer, pr in self._progress.items():
            self._maybe_send_append(peer, pr, new_commit and not defer, new_commit)
        if self._read_round_pending:
            self._bcast_heartbeat()
        if defer:
            self._announce_due = any(self._owes_commit(pr) for pr in self._progress.values())

    def _owes_commit(self, pr: _Progress) -> bool:
        """The peer was not told the commit index and an empty append may go to it now.

        The others learn it from the next append flow control lets out (an acknowledgement
        releases it), from a snapshot, or from a heartbeat: announcing cannot reach them."""
        if pr.commit_sent >= self._commit:
            return False
        if pr.state is _REPLICATE:
            return pr.next > self._snap_index + len(self._log)
        return pr.state is _PROBE and not pr.probe_sent

    @property
    def commit_announcement_due(self) -> bool:
        """A deferred commit announcement is owed (`Config.defer_commit_announcement`)."""
        return self._announce_due and self._role is Role.LEADER

    def announce_commit(self) -> None:
        """Tell every peer not yet told the commit index: an empty append (or the entries
        flow control allows), which a fully acknowledged peer need not answer."""
        if not self._announce_due:
            return
        self._announce_due = False
        if self._role is not Role.LEADER:
            return
        for peer, pr in self._progress.items():
            if self._owes_commit(pr):
                self._maybe_send_append(peer, pr, True, True)

    def _bcast_heartbeat(self) -> None:
        # Carries the latest read sequence: any heartbeat sent now confirms pending reads.
        self._read_round_pending = False
        commit, term, me, ctx = self._commit, self._term, self.id, self._read_seq
        for peer, pr in self._progress.items():
            told = min(pr.match, commit)
            if told > pr.commit_sent:
                pr.commit_sent = told
            self._send(Heartbeat(term, me, peer, told, ctx))

    def _maybe_send_append(
        self, peer: NodeId, pr: _Progress, allow_empty: bool, commit_only: bool = False
    ) -> None:
        """Send what flow control allows: one probe in PROBE, a pipeline in REPLICATE."""
        state = pr.state
        if state is _SNAPSHOT:
            return
        last = self._snap_index + len(self._log)
        if state is _PROBE:
            if pr.probe_sent or (pr.next > last and not allow_empty):
                return
            self._send_append(peer, pr, pr.next)
            pr.probe_sent = True
            return
        limit = self._inflight_limit(pr)
        inflights = pr.inflights
        if pr.next > last:
            if allow_empty:
                # A pure commit announcement to a fully acknowledged peer needs no answer.
                quiet = commit_only and pr.match == last
                self._send_append(peer, pr, pr.next, not quiet)
            return
        while pr.next <= last and len(inflights) < limit:
            sent_to = self._send_append(peer, pr, pr.next)
            if sent_to < 0:
                return
            pr.next = sent_to + 1
            inflights.append(sent_to)

    def _inflight_limit(self, pr: _Progress) -> int:
        """How many unanswered appends the pipeline to `pr` may hold. Fewer while they are
        read back from storage (`retained`): each such message holds its own copy of the
        entries, where a pipeline from memory shares the log's."""
        cfg = self._cfg
        if pr.next <= self._snap_index:
            return min(cfg.max_inflight_retained, cfg.max_inflight_msgs)
        return cfg.max_inflight_msgs

    def _send_append(
        self, peer: NodeId, pr: _Progress, nxt: int, want_response: bool = True
    ) -> int:
        """Send entries from `nxt`; returns the last index sent (nxt-1 if none), or -1 if the
        entries are compacted away and a snapshot transfer was started instead."""
        prev = nxt - 1
        prev_term = self.term_at(prev)
        if prev_term is None:
            sent = self._send_retained(peer, prev)
            if sent < 0:
                self._start_snapshot(peer, pr)
                return -1
            pr.commit_sent = self._commit
            return sent
        base = self._snap_index
        start = nxt - base - 1
        cfg = self._cfg
        end = min(len(self._log), start + cfg.max_entries_per_msg)
        log_ = self._log
        max_bytes = cfg.max_bytes_per_msg
        size = 0
        for j in range(start, end):
            size += len(log_[j].data)
            if size > max_bytes and j > start:
                end = j
                break
        self._send(
            AppendEntries(
                self._term,
                self.id,
                peer,
                prev,
                prev_term,
                tuple(log_[start:end]),
                self._commit,
                want_response,
            )
        )
        pr.commit_sent = self._commit
        return prev + (end - start) if end > start else prev

    def _send_retained(self, peer: NodeId, prev: int) -> int:
        """Send entries after `prev`, compacted out of memory, that storage still holds; the
        last index sent, or -1 if storage cannot help (a snapshot must be sent instead).

        A follower briefly behind a compaction (a restart, a short partition) then catches
        up from the log rather than by a transfer of the whole snapshot, which for a commit
        log is the whole log. Only entries up to the snapshot index come from storage; the
        next append takes the rest from memory.
        """
        base = self._snap_index
        if self._retained is None or prev >= base:
            return -1
        cfg = self._cfg
        got = self._retained(prev, min(base - prev, cfg.max_entries_per_msg),
                             cfg.max_bytes_per_msg)
        if got is None:
            return -1
        prev_term, entries = got
        if not entries or entries[0].index != prev + 1:
            return -1
        last = prev + len(entries)
        if entries[-1].index != last or last > base:
            return -1
        self._send(
            AppendEntries(
                self._term, self.id, peer, prev, prev_term, tuple(entries), self._commit, True
            )
        )
        return last

    def _start_snapshot(self, peer: NodeId, pr: _Progress) -> None:
        snap = self._snap
        if snap is None:  # pragma: no cover - the log below first_index is always a snapshot
            raise SafetyViolation("log compacted without a snapshot")
        pr.state = _SNAPSHOT
        pr.inflights.clear()
        pr.probe_sent = False
        pr.snap_index = snap.meta.index
        pr.snap_offset = 0
        self._send_snapshot_chunk(peer, pr)

    def _send_snapshot_chunk(self, peer: NodeId, pr: _Progress) -> None:
        snap = self._snap
        assert snap is not None
        if pr.snap_index != snap.meta.index:
            # We compacted again since this transfer started: send the newer snapshot.
            pr.snap_index = snap.meta.index
            pr.snap_offset = 0
        off = pr.snap_offset
        chunk = bytes(snap.data[off : off + self._cfg.snapshot_chunk_size])
        done = off + len(chunk) >= len(snap.data)
        self._send(InstallSnapshot(self._term, self.id, peer, snap.meta, off, chunk, done,
                                   len(snap.data)))

    # ------------------------------------------------------------------ ReadIndex

    def _register_reads(self, request_ids: list[int]) -> None:
        commit = self._commit
        if self._mut.read_index_without_quorum or self._voters == {self.id}:
            self._read_states.extend(ReadState(r, commit) for r in request_ids)
            return
        # All reads registered before the next ready() share one heartbeat round (sent from
        # _bcast_append), so a burst of reads costs one message per peer, not one per read.
        if not self._read_round_pending:
            self._read_seq += 1
            self._read_round_pending = True
            self._need_bcast = True
        seq = self._read_seq
        for r in request_ids:
            self._read_queue.append((seq, r, commit))

    def _advance_reads(self) -> None:
        """Release reads whose heartbeat round a quorum of voters has acknowledged."""
        if not self._read_queue:
            return
        voters = self._voters
        acks = [pr.read_ack for p, pr in self._progress.items() if p in voters]
        if self.id in voters:
            acks.append(self._read_seq)
        acks.sort(reverse=True)
        q = len(voters) // 2
        if len(acks) <= q:
            return
        confirmed = acks[q]
        queue = self._read_queue
        while queue and queue[0][0] <= confirmed:
            _, rid, index = queue.popleft()
            self._read_states.append(ReadState(rid, index))

    # ------------------------------------------------------------------ message handlers

    def _handle_append(self, m: AppendEntries) -> None:
        role = self._role
        if role is Role.LEADER:
            return  # two leaders in one term cannot happen; ignore rather than corrupt
        if role is Role.CANDIDATE or role is Role.PRE_CANDIDATE:
            self._become_follower(self._term, m.src)
        self._leader_id = m.src
        self._election_elapsed = 0
        prev = m.prev_index
        if prev < self._commit:
            self._msgs.append(AppendResponse(self._term, self.id, m.src, self._commit))
            return
        off = prev - self._snap_index
        log_ = self._log
        if 0 < off <= len(log_):
            t: int | None = log_[off - 1].term
        else:
            t = self.term_at(prev)
        if t != m.prev_term and not (self._mut.skip_term_check_on_append and t is not None):
            hint = self._find_conflict_by_term(prev, m.prev_term)
            self._send(
                AppendResponse(
                    self._term, self.id, m.src, prev, True, hint, self.term_at(hint) or 0
                )
            )
            return
        entries = m.entries
        last_new = prev + len(entries)
        if entries:
            self._append_from_leader(entries)
        commit = m.commit if m.commit < last_new else last_new
        if commit > self._commit:
            self._commit = commit
        if m.want_response:
            self._msgs.append(AppendResponse(self._term, self.id, m.src, last_new))

    def _append_from_leader(self, entries: tuple[Entry, ...]) -> None:
        """Append, skipping entries we already hold and truncating at the first conflict, so
        duplicated or reordered AppendEntries never shorten a matching log."""
        last = self.last_index
        base = self._snap_index
        log_ = self._log
        first = entries[0].index
        if first == last + 1:
            new: Sequence[Entry] = entries
        else:
            new = ()
            for i, e in enumerate(entries):
                idx = e.index
                if idx > last:
                    new = entries[i:]
                    break
                if idx <= base:
                    continue
                if log_[idx - base - 1].term != e.term:
                    self._truncate(idx)
                    new = entries[i:]
                    break
            if not new:
                return
        log_.extend(new)
        self._log_bytes += _payload_bytes(new)
        if self._record_conf_entries(new):
            self._on_membership_changed()

    def _handle_append_response(self, m: AppendResponse) -> None:
        if self._role is not Role.LEADER:
            return
        pr = self._progress.get(m.src)
        if pr is None:
            return
        pr.recent_active = True
        if m.reject:
            if pr.state is _REPLICATE:
                if m.index <= pr.match:
                    return
            elif pr.state is _PROBE:
                if m.index != pr.next - 1:
                    return
            else:
                return
            probe = m.hint_index
            if m.hint_term > 0:
                probe = self._find_conflict_by_term(m.hint_index, m.hint_term)
            pr.become_probe()
            pr.next = max(min(m.index, probe + 1), pr.match + 1)
            self._maybe_send_append(m.src, pr, True)
            return
        index = m.index
        advanced = index > pr.match
        if advanced:
            pr.match = index
        if pr.next <= index:
            pr.next = index + 1
        state = pr.state
        if state is _REPLICATE:
            inflights = pr.inflights
            while inflights and inflights[0] <= index:
                inflights.popleft()
        elif state is _PROBE or pr.match >= self._snap_index:
            pr.become_replicate()
        if advanced:
            if m.src in self._voters:
                self._maybe_commit()
                if self._role is not Role.LEADER:
                    return
            if m.src == self._transferee and pr.match == self.last_index:
                self._send(TimeoutNow(self._term, self.id, m.src))
        if pr.next <= self._snap_index + len(self._log):
            self._maybe_send_append(m.src, pr, False)

    def _handle_request_vote(self, m: RequestVote) -> None:
        # Here m.term == our term, or m.term > our term for a pre-vote (term unchanged).
        can_vote = (
            self._vote == m.src
            or (self._vote is None and self._leader_id is None)
            or (m.pre_vote and m.term > self._term)
        )
        up_to_date = (
            m.last_term > self.last_term
            or (m.last_term == self.last_term and m.last_index >= self.last_index)
            or self._mut.skip_log_up_to_date_check
        )
        if can_vote and up_to_date:
            self._send(VoteResponse(m.term, self.id, m.src, True, m.pre_vote))
            if not m.pre_vote:
                self._vote = m.src
                self._election_elapsed = 0
        else:
            self._send(VoteResponse(self._term, self.id, m.src, False, m.pre_vote))

    def _handle_vote_response(self, m: VoteResponse) -> None:
        if m.pre_vote:
            if self._role is not Role.PRE_CANDIDATE:
                return
            if m.granted and m.term != self._term + 1:
                return
        elif self._role is not Role.CANDIDATE:
            return
        self._votes[m.src] = m.granted
        result = self._poll()
        if result == 1:
            if m.pre_vote:
                self._campaign(pre_vote=False, transfer=False)
            else:
                self._become_leader()
        elif result == -1:
            self._become_follower(self._term, None)

    def _handle_heartbeat(self, m: Heartbeat) -> None:
        role = self._role
        if role is Role.LEADER:
            return
        if role is Role.CANDIDATE or role is Role.PRE_CANDIDATE:
            self._become_follower(self._term, m.src)
        self._leader_id = m.src
        self._election_elapsed = 0
        commit = min(m.commit, self.last_index)
        if commit > self._commit:
            self._commit = commit
        self._send(HeartbeatResponse(self._term, self.id, m.src, m.context))

    def _handle_heartbeat_response(self, m: HeartbeatResponse) -> None:
        if self._role is not Role.LEADER:
            return
        pr = self._progress.get(m.src)
        if pr is None:
            return
        pr.recent_active = True
        pr.probe_sent = False
        if pr.state is _SNAPSHOT:
            # Stop-and-wait: the chunk or its ack may have been lost; resend it.
            self._send_snapshot_chunk(m.src, pr)
        elif pr.match < self.last_index:
            if pr.state is _REPLICATE:
                # The pipeline is full and the peer answers heartbeats, not appends: its
                # answers (or our appends) may be lost. Free a slot for one more append,
                # which a restarted peer rejects, and the probe that follows starts over.
                # (Below the limit as it is now: the limit drops once the pipeline reads
                # from storage, with more still in flight from memory.)
                limit = self._inflight_limit(pr)
                while len(pr.inflights) >= limit:
                    pr.inflights.popleft()
            self._maybe_send_append(m.src, pr, True)
        if m.context > pr.read_ack:
            pr.read_ack = m.context
            if m.src in self._voters:
                self._advance_reads()

    def _handle_install_snapshot(self, m: InstallSnapshot) -> None:
        role = self._role
        if role is Role.LEADER:
            return
        if role is Role.CANDIDATE or role is Role.PRE_CANDIDATE:
            self._become_follower(self._term, m.src)
        self._leader_id = m.src
        self._election_elapsed = 0
        meta = m.meta
        if meta.index <= self._commit or self.term_at(meta.index) == meta.term:
            # Our log already holds the snapshot's last entry: no need to install it.
            if meta.index > self._commit:
                self._commit = meta.index
            self._drop_incoming()
            self._send(SnapshotResponse(self._term, self.id, m.src, meta.index, 0, True))
            return
        key = (m.term, m.src, meta)
        if m.offset == 0 and (key != self._incoming_key or not len(self._incoming)):
            self._incoming_key = key
            self._incoming.restart(m.data)
        elif key == self._incoming_key and m.offset == len(self._incoming):
            self._incoming.extend(m.data)
        else:
            expected = len(self._incoming) if key == self._incoming_key else 0
            self._send(SnapshotResponse(self._term, self.id, m.src, meta.index, expected))
            return
        if not m.done:
            n = len(self._incoming)
            self._send(SnapshotResponse(self._term, self.id, m.src, meta.index, n))
            return
        snap = Snapshot(meta, self._incoming.take())
        self._incoming_key = None
        self._install(snap)
        self._send(SnapshotResponse(self._term, self.id, m.src, meta.index, 0, True))

    def _install(self, snap: Snapshot) -> None:
        """Reset the log to `snap` (whose index is beyond our commit, so nothing committed is
        lost). The Ready carries it for the driver to persist and restore."""
        meta = snap.meta
        log.info("raft installing snapshot node=%s index=%d", self.id, meta.index)
        self._snap = snap
        self._snap_index = meta.index
        self._snap_term = meta.term
        self._log = []
        self._log_bytes = 0
        self._commit = meta.index
        self._applied_handed = meta.index
        self._handed_index = meta.index
        self._persisted_index = min(self._persisted_index, meta.index)
        self._pending_install = snap
        self._conf = [(meta.index, meta.voters, meta.learners)]
        self._on_membership_changed()

    def _handle_snapshot_response(self, m: SnapshotResponse) -> None:
        if self._role is not Role.LEADER:
            return
        pr = self._progress.get(m.src)
        if pr is None:
            return
        pr.recent_active = True
        if m.done:
            if m.index > pr.match:
                pr.match = m.index
            if pr.state is _SNAPSHOT or pr.next <= pr.match:
                pr.become_probe()
            if m.src in self._voters:
                self._maybe_commit()
                if self._role is not Role.LEADER:
                    return
            self._maybe_send_append(m.src, pr, True)
            return
        if pr.state is not _SNAPSHOT or m.index != pr.snap_index:
            return
        if m.offset != pr.snap_offset:
            # Progress (ack of our chunk) or a follower that lost its partial copy.
            pr.snap_offset = m.offset
            self._send_snapshot_chunk(m.src, pr)

    def _handle_timeout_now(self, m: TimeoutNow) -> None:
        if self.id not in self._voters or self._role is Role.LEADER:
            return
        self._campaign(pre_vote=False, transfer=True)
