"""A tiny in-memory harness for scenario tests of the Raft core.

It plays the driver: executes each Ready in contract order (persist snapshot/entries/hard state
into `MemStorage`, queue messages, apply committed entries to a list FSM, advance), and delivers
queued messages between nodes on demand. Links can be cut to make partitions; `crash` rebuilds a
node from what it persisted only.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from dcl.raft.core import RaftNode, RetainedEntries
from dcl.raft.types import (
    Config,
    Entry,
    EntryType,
    HardState,
    Message,
    NodeId,
    ReadState,
    Ready,
    Role,
    Snapshot,
)

SEP = b"\x00"


def fsm_snapshot(items: list[bytes]) -> bytes:
    return SEP.join(items)


def fsm_restore(data: bytes | memoryview) -> list[bytes]:
    return bytes(data).split(SEP) if data else []


@dataclass
class MemStorage:
    """What a node persisted: survives `Cluster.crash`."""

    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot | None = None
    entries: list[Entry] = field(default_factory=list)
    applied_index: int = 0
    fsm: list[bytes] = field(default_factory=list)


class Cluster:
    def __init__(
        self,
        ids: Iterable[NodeId],
        config: Config | None = None,
        seed: int = 1,
        joiners: Iterable[NodeId] = (),
    ) -> None:
        self.ids = list(ids)
        self.config = config or Config(election_tick=10, heartbeat_tick=1)
        self.rng = random.Random(seed)
        self.storage: dict[NodeId, MemStorage] = {}
        self.nodes: dict[NodeId, RaftNode] = {}
        self.queue: list[Message] = []
        self.cut_links: set[tuple[NodeId, NodeId]] = set()
        self.read_states: dict[NodeId, list[ReadState]] = {}
        self.installed: dict[NodeId, list[Snapshot]] = {}
        self.sent: list[Message] = []
        self.drop: Callable[[Message], bool] = lambda m: False
        self.pending: dict[NodeId, tuple[Ready, bool]] = {}
        for i in self.ids:
            self.storage[i] = MemStorage()
            self.nodes[i] = RaftNode(i, self.config, self.rng, bootstrap_voters=self.ids)
            self.read_states[i] = []
            self.installed[i] = []
        for j in joiners:
            self.add_node(j)

    def add_node(self, node_id: NodeId) -> RaftNode:
        """A node that joins later: no state, no bootstrap."""
        self.storage[node_id] = MemStorage()
        self.nodes[node_id] = RaftNode(node_id, self.config, self.rng)
        self.read_states[node_id] = []
        self.installed[node_id] = []
        return self.nodes[node_id]

    # ------------------------------------------------------------------ driver

    def process(self, node_id: NodeId) -> bool:
        """Run one whole Ready cycle (persist, send, apply, advance)."""
        if node_id in self.pending:
            self.finish(node_id)
            return True
        if not self.begin(node_id):
            return False
        self.finish(node_id)
        return True

    def begin(self, node_id: NodeId, early_send: bool = False) -> bool:
        """Take a Ready and persist it (the slow fsync part); sending and advance come later
        in `finish`, so steps and ticks may interleave as with a real asynchronous driver.
        With `early_send` and `Ready.send_before_persist`, messages go out first and the
        entries are written only in `finish` (a crash in between loses them)."""
        node = self.nodes[node_id]
        if node_id in self.pending or not node.has_ready():
            return False
        rd = node.ready()
        st = self.storage[node_id]
        if rd.hard_state is not None:
            st.hard_state = rd.hard_state
        if early_send and rd.send_before_persist:
            self._send_all(rd)
            self.pending[node_id] = (rd, True)
            return True
        self._persist(st, rd)
        self.pending[node_id] = (rd, False)
        return True

    def _persist(self, st: MemStorage, rd: Ready) -> None:
        if rd.snapshot is not None:
            st.snapshot = rd.snapshot
            st.entries = []
        if rd.entries:
            first = rd.entries[0].index
            base = st.snapshot.meta.index if st.snapshot else 0
            del st.entries[max(first - base - 1, 0) :]
            st.entries.extend(rd.entries)

    def _send_all(self, rd: Ready) -> None:
        for m in rd.messages:
            self.sent.append(m)
            self.queue.append(m)

    def finish(self, node_id: NodeId) -> None:
        rd, sent = self.pending.pop(node_id)
        node = self.nodes[node_id]
        st = self.storage[node_id]
        if sent:
            self._persist(st, rd)
        else:
            self._send_all(rd)
        if rd.snapshot is not None:
            st.fsm = fsm_restore(rd.snapshot.data)
            st.applied_index = rd.snapshot.meta.index
            self.installed[node_id].append(rd.snapshot)
        for e in rd.committed_entries:
            assert e.index == st.applied_index + 1, (node_id, e.index, st.applied_index)
            st.applied_index = e.index
            if e.type is EntryType.NORMAL:
                st.fsm.append(e.data)
        self.read_states[node_id].extend(rd.read_states)
        node.advance(rd)

    def deliver(self) -> int:
        """Deliver every queued message once (in order); returns how many were delivered."""
        batch, self.queue = self.queue, []
        n = 0
        for m in batch:
            if (m.src, m.dst) in self.cut_links or self.drop(m):
                continue
            if m.dst in self.nodes:
                self.nodes[m.dst].step(m)
                n += 1
        return n

    def stabilize(self, max_rounds: int = 10_000) -> None:
        for _ in range(max_rounds):
            busy = False
            for i in list(self.nodes):
                busy |= self.process(i)
            if not self.queue and not busy:
                return
            self.deliver()
        raise AssertionError("cluster did not stabilize")

    def take(self, node_id: NodeId) -> list[Message]:
        """Process `node_id`'s Ready and return (and unqueue) the messages it emitted."""
        self.process(node_id)
        out = [m for m in self.queue if m.src == node_id]
        self.queue = [m for m in self.queue if m.src != node_id]
        return out

    def tick(self, node_id: NodeId | None = None, n: int = 1) -> None:
        for _ in range(n):
            for i in [node_id] if node_id else list(self.nodes):
                self.nodes[i].tick()

    def elect(self, node_id: NodeId) -> RaftNode:
        """Make `node_id` campaign (by ticking only it) and run the election to completion."""
        node = self.nodes[node_id]
        for _ in range(10 * self.config.election_tick):
            if node.role in (Role.PRE_CANDIDATE, Role.CANDIDATE, Role.LEADER):
                break
            node.tick()
        self.stabilize()
        assert node.role is Role.LEADER, node.role
        return node

    def crash(self, node_id: NodeId, retained: RetainedEntries | None = None) -> RaftNode:
        """Restart from persisted state only; in-memory state and queued output are lost.
        `retained`: the restarted core's source of entries below its snapshot."""
        st = self.storage[node_id]
        self.pending.pop(node_id, None)  # persisted already; its messages are never sent
        self.queue = [m for m in self.queue if m.src != node_id]
        st.fsm = fsm_restore(st.snapshot.data) if st.snapshot else []
        st.applied_index = st.snapshot.meta.index if st.snapshot else 0
        node = RaftNode(
            node_id,
            self.config,
            self.rng,
            hard_state=st.hard_state,
            snapshot=st.snapshot,
            entries=list(st.entries),
            bootstrap_voters=self.ids if node_id in self.ids else None,
            applied=st.applied_index,
            retained=retained,
        )
        self.nodes[node_id] = node
        return node

    def isolate(self, node_id: NodeId) -> None:
        for other in self.nodes:
            if other != node_id:
                self.cut_links.add((node_id, other))
                self.cut_links.add((other, node_id))

    def partition(self, *groups: Iterable[NodeId]) -> None:
        sets = [set(g) for g in groups]
        for a in self.nodes:
            for b in self.nodes:
                if a != b and not any(a in s and b in s for s in sets):
                    self.cut_links.add((a, b))

    def heal(self) -> None:
        self.cut_links.clear()

    def leader(self) -> RaftNode | None:
        leaders = [n for n in self.nodes.values() if n.role is Role.LEADER]
        return max(leaders, key=lambda n: n.term) if leaders else None

    def fsm(self, node_id: NodeId) -> list[bytes]:
        return self.storage[node_id].fsm


def role_of(node: RaftNode) -> Role:
    """`node.role`, read through a call: after `assert n.role is X`, mypy narrows `n.role` to
    `X` for good, so a later `assert n.role is Y` (once the node changed role) would be flagged
    as a comparison that can never be true. Use this for such re-checks of a role."""
    return node.role


def with_config(**kwargs: object) -> Config:
    return replace(Config(election_tick=10, heartbeat_tick=1), **kwargs)  # type: ignore[arg-type]
