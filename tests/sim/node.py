"""A simulated driver around one Raft core: durable storage, the Ready loop, the state machine.

This is the in-memory twin of `dcl.raft.driver`. It follows the driver contract of
`dcl.raft.types.Ready` to the letter, because the contract is what makes crashes safe:

1. persist snapshot, entries and hard state;
2. send messages (they may acknowledge what step 1 made durable);
3. restore the state machine from the snapshot, then apply committed entries;
4. hand read states to readers;
5. `advance(ready)`.

A crash may be injected between any two of those steps (`CrashPoint`). Whatever step 1 did not
reach is lost, exactly like unsynced writes on a real disk; the state machine lives in memory
and is rebuilt from the durable snapshot and log on restart (the core hands committed entries
out again).

The state machine is the list of applied entry encodings, one per log index starting at 1, so
"same position, same payload" is a direct check; snapshot data is a compact encoding of it.
"""

from __future__ import annotations

import enum
import itertools
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from dcl.raft.core import RaftNode
from dcl.raft.types import (
    ConfChange,
    ConfChangeType,
    Config,
    Entry,
    EntryType,
    HardState,
    Message,
    ReadState,
    Ready,
    Role,
    Snapshot,
)

from .invariants import InvariantChecker, LogEntry

_LEN = struct.Struct(">I")


def encode_state(applied: list[bytes]) -> bytes:
    """Snapshot data: u32 count, then u32-length-prefixed entry encodings."""
    parts = [_LEN.pack(len(applied))]
    for item in applied:
        parts.append(_LEN.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def decode_state(data: bytes | memoryview) -> list[bytes]:
    data = bytes(data)
    (count,) = _LEN.unpack_from(data, 0)
    pos = _LEN.size
    out: list[bytes] = []
    for _ in range(count):
        (n,) = _LEN.unpack_from(data, pos)
        pos += _LEN.size
        out.append(data[pos : pos + n])
        pos += n
    if pos != len(data):
        raise ValueError(f"snapshot data has {len(data) - pos} trailing bytes")
    return out


def normalise(entry: Entry) -> LogEntry:
    kind = {EntryType.NORMAL: "normal", EntryType.NOOP: "empty", EntryType.CONF_CHANGE: "conf"}
    return LogEntry(entry.index, entry.term, kind[entry.type], entry.encode())


def _dst(message: Message) -> str:
    return message.dst


class CrashPoint(enum.IntEnum):
    """Where in the Ready loop a crash strikes; later points mean more work survived."""

    BEFORE_PERSIST = 0
    AFTER_PERSIST = 1  # durable, but no message sent
    AFTER_SEND = 2  # sent, nothing applied
    AFTER_APPLY = 3  # applied, not advanced


@dataclass(slots=True)
class DurableState:
    """What survives a crash: exactly what the driver persisted in step 1."""

    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot | None = None
    # Contiguous entries following the snapshot (or index 0).
    entries: list[Entry] = field(default_factory=list)
    # Contiguous entries ending at the snapshot index, kept below it (RaftStorage's
    # retention), which the core may send to a follower behind its in-memory log.
    retained: list[Entry] = field(default_factory=list)

    def first_index(self) -> int:
        return (self.snapshot.meta.index if self.snapshot else 0) + 1

    def term_at(self, index: int) -> int | None:
        snap = self.snapshot
        if snap is not None and index == snap.meta.index:
            return snap.meta.term
        if index == 0:
            return 0
        offset = index - self.first_index()
        if 0 <= offset < len(self.entries):
            return self.entries[offset].term
        return None


class SimNode:
    """One server: a core (None while crashed), its durable state and its state machine."""

    def __init__(
        self,
        node_id: str,
        config: Config,
        rng: random.Random,
        checker: InvariantChecker,
        log: Callable[[str, str], None],
        initial_voters: frozenset[str],
    ) -> None:
        self.id = node_id
        self.config = config
        self.rng = rng
        self.checker = checker
        self._log = log
        self.initial_voters = initial_voters
        self.durable = DurableState()
        #: Entries kept below the snapshot: by node, so the same seeds see the same events
        #: and some nodes keep none (their followers still need snapshots).
        self.retain = (8, 64, 0)[int(node_id[1:]) % 3]
        self.retained_sends = 0
        #: The core compacted but the durable state still holds the previous snapshot and
        #: the whole log (the driver's background snapshot write): `persist_compaction` later.
        self.unadopted = False
        self.core: RaftNode | None = None
        self.applied: list[bytes] = []
        self.paused_until = 0
        self.removed = False
        self.crashes = 0
        self.last_role: Role | None = None
        self.last_term = 0
        self.crash_point: CrashPoint | None = None
        # Read states from the last Readies, drained (and checked) by the world after each one.
        self.read_states: list[ReadState] = []
        self.on_apply: Callable[[SimNode, Entry], None] | None = None
        self.on_restore: Callable[[SimNode], None] | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self.core is not None

    def start(self) -> None:
        """(Re)build the core from durable state only: anything unpersisted is gone."""
        d = self.durable
        # Founders always pass the bootstrap voters: the core uses them only while nothing
        # at all was persisted, which is exactly a founder that crashed before its first fsync.
        self.core = RaftNode(
            self.id,
            self.config,
            self.rng,
            hard_state=d.hard_state,
            snapshot=d.snapshot,
            entries=list(d.entries),
            bootstrap_voters=self.initial_voters or None,
            retained=self._retained,
        )
        self.applied = decode_state(d.snapshot.data) if d.snapshot else []
        self.read_states.clear()
        self.last_role = None
        self.checker.on_restart(self.id, self.core.commit_index)

    def crash(self) -> None:
        self.core = None
        self.unadopted = False  # the durable state still has the previous snapshot
        self.crash_point = None
        self.crashes += 1
        self.read_states.clear()

    # -- the Ready loop ---------------------------------------------------------------------------

    def handle_ready(
        self,
        send: Callable[[Message], None],
        choose_crash: Callable[[SimNode, Ready], CrashPoint | None],
    ) -> bool:
        """Run one Ready through the driver contract; returns False if it crashed part way.

        `choose_crash` sees the Ready first, so the world can aim crashes at protocol moments
        (right after granting a vote, right after a commit) as well as at random.
        """
        core = self.core
        assert core is not None
        if not core.has_ready():
            return True
        ready: Ready = core.ready()
        crash_at = choose_crash(self, ready)
        if crash_at is CrashPoint.BEFORE_PERSIST:
            return self._crash_in_ready(crash_at, ready)
        self._persist(ready)
        if crash_at is CrashPoint.AFTER_PERSIST:
            return self._crash_in_ready(crash_at, ready)
        # Stable sort by destination: the core may build messages in set order, which varies
        # with the per-process string hash seed and would break replay of a seed.
        for message in sorted(ready.messages, key=_dst):
            send(message)
        if crash_at is CrashPoint.AFTER_SEND:
            return self._crash_in_ready(crash_at, ready)
        self._apply(ready)
        if crash_at is CrashPoint.AFTER_APPLY:
            return self._crash_in_ready(crash_at, ready)
        core.advance(ready)
        return True

    def _crash_in_ready(self, point: CrashPoint, ready: Ready) -> bool:
        self._log(
            "crash",
            f"{self.id} crashes {point.name} (ready: {len(ready.entries)} entries, "
            f"{len(ready.messages)} msgs, {len(ready.committed_entries)} committed)",
        )
        self.crash()
        self.crash_point = point
        return False

    def _persist(self, ready: Ready) -> None:
        d = self.durable
        if ready.snapshot is not None:
            snap = ready.snapshot
            # The core resets its log to an installed snapshot; the stored log follows it,
            # keeping what it held up to the snapshot only if that provably matches (the
            # entry at the snapshot index has its term), as RaftStorage does.
            matches = d.term_at(snap.meta.index) == snap.meta.term
            below = [e for e in d.retained + d.entries if e.index <= snap.meta.index]
            d.snapshot = snap
            d.entries = []
            d.retained = self._keep(below) if matches else []
            self.unadopted = False  # an own snapshot still to adopt is older: dropped
        if ready.entries:
            first = ready.entries[0].index
            start = d.first_index()
            if first < start:
                raise AssertionError(
                    f"node {self.id}: ready entries start at {first}, below log start {start}"
                )
            prev_term = d.term_at(first - 1)
            if prev_term is None:
                raise AssertionError(
                    f"node {self.id}: ready entries start at {first}, log ends at "
                    f"{start + len(d.entries) - 1} (gap)"
                )
            del d.entries[first - start :]
            d.entries.extend(ready.entries)
            self.checker.on_persist(self.id, [normalise(e) for e in ready.entries], prev_term)
        if ready.hard_state is not None:
            d.hard_state = ready.hard_state

    def _apply(self, ready: Ready) -> None:
        core = self.core
        assert core is not None
        term = core.term
        if ready.snapshot is not None:
            snap = ready.snapshot
            state = decode_state(snap.data)
            if len(state) != snap.meta.index:
                self.checker.fail(
                    f"snapshot at {snap.meta.index} on {self.id} holds {len(state)} entries"
                )
            self.applied = state
            self.checker.on_applied_state(self.id, 1, state, term)
            self._log("snapshot", f"{self.id} installs snapshot at {snap.meta.index}")
            if self.on_restore is not None:
                self.on_restore(self)
        if ready.committed_entries:
            self.checker.on_committed(
                self.id, [normalise(e) for e in ready.committed_entries], term
            )
        for entry in ready.committed_entries:
            expected = len(self.applied) + 1
            if entry.index != expected:
                if entry.index <= len(self.applied):
                    # Re-delivery after restart or snapshot: must be identical.
                    if self.applied[entry.index - 1] != entry.encode():
                        self.checker.fail(
                            f"node {self.id} re-applies {entry.index} with different data"
                        )
                    continue
                self.checker.fail(
                    f"node {self.id} applies index {entry.index}, expected {expected}"
                )
                return
            payload = entry.encode()
            self.applied.append(payload)
            self.checker.on_applied_state(self.id, entry.index, [payload], term)
            if entry.type is EntryType.CONF_CHANGE:
                change = ConfChange.decode(entry.data)
                self._log("conf", f"{self.id} applies {change.type.name} {change.node_id}")
                if change.type is ConfChangeType.REMOVE_NODE and change.node_id == self.id:
                    self.removed = True
            if self.on_apply is not None:
                self.on_apply(self, entry)
        self.read_states.extend(ready.read_states)

    # -- views for the checker --------------------------------------------------------------------

    def log_view(self) -> dict[int, tuple[int, bytes]]:
        """index -> (term, encoding) of the core's log (persisted or not)."""
        core = self.core
        assert core is not None
        return {e.index: (e.term, e.encode())
                for e in core.entries(core.first_index, core.last_index + 1)}

    def uncommitted_conf(self) -> list[LogEntry]:
        """Configuration-change entries above the commit index of the core's log."""
        core = self.core
        assert core is not None
        conf = EntryType.CONF_CHANGE
        return [
            normalise(e)
            for e in core.entries(core.commit_index + 1, core.last_index + 1)
            if e.type is conf
        ]

    def snapshot_index(self) -> int:
        core = self.core
        assert core is not None
        return core.first_index - 1

    def persist_compaction(self) -> None:
        """After `compact`: the application made the snapshot durable before telling the core."""
        core = self.core
        assert core is not None
        snap = core.snapshot
        assert snap is not None
        d = self.durable
        self.unadopted = False
        if d.snapshot is not None and d.snapshot.meta.index >= snap.meta.index:
            return  # one installed since is at least as new
        d.snapshot = snap
        d.retained = self._keep(
            d.retained + [e for e in d.entries if e.index <= snap.meta.index])
        d.entries = [e for e in d.entries if e.index > snap.meta.index]

    def _keep(self, below: list[Entry]) -> list[Entry]:
        """The last `retain` entries of `below` (contiguous, ending at the snapshot)."""
        kept = below[-self.retain:] if self.retain else []
        for a, b in itertools.pairwise(kept):
            assert b.index == a.index + 1, f"{self.id}: retained entries not contiguous"
        return kept

    def _retained(
        self, prev: int, max_entries: int, max_bytes: int
    ) -> tuple[int, list[Entry]] | None:
        """RaftNode's `retained`: read from durable state, as RaftStorage reads its log
        (including the part a snapshot not yet adopted covers: the core asks only for
        entries up to its own snapshot index)."""
        if not self.retain:
            return None  # off, as RaftStorage(retain_bytes=0)
        d = self.durable
        kept = d.retained + d.entries
        if not kept or not kept[0].index - 1 <= prev < kept[-1].index:
            return None
        off = prev - kept[0].index
        if off < 0:  # right before the stored log: only the stored snapshot knows its term
            term = d.term_at(prev)
            if term is None:
                return None
        else:
            assert kept[off].index == prev, f"{self.id}: stored log not contiguous at {prev}"
            term = kept[off].term
        self.retained_sends += 1
        return term, kept[off + 1 : off + 1 + max_entries]

    def describe(self) -> str:
        core = self.core
        if core is None:
            return f"{self.id}: down"
        return (
            f"{self.id}: {core.role.value} term={core.term} leader={core.leader_id} "
            f"commit={core.commit_index} last={core.last_index} applied={len(self.applied)}"
        )
