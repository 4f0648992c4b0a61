"""The simulated world: virtual clock, network, nodes, clients and the fault schedule.

One `random.Random(seed)` drives every choice (fault kinds and timings, message delays, which
node a client talks to) and seeds one rng per node for the core's election timeouts, so a seed
replays exactly. Iteration over node ids is always sorted: Python randomises string hashing per
process, and set order must not leak into the schedule.

A run has two phases (VOPR style):

* **fault phase** -- clients propose, read and change membership while the world crashes,
  pauses and partitions nodes and makes the network lossy; safety invariants are checked after
  every step;
* **recovery phase** -- every fault is healed; within a bounded number of ticks a leader must
  exist, every pending proposal must resolve (commit or be known-failed) and all live voters
  must converge on the same applied sequence. That is the liveness check.
"""

from __future__ import annotations

import random
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dcl.errors import DclError
from dcl.raft.types import (
    AppendEntries,
    AppendResponse,
    ConfChange,
    ConfChangeType,
    Config,
    Entry,
    EntryType,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Message,
    Mutations,
    Ready,
    RequestVote,
    Role,
    SafetyViolation,
    SnapshotResponse,
    TimeoutNow,
    VoteResponse,
)

from .invariants import InvariantChecker
from .network import InFlight, LinkPolicy, Network
from .node import CrashPoint, SimNode, encode_state
from .trace import Trace

TICK = 10  # virtual time units per tick; message delays are finer than a tick


@dataclass(frozen=True, slots=True)
class FaultProfile:
    """Per-tick probabilities of world actions during the fault phase.

    Mutation tests use sharper profiles (for example many crashes around elections) so that
    the bug they plant becomes likely within a small seed budget.
    """

    propose: float = 0.35
    read: float = 0.06
    crash: float = 0.012
    crash_in_ready: float = 0.6  # share of crashes that strike inside a Ready
    pause: float = 0.008
    partition: float = 0.014
    flaky: float = 0.01
    membership: float = 0.02
    transfer: float = 0.008
    compact: float = 0.02
    # Allow losing a majority at once (safety must hold; progress stops until recovery).
    majority_outage: float = 0.2
    # Share of crashes, pauses and isolations aimed at the current leader.
    leader_bias: float = 0.5
    # Crashes aimed at protocol moments: a voter right after granting a vote, a leader right
    # after its commit index moved. They open the windows that lost-vote and Figure 8 bugs need.
    crash_after_vote: float = 0.0
    crash_after_commit: float = 0.0
    # A new leader dies right after persisting its first entry, before anyone saw it: leaves
    # an unreplicated entry of a newer term behind (the setup of the paper's Figure 8).
    crash_new_leader: float = 0.0
    base_drop: float = 0.01
    base_dup: float = 0.01
    base_spike: float = 0.01
    down_ticks: tuple[int, int] = (5, 50)
    partition_ticks: tuple[int, int] = (10, 60)


@dataclass(frozen=True, slots=True)
class SimOptions:
    """Shape of one simulated run."""

    nodes: int = 3
    fault_ticks: int = 1200
    recovery_ticks: int = 500
    membership: bool = True
    spare_nodes: int = 2
    # Core tuning; None means "drawn from the seed", so the seed range also explores
    # configurations (one-entry messages, no pipelining, tiny snapshot chunks...).
    election_tick: int | None = None
    heartbeat_tick: int | None = None
    snapshot_chunk_size: int | None = None
    max_entries_per_msg: int | None = None
    max_inflight_msgs: int | None = None
    pre_vote: bool = True
    check_quorum: bool = True
    defer_commit_announcement: bool | None = None
    mutations: Mutations = field(default_factory=Mutations)
    profile: FaultProfile = field(default_factory=FaultProfile)
    verbose: bool = False
    # Stop the run at the first violation (the default); tests of the checker may keep going.
    stop_on_violation: bool = True
    # Name of the scenario these options came from (tests/sim/profiles.py), for replay lines.
    scenario: str = "default"

    def replay_command(self, seed: int) -> str:
        """The command line that replays `seed` with these options, event by event."""
        parts = [f"python -m tests.sim --seed {seed} --nodes {self.nodes}",
                 f"--fault-ticks {self.fault_ticks}"]
        if self.scenario != "default":
            parts.append(f"--scenario {self.scenario}")
        if not self.membership:
            parts.append("--no-membership")
        for name in sorted(Mutations.__dataclass_fields__):
            if getattr(self.mutations, name):
                parts.append(f"--mutation {name}")
        parts.append("--verbose")
        return " ".join(parts)


@dataclass(slots=True)
class SimResult:
    seed: int
    violations: list[str]
    trace: list[str]
    faults: Counter[str]
    stats: Counter[str]
    ticks: int
    digest: int
    config: str = ""
    replay: str = ""

    @property
    def ok(self) -> bool:
        return not self.violations

    def report(self) -> str:
        lines = [f"seed {self.seed}: {len(self.violations)} violation(s); {self.config}"]
        lines += [f"  ! {v}" for v in self.violations[:5]]
        lines.append(f"  replay: {self.replay}")
        lines.append(f"  last {len(self.trace)} events:")
        lines += [f"    {line}" for line in self.trace]
        return "\n".join(lines)


@dataclass(slots=True)
class _Pending:
    node: str
    term: int
    index: int
    data: bytes
    issued: int


def describe_message(m: Message) -> str:
    """One short line per message, in the vocabulary of the Raft paper."""
    head = f"{m.src}->{m.dst} t{m.term}"
    if isinstance(m, AppendEntries):
        span = f"{m.entries[0].index}..{m.entries[-1].index}" if m.entries else "-"
        return f"{head} App prev=({m.prev_index},{m.prev_term}) ents={span} commit={m.commit}"
    if isinstance(m, AppendResponse):
        verdict = f"REJECT hint=({m.hint_index},{m.hint_term})" if m.reject else "ok"
        return f"{head} AppResp idx={m.index} {verdict}"
    if isinstance(m, RequestVote):
        kind = "PreVote" if m.pre_vote else "Vote"
        extra = " transfer" if m.transfer else ""
        return f"{head} {kind} last=({m.last_index},{m.last_term}){extra}"
    if isinstance(m, VoteResponse):
        kind = "PreVoteResp" if m.pre_vote else "VoteResp"
        return f"{head} {kind} {'granted' if m.granted else 'rejected'}"
    if isinstance(m, Heartbeat):
        return f"{head} HB commit={m.commit} ctx={m.context}"
    if isinstance(m, HeartbeatResponse):
        return f"{head} HBResp ctx={m.context}"
    if isinstance(m, InstallSnapshot):
        return (f"{head} Snap idx={m.meta.index} off={m.offset} len={len(m.data)} "
                f"done={m.done}")
    if isinstance(m, SnapshotResponse):
        return f"{head} SnapResp idx={m.index} off={m.offset} done={m.done}"
    if isinstance(m, TimeoutNow):
        return f"{head} TimeoutNow"
    return f"{head} {type(m).__name__}"


class World:
    """One seeded cluster run. Use `run()`; everything else is the machinery."""

    def __init__(self, seed: int, options: SimOptions) -> None:
        self.seed = seed
        self.options = options
        self.rng = random.Random(seed)
        self.now = 0
        self.faults: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self.trace = Trace(echo=options.verbose)
        self.checker = InvariantChecker()
        self.net = Network(self.rng, self.faults)
        self.profile = options.profile
        r = self.rng
        election_tick = options.election_tick or r.choice((6, 10, 10, 15))
        self.config = Config(
            election_tick=election_tick,
            heartbeat_tick=options.heartbeat_tick or r.choice((1, 2, 2, 3)),
            max_entries_per_msg=options.max_entries_per_msg or r.choice((1, 4, 16, 64)),
            max_inflight_msgs=options.max_inflight_msgs or r.choice((1, 4, 8, 256)),
            snapshot_chunk_size=options.snapshot_chunk_size or r.choice((16, 96, 1024, 1 << 20)),
            pre_vote=options.pre_vote,
            check_quorum=options.check_quorum,
            # Drawn from its own stream so that the other draws keep their values per seed.
            defer_commit_announcement=(
                options.defer_commit_announcement
                if options.defer_commit_announcement is not None
                else random.Random(seed ^ 0xA770).random() < 0.5
            ),
            mutations=options.mutations,
        )
        #: When a deferred commit announcement goes out (like the driver's short timer).
        self._announce_rng = random.Random(seed ^ 0xA771)
        self.voter_ids = [f"n{i}" for i in range(1, options.nodes + 1)]
        self.spare_ids = [
            f"n{i}" for i in range(options.nodes + 1, options.nodes + 1 + options.spare_nodes)
        ]
        self.nodes: dict[str, SimNode] = {}
        self._ids: list[str] = []  # sorted node ids: never iterate a set or hash order
        self._tick_interval: dict[str, int] = {}
        self._next_tick: dict[str, int] = {}
        self._restart_at: dict[str, int] = {}
        self._crash_in_ready: dict[str, CrashPoint] = {}
        self._heal_at: int | None = None
        self._policy_until: int | None = None
        self._deferred: list[InFlight] = []
        self.pending: dict[tuple[str, int], _Pending] = {}
        self._payload_seq = 0
        self._read_seq = 0
        self._in_fault_phase = True
        self.net.policy = self._base_policy()

    # -- setup ------------------------------------------------------------------------------------

    def _base_policy(self) -> LinkPolicy:
        p = self.profile
        return LinkPolicy(drop_rate=p.base_drop, dup_rate=p.base_dup, spike_rate=p.base_spike)

    def _add_node(self, node_id: str, initial_voters: frozenset[str]) -> SimNode:
        node_rng = random.Random(self.rng.getrandbits(64))
        node = SimNode(node_id, self.config, node_rng, self.checker, self.log, initial_voters)
        node.on_apply = self._on_apply
        node.on_restore = self._resolve_after_snapshot
        self.nodes[node_id] = node
        self._ids = sorted(self.nodes)
        self._tick_interval[node_id] = TICK + self.rng.choice((-1, 0, 0, 0, 1))
        self._next_tick[node_id] = self.now + self.rng.randrange(TICK)
        self._guard(node_id, "start", node.start)
        return node

    def log(self, kind: str, text: str) -> None:
        self.trace.add(self.now, kind, text)

    # -- main loop --------------------------------------------------------------------------------

    def run(self) -> SimResult:
        fault_end = self.options.fault_ticks * TICK
        hard_end = fault_end + self.options.recovery_ticks * TICK
        next_world_tick = 0
        try:
            self.log("phase", f"seed {self.seed}: {self._describe_config()}")
            initial = frozenset(self.voter_ids)
            for node_id in self.voter_ids:
                self._add_node(node_id, initial)
            while self.now <= hard_end:
                if self._in_fault_phase and self.now >= fault_end:
                    self._begin_recovery()
                if next_world_tick <= self.now:
                    next_world_tick += TICK
                    if self._in_fault_phase:
                        self._world_actions()
                    else:
                        self._recovery_actions()
                        if self._converged():
                            break
                self._service_timers()
                self._deliver_due()
                self._tick_due()
                self._process_readies()
                self._check()
                if self.checker.violations and self.options.stop_on_violation:
                    break
                self.now = self._next_event_time(next_world_tick)
            else:
                self._liveness_failure()
        except _Abort:
            pass
        self.faults["retained_catchup"] = sum(n.retained_sends for n in self.nodes.values())
        return SimResult(
            seed=self.seed,
            violations=list(self.checker.violations),
            trace=self.trace.tail(50),
            faults=self.faults,
            stats=self.stats,
            ticks=self.now // TICK,
            digest=self.trace.digest,
            config=self._describe_config(),
            replay=self.options.replay_command(self.seed),
        )

    def _describe_config(self) -> str:
        c = self.config
        return (
            f"{self.options.nodes} nodes, election_tick={c.election_tick} "
            f"heartbeat_tick={c.heartbeat_tick} max_entries={c.max_entries_per_msg} "
            f"max_inflight={c.max_inflight_msgs} chunk={c.snapshot_chunk_size} "
            f"pre_vote={c.pre_vote} check_quorum={c.check_quorum} "
            f"defer_commit_announcement={c.defer_commit_announcement}"
        )

    def _next_event_time(self, next_world_tick: int) -> int:
        candidates = [next_world_tick]
        net_next = self.net.next_time()
        if net_next is not None:
            candidates.append(net_next)
        for node_id, node in self.nodes.items():
            if node.up:
                candidates.append(self._next_tick[node_id])
        return max(self.now + 1, min(candidates))

    def _guard(
        self, node_id: str, what: str, action: Callable[..., Any], *args: Any, client: bool = False
    ) -> Any:
        """Run a core call; an exception from the core is a bug, reported with the trace.

        Client-facing calls (`client=True`) may refuse with a `DclError` (NotLeader,
        ProposalDropped...), which is passed on; `SafetyViolation` never is.
        """
        try:
            return action(*args)
        except SafetyViolation as exc:
            self.checker.fail(f"core detected a safety violation in {what} on {node_id}: {exc}")
            raise _Abort() from exc
        except DclError as exc:
            if client:
                raise
            self.checker.fail(f"core refused {what} on {node_id}: {type(exc).__name__}: {exc}")
            raise _Abort() from exc
        except Exception as exc:
            self.checker.fail(
                f"core raised in {what} on {node_id}: {type(exc).__name__}: {exc}\n"
                + "".join(traceback.format_exception(exc)[-6:])
            )
            raise _Abort() from exc

    def _deliver_due(self) -> None:
        net = self.net
        while (item := net.pop_due(self.now)) is not None:
            node = self.nodes.get(item.dst)
            if node is None or not node.up or node.removed:
                self.stats["msg_to_down_node"] += 1
                continue
            if node.paused_until > self.now:
                # A paused process still has its socket buffers: deliver on resume.
                item.deliver_at = node.paused_until + self.rng.randint(0, 3)
                self._deferred.append(item)
                continue
            self.stats["delivered"] += 1
            if self.options.verbose or not isinstance(item.message, Heartbeat | HeartbeatResponse):
                self.log("msg", describe_message(item.message) + (" (dup)" if item.duplicate
                                                                   else ""))
            core = node.core
            assert core is not None
            self._guard(node.id, "step", core.step, item.message)
            if (
                isinstance(item.message, Heartbeat)
                and self._announce_rng.random() < 0.5
            ):  # as a driver busy restoring a snapshot does: answer before the next Ready
                durable = node.durable.hard_state.term
                for answer in self._guard(
                    node.id, "answer", core.take_heartbeat_responses, durable
                ):
                    self.stats["early_heartbeat_answers"] += 1
                    self._send(answer)
        if self._deferred:
            due = [d for d in self._deferred if d.deliver_at <= self.now]
            if due:
                self._deferred = [d for d in self._deferred if d.deliver_at > self.now]
                for d in due:
                    self.net.redeliver(d, self.now)

    def _tick_due(self) -> None:
        for node_id in self._ids:
            node = self.nodes[node_id]
            while self._next_tick[node_id] <= self.now:
                self._next_tick[node_id] += self._tick_interval[node_id]
                if node.core is None or node.removed or node.paused_until > self.now:
                    continue
                self.log("tick", node_id)
                core = node.core
                if node.unadopted and self.rng.random() < 0.1:
                    node.persist_compaction()
                    self.faults["compact_adopted_later"] += 1
                    self.log("snapshot", f"{node_id} adopts its snapshot")
                self._guard(node_id, "tick", core.tick)
                self._maybe_announce(node, 1.0)

    def _process_readies(self) -> None:
        now = self.now
        busy = [
            node for node_id in self._ids
            if (node := self.nodes[node_id]).core is not None and not node.removed
            and node.paused_until <= now and node.core.has_ready()
        ]
        if len(busy) > 1:
            self.rng.shuffle(busy)
        for node in busy:
            node_id = node.id
            for _ in range(8):
                core = node.core
                if core is None or node.removed or node.paused_until > self.now:
                    break
                if not core.has_ready():
                    break
                survived = self._guard(
                    node_id, "ready", node.handle_ready, self._send, self._choose_crash
                )
                if not survived:
                    self._after_crash(node)
                    break
                self._observe(node)
            self._maybe_announce(node, 0.3)
            if node.removed and node.core is not None:
                self.log("remove", f"{node_id} applied its own removal; shutting down")
                node.core = None

    def _maybe_announce(self, node: SimNode, chance: float) -> None:
        """Send a deferred commit announcement, at the latest by the node's next tick."""
        core = node.core
        if (
            core is not None and not node.removed and core.commit_announcement_due
            and self._announce_rng.random() < chance
        ):
            self.log("announce", node.id)
            self.stats["deferred_announcements"] += 1
            self._guard(node.id, "announce", core.announce_commit)

    def _choose_crash(self, node: SimNode, ready: Ready) -> CrashPoint | None:
        planned = self._crash_in_ready.pop(node.id, None)
        if planned is not None or not self._in_fault_phase:
            return planned
        p = self.profile
        if p.crash_after_vote and any(
            isinstance(m, VoteResponse) and m.granted and not m.pre_vote for m in ready.messages
        ) and self.rng.random() < p.crash_after_vote:
            self.faults["crash_targeted_after_vote"] += 1
            return CrashPoint.AFTER_SEND
        core = node.core
        if (p.crash_new_leader and core is not None and core.role is Role.LEADER
                and any(e.type is EntryType.NOOP and e.term == core.term for e in ready.entries)
                and self.rng.random() < p.crash_new_leader):
            self.faults["crash_targeted_new_leader"] += 1
            return CrashPoint.AFTER_PERSIST
        if (p.crash_after_commit and ready.committed_entries and core is not None
                and core.role is Role.LEADER and self.rng.random() < p.crash_after_commit):
            self.faults["crash_targeted_after_commit"] += 1
            return CrashPoint.AFTER_APPLY
        return None

    def _send(self, message: Message) -> None:
        self.net.send(message.src, message.dst, message, self.now)

    def _observe(self, node: SimNode) -> None:
        """Role/term transitions: log them and check leader completeness on a new leader."""
        core = node.core
        assert core is not None
        role, term = core.role, core.term
        if role is not node.last_role or term != node.last_term:
            self.log("state", f"{node.id} -> {role.value} term={term} "
                              f"commit={core.commit_index} last={core.last_index}")
            if role is Role.LEADER:
                self.stats["elections"] += 1
                self.checker.on_became_leader(
                    node.id, term, node.log_view(), node.snapshot_index()
                )
            node.last_role, node.last_term = role, term
        if node.read_states:
            for rs in node.read_states:
                self.checker.on_read_state(rs.request_id, node.id, rs.index)
                self.stats["reads_answered"] += 1
            node.read_states.clear()

    def _check(self) -> None:
        for node_id in self._ids:
            node = self.nodes[node_id]
            core = node.core
            if core is None:
                continue
            self.checker.check_commit(node_id, core.commit_index)
            if core.role is Role.LEADER:
                self.checker.check_leader_role(node_id, core.term)
                if core.last_index > core.commit_index:
                    self.checker.check_pending_conf(
                        node_id, core.term, core.commit_index, node.uncommitted_conf()
                    )

    # -- crashes, pauses, partitions --------------------------------------------------------------

    def _after_crash(self, node: SimNode) -> None:
        point = node.crash_point
        self.faults["crash_" + (point.name.lower() if point is not None else "idle")] += 1
        lo, hi = self.profile.down_ticks
        self._restart_at[node.id] = self.now + self.rng.randint(lo, hi) * TICK
        self._drop_pending(node.id)

    def _crash(self, node: SimNode) -> None:
        if self.rng.random() < self.profile.crash_in_ready:
            point = CrashPoint(self.rng.randrange(len(CrashPoint)))
            self._crash_in_ready[node.id] = point
            self.log("fault", f"{node.id} will crash {point.name} in its next Ready")
            return
        self.log("fault", f"{node.id} crashes (idle)")
        node.crash()
        self._after_crash(node)

    def _restart(self, node: SimNode) -> None:
        self.log("fault", f"{node.id} restarts from durable state "
                          f"(hs={node.durable.hard_state}, {len(node.durable.entries)} entries)")
        self.faults["restart"] += 1
        self._guard(node.id, "restart", node.start)
        self._next_tick[node.id] = self.now + self.rng.randrange(TICK)

    def _service_timers(self) -> None:
        for node_id in sorted(self._restart_at):
            if self._restart_at[node_id] <= self.now:
                del self._restart_at[node_id]
                node = self.nodes[node_id]
                if not node.removed:
                    self._restart(node)
        if self._heal_at is not None and self._heal_at <= self.now:
            self._heal_at = None
            self.net.heal()
            self.log("fault", "partition healed")
        if self._policy_until is not None and self._policy_until <= self.now:
            self._policy_until = None
            self.net.policy = self._base_policy()
            self.log("fault", "network back to normal")

    def _drop_pending(self, node_id: str) -> None:
        """Proposals at a crashed or removed node have an unknown outcome; stop tracking them."""
        for key in [k for k in self.pending if k[0] == node_id]:
            del self.pending[key]
            self.stats["proposals_indeterminate"] += 1

    def _live(self) -> list[SimNode]:
        return [self.nodes[i] for i in sorted(self.nodes)
                if self.nodes[i].up and not self.nodes[i].removed]

    def _leader(self) -> SimNode | None:
        best: SimNode | None = None
        for node in self._live():
            core = node.core
            assert core is not None
            if core.role is Role.LEADER and (best is None or core.term > best.core.term):  # type: ignore[union-attr]
                best = node
        return best

    def _aim(self, leader: SimNode | None, candidates: list[str]) -> str:
        """Pick a fault's victim, preferring the leader (leader faults stress Raft the most)."""
        if leader is not None and leader.id in candidates and \
                self.rng.random() < self.profile.leader_bias:
            return leader.id
        return self.rng.choice(candidates)

    def _inject_fault(self) -> None:
        p = self.profile
        kinds = ["crash", "pause", "partition", "flaky"]
        weights = [p.crash, p.pause, p.partition, p.flaky]
        kind = self.rng.choices(kinds, weights)[0]
        live = self._live()
        members = [n.id for n in live]
        down = sum(1 for n in self.nodes.values() if not n.removed and
                   (not n.up or n.paused_until > self.now))
        limit = len(self.voter_ids) // 2
        if kind in ("crash", "pause") and down >= limit and self.rng.random() > p.majority_outage:
            kind = "partition"
        leader = self._leader()
        if kind in ("crash", "pause"):
            if not live:
                return
            target = self.nodes[self._aim(leader, [n.id for n in live])]
            if kind == "crash":
                self._crash(target)
            else:
                lo, hi = p.down_ticks
                target.paused_until = self.now + self.rng.randint(lo, hi) * TICK
                self.faults["pause"] += 1
                self.log("fault", f"{target.id} paused until t={target.paused_until}")
        elif kind == "partition":
            if len(members) < 2:
                return
            self.net.heal()
            shape = self.rng.choice(("isolate", "split", "one_way"))
            if shape == "isolate":
                victim = self._aim(leader, members)
                self.net.isolate(victim, sorted(self.nodes))
                text = f"isolate {victim}"
            elif shape == "split":
                shuffled = list(members)
                self.rng.shuffle(shuffled)
                at = self.rng.randint(1, len(shuffled) - 1)
                self.net.split(shuffled[:at], shuffled[at:])
                text = f"split {sorted(shuffled[:at])} | {sorted(shuffled[at:])}"
            else:
                src = self._aim(leader, members)
                dsts = [m for m in members if m != src]
                cut = self.rng.sample(dsts, self.rng.randint(1, len(dsts)))
                inbound = self.rng.random() < 0.5
                for d in sorted(cut):
                    if inbound:
                        self.net.block_one_way(d, src)
                    else:
                        self.net.block_one_way(src, d)
                text = (f"one-way: {src} {'cannot hear' if inbound else 'cannot reach'} "
                        f"{sorted(cut)}")
            self.faults["partition_" + shape] += 1
            lo, hi = p.partition_ticks
            self._heal_at = self.now + self.rng.randint(lo, hi) * TICK
            self.log("fault", f"partition {text} until t={self._heal_at}")
        else:
            self.net.policy = LinkPolicy(
                min_delay=1,
                max_delay=self.rng.choice((12, 25, 40)),
                drop_rate=self.rng.choice((0.05, 0.15, 0.3)),
                dup_rate=self.rng.choice((0.02, 0.1, 0.2)),
                spike_rate=self.rng.choice((0.02, 0.1)),
            )
            self.faults["flaky_network"] += 1
            lo, hi = p.partition_ticks
            self._policy_until = self.now + self.rng.randint(lo, hi) * TICK
            self.log("fault", f"network flaky {self.net.policy} until t={self._policy_until}")

    # -- clients ------------------------------------------------------------------------------

    def _world_actions(self) -> None:
        p = self.profile
        r = self.rng.random
        if r() < p.propose:
            self._client_propose()
        if r() < p.read:
            self._client_read()
        if r() < p.crash + p.pause + p.partition + p.flaky:
            self._inject_fault()
        if self.options.membership and r() < p.membership:
            self._change_membership()
        if r() < p.transfer:
            self._transfer()
        if r() < p.compact:
            self._compact()

    def _pick_target(self) -> SimNode | None:
        live = self._live()
        if not live:
            return None
        leader = self._leader()
        if leader is not None and self.rng.random() < 0.85:
            return leader
        return self.rng.choice(live)

    def _client_propose(self) -> None:
        node = self._pick_target()
        if node is None:
            return
        self._payload_seq += 1
        data = f"c{self._payload_seq}".encode()
        core = node.core
        assert core is not None
        self.stats["proposals"] += 1
        try:
            result = self._guard(node.id, "propose", core.propose, data, client=True)
        except DclError as exc:
            self.stats["proposals_refused"] += 1
            self.log("client", f"propose {data!r} at {node.id}: {type(exc).__name__}")
            return
        if isinstance(result, DclError):
            self.stats["proposals_refused"] += 1
            self.log("client", f"propose {data!r} at {node.id}: {type(result).__name__}")
            return
        term, index = result
        self.pending[(node.id, index)] = _Pending(node.id, term, index, data, self.now)
        self.log("client", f"propose {data!r} at {node.id} -> (term {term}, index {index})")

    def _on_apply(self, node: SimNode, entry: Entry) -> None:
        pending = self.pending.get((node.id, entry.index))
        if pending is None:
            return
        del self.pending[(node.id, entry.index)]
        if entry.term == pending.term and entry.data == pending.data:
            self.checker.on_acknowledged(entry.index, entry.encode())
            self.stats["proposals_acked"] += 1
            self.log("client", f"ack {pending.data!r} committed at {entry.index}")
        else:
            self.stats["proposals_failed"] += 1

    def _resolve_after_snapshot(self, node: SimNode) -> None:
        """A snapshot can skip over a proposer's pending index: decide it from the state."""
        self.faults["snapshot_install"] += 1
        for key in [k for k in self.pending if k[0] == node.id]:
            pending = self.pending[key]
            if pending.index <= len(node.applied):
                del self.pending[key]
                if node.applied[pending.index - 1][1:] == pending.data:
                    self.checker.on_acknowledged(pending.index, node.applied[pending.index - 1])
                    self.stats["proposals_acked"] += 1
                else:
                    self.stats["proposals_failed"] += 1

    def _client_read(self) -> None:
        node = self._pick_target()
        if node is None:
            return
        self._read_seq += 1
        request_id = self._read_seq
        core = node.core
        assert core is not None
        self.checker.on_read_issued(request_id, node.id, self.now)
        self.stats["reads"] += 1
        try:
            self._guard(node.id, "read_index", core.read_index, request_id, client=True)
        except DclError as exc:
            self.log("client", f"read {request_id} at {node.id}: {type(exc).__name__}")
            return
        self.log("client", f"read_index {request_id} at {node.id} "
                           f"(acked up to {self.checker.highest_acknowledged})")

    def _change_membership(self) -> None:
        leader = self._leader()
        if leader is None:
            return
        core = leader.core
        assert core is not None
        voters = sorted(core.voters)
        learners = sorted(core.learners)
        options: list[ConfChange] = []
        fresh = [i for i in self.spare_ids if i not in self.nodes]
        if fresh:
            options.append(ConfChange(ConfChangeType.ADD_LEARNER, fresh[0]))
        for learner in learners:
            options.append(ConfChange(ConfChangeType.PROMOTE_LEARNER, learner))
            options.append(ConfChange(ConfChangeType.REMOVE_NODE, learner))
        if len(voters) > 3:
            for voter in voters:
                options.append(ConfChange(ConfChangeType.REMOVE_NODE, voter))
        if not options:
            return
        change = self.rng.choice(options)
        if change.type is ConfChangeType.ADD_LEARNER:
            self._add_node(change.node_id, frozenset())
            self.log("member", f"started empty node {change.node_id}")
        self.stats["conf_changes"] += 1
        try:
            self._guard(leader.id, "propose_conf_change",
                        core.propose_conf_change, change, client=True)
        except DclError as exc:
            self.log("member", f"{change.type.name} {change.node_id} at {leader.id}: "
                               f"{type(exc).__name__}: {exc}")
            self.stats["conf_changes_refused"] += 1
            return
        self.faults["member_" + change.type.name.lower()] += 1
        if change.type is ConfChangeType.REMOVE_NODE:
            if change.node_id == leader.id:
                self.faults["member_remove_leader"] += 1
            elif change.node_id in learners:
                self.faults["member_remove_learner"] += 1
        self.log("member", f"propose {change.type.name} {change.node_id} at {leader.id}")

    def _transfer(self) -> None:
        leader = self._leader()
        if leader is None:
            return
        core = leader.core
        assert core is not None
        targets = [v for v in sorted(core.voters) if v != leader.id]
        if not targets:
            return
        target = self.rng.choice(targets)
        try:
            self._guard(
                leader.id, "transfer", core.transfer_leadership, target, client=True
            )
        except DclError as exc:
            self.log("member", f"transfer {leader.id}->{target}: {type(exc).__name__}")
            return
        self.faults["transfer_leadership"] += 1
        self.log("member", f"transfer leadership {leader.id} -> {target}")

    def _compact(self) -> None:
        live = self._live()
        if not live:
            return
        node = self.rng.choice(live)
        core = node.core
        assert core is not None
        low = node.snapshot_index() + 1
        high = len(node.applied)
        if high - low < 4:
            return
        index = self.rng.randint(low, high - 2)
        data = encode_state(node.applied[:index])
        self._guard(node.id, "compact", core.compact, index, data)
        if self.rng.random() < 0.5:
            # As the driver does: the snapshot is written in the background and adopted
            # (the stored log cut to it) later; meanwhile the stored log is whole.
            node.unadopted = True
            self.log("snapshot", f"{node.id} compacts log up to {index}, adopts later")
        else:
            node.persist_compaction()
            self.log("snapshot", f"{node.id} compacts log up to {index}")
        self.faults["compact"] += 1

    # -- recovery and liveness --------------------------------------------------------------------

    def _begin_recovery(self) -> None:
        self._in_fault_phase = False
        self._recovery_started = self.now
        self.net.heal()
        self.net.policy = LinkPolicy(drop_rate=0.0, dup_rate=0.0, spike_rate=0.0)
        self._heal_at = None
        self._policy_until = None
        self._crash_in_ready.clear()
        for node_id in sorted(self.nodes):
            node = self.nodes[node_id]
            node.paused_until = 0
            if not node.up and not node.removed:
                self._restart_at.pop(node_id, None)
                self._restart(node)
        self.log("phase", "recovery: all faults healed")

    def _recovery_actions(self) -> None:
        """Keep reads flowing so ReadIndex is also checked on a healthy cluster.

        Without pre-vote and check-quorum, a server removed from the configuration that never
        learned it keeps timing out with ever higher terms and deposes every leader (Raft
        thesis §4.2.3) -- a known liveness limit, not a bug. In that mode the operator
        decommissions servers the leader no longer lists; with the refinements on, removed
        servers stay up, since the refinements exist to make them harmless.
        """
        if self.rng.random() < self.profile.read:
            self._client_read()
        if self.config.pre_vote and self.config.check_quorum:
            return
        leader = self._leader()
        if leader is None:
            return
        lcore = leader.core
        assert lcore is not None
        if lcore.commit_index < lcore.pending_conf_index:
            return
        members = lcore.voters | lcore.learners
        for node in self._live():
            if node.id not in members:
                self.log("member", f"decommission {node.id} (not in {sorted(members)})")
                self.faults["decommission_removed"] += 1
                node.removed = True
                node.core = None
                self._drop_pending(node.id)

    def _converged(self) -> bool:
        leader = self._leader()
        if leader is None:
            return False
        lcore = leader.core
        assert lcore is not None
        if lcore.commit_index < lcore.last_index:
            return False
        reference = leader.applied
        if len(reference) != lcore.commit_index:
            return False
        members = lcore.voters | lcore.learners
        for member in sorted(members):
            node = self.nodes.get(member)
            if node is None or node.core is None or node.removed:
                return False
            if node.applied != reference:
                return False
        # Every member now holds exactly the committed log. A pending proposal at or below the
        # commit index would have been resolved when its proposer applied it; one above it is
        # in no member's log, and no future leader can bring it back (leaders only append
        # entries of their own, newer, terms): it is known-failed. Proposals at nodes outside
        # the configuration (removed without learning it) have an unknown outcome.
        for key, pending in sorted(self.pending.items()):
            if pending.node not in members:
                self.stats["proposals_indeterminate"] += 1
            elif pending.index > lcore.commit_index:
                self.stats["proposals_failed"] += 1
            else:
                return False
            del self.pending[key]
        if len(reference) < self.checker.highest_acknowledged:
            self.checker.fail(
                f"lost acknowledged write: cluster converged on {len(reference)} entries, "
                f"index {self.checker.highest_acknowledged} was acknowledged"
            )
        self.stats["recovery_ticks"] += (self.now - self._recovery_started) // TICK
        return True

    def _liveness_failure(self) -> None:
        states = "; ".join(self.nodes[i].describe() for i in sorted(self.nodes))
        pend = sorted((p.node, p.index) for p in self.pending.values())
        self.checker.fail(
            f"liveness: no convergence within {self.options.recovery_ticks} ticks of healing "
            f"(pending proposals {pend[:10]}); nodes: {states}"
        )


class _Abort(Exception):
    """Unwinds the main loop after the core raised; the violation is already recorded."""


def run_seed(seed: int, options: SimOptions | None = None) -> SimResult:
    """Run one seed; the result is a pure function of (seed, options)."""
    return World(seed, options or SimOptions()).run()
