"""SWIM membership as a pure state machine (sans-I/O, in the style of h11 and etcd-io/raft).

The core owns no clock, socket or random source: the driver (or a simulator) feeds it
`tick(now)`, `receive(now, packet, from_addr)` and push-pull state, then drains
`take_outbox()` (datagrams to send) and `take_events()` (member transitions). The same core
therefore runs under the asyncio driver and under a seeded deterministic network in tests.

Protocol (SWIM + the memberlist refinements that matter on a LAN):
- Every `probe_interval` the node pings the next member of a shuffled round-robin order. No
  ack within `probe_timeout` -> ask `indirect_checks` other members to ping it (ping-req).
  No ack, direct or relayed, by the end of the interval -> the member becomes SUSPECT.
- A SUSPECT member is declared DEAD (event FAILED) after
  `suspicion_mult * max(1, log10(n)) * probe_interval` unless it refutes first: a member
  that hears it is suspected (or dead) re-announces itself ALIVE with a higher incarnation.
- Updates (whole `Member` records) are piggybacked on every datagram, newest first, and
  each is retransmitted `retransmit_mult * ceil(log10(n + 1))` times; pending updates are also
  pushed to `gossip_nodes` random members every `gossip_interval`, so news does not wait for
  probes (and a leaving node can announce itself without probing).
- Ordering rule: news about a member is accepted only if its incarnation is higher, or equal
  with a "worse" state (ALIVE < SUSPECT < DEAD/LEFT). DEAD and LEFT are terminal for that
  incarnation; LEFT is reached only by the member's own announcement, which raises its
  incarnation, so stale ALIVE gossip cannot resurrect a member that left.
- Dead and left records are kept as tombstones and sent in push-pull, so a node that joins
  later also refuses stale news about them.
Events fire only on transitions (unknown/gone -> live: JOIN, live -> DEAD: FAILED,
live -> LEFT: LEAVE, live with changed addr/tags: UPDATE), so duplicates are impossible by
construction. No events are generated for the local node.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, MutableSequence, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from dcl.membership import wire
from dcl.membership.errors import GossipConfigError
from dcl.membership.model import (
    GONE_STATES,
    LIVE_STATES,
    Ack,
    Addr,
    EventKind,
    Member,
    MemberEvent,
    MemberState,
    Message,
    Packet,
    Ping,
    PingReq,
)

_T = TypeVar("_T")
DEAD = MemberState.DEAD


class RandomSource(Protocol):
    """The slice of `random.Random` the core uses; inject a seeded one for replayable runs."""

    def random(self) -> float: ...

    def shuffle(self, x: MutableSequence[Any]) -> None: ...

    def sample(self, population: Sequence[_T], k: int) -> list[_T]: ...


@dataclass(frozen=True, slots=True)
class SwimConfig:
    """Protocol timing. Defaults are LAN-ish (twice memberlist's LAN probe rate).

    With n <= 10 a crashed member is first probed within ~probe_interval, suspected at the end
    of that probe round, and declared dead `suspicion_mult * probe_interval` (2 s) later:
    about 2.5-3.5 s in total.
    """

    probe_interval: float = 0.5
    probe_timeout: float = 0.25
    indirect_checks: int = 3
    suspicion_mult: float = 4.0
    retransmit_mult: int = 4
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    # Bytes of piggybacked updates per datagram; keeps packets under a 1500-byte MTU
    # once the message, JSON framing and AES-GCM overhead are added.
    packet_budget: int = 1200

    def __post_init__(self) -> None:
        if not 0 < self.probe_timeout < self.probe_interval:
            raise GossipConfigError("need 0 < probe_timeout < probe_interval")
        if self.gossip_interval <= 0 or self.suspicion_mult <= 0:
            raise GossipConfigError("gossip_interval and suspicion_mult must be positive")
        if min(self.indirect_checks, self.retransmit_mult, self.gossip_nodes) < 0:
            raise GossipConfigError("counts must not be negative")
        if self.packet_budget < 200:
            raise GossipConfigError("packet_budget too small to carry one update")


@dataclass(slots=True)
class _Probe:
    seq: int
    target: str
    started: float
    indirect_sent: bool = False


@dataclass(slots=True)
class _Relay:
    origin_seq: int
    origin_addr: Addr
    expires: float


@dataclass(slots=True)
class _Broadcast:
    member: Member
    transmits: int = 0


class Swim:
    """One node's view of the cluster. Not thread-safe; the driver serialises all calls."""

    def __init__(
        self,
        name: str,
        addr: Addr,
        tags: Mapping[str, str],
        config: SwimConfig,
        rng: RandomSource,
        now: float,
        incarnation: int = 0,
    ) -> None:
        self.name = name
        self.config = config
        self._rng = rng
        local = Member(name, addr, dict(tags), MemberState.ALIVE, incarnation)
        self._check_fits(local)
        self._members: dict[str, Member] = {name: local}
        self._suspect_deadline: dict[str, float] = {}
        self._dead_since: dict[str, float] = {}
        self._broadcasts: dict[str, _Broadcast] = {}
        self._outbox: list[tuple[Addr, Packet]] = []
        self._events: list[MemberEvent] = []
        self._probe: _Probe | None = None
        self._probe_order: list[str] = []
        self._probe_index = 0
        self._relays: dict[int, _Relay] = {}
        self._seq = 0
        self._leaving = False
        # Random phase so nodes started together do not probe in lockstep.
        self._next_probe_at = now + rng.random() * config.probe_interval
        self._next_gossip_at = now + config.gossip_interval
        self._enqueue(local)

    # ----------------------------------------------------------------- queries

    @property
    def local_member(self) -> Member:
        return self._members[self.name]

    @property
    def leaving(self) -> bool:
        return self._leaving

    def members(self) -> list[Member]:
        """Every known record, tombstones (DEAD/LEFT) included, sorted by name."""
        return [self._members[n] for n in sorted(self._members)]

    def member(self, name: str) -> Member | None:
        return self._members.get(name)

    def live_peers(self) -> list[Member]:
        return [
            m for n, m in self._members.items() if n != self.name and m.state in LIVE_STATES
        ]

    def pending_broadcasts(self) -> int:
        return len(self._broadcasts)

    def leave_announced(self) -> bool:
        """True once our LEFT record used up its retransmits (or nobody is left to tell)."""
        return self._leaving and (self.name not in self._broadcasts or not self.live_peers())

    def next_deadline(self) -> float:
        """Earliest time at which `tick` has work to do; the driver sleeps until then."""
        times = [self._next_gossip_at, *self._suspect_deadline.values()]
        if not self._leaving:
            times.append(self._next_probe_at)
        p = self._probe
        if p is not None:
            times.append(p.started + self.config.probe_interval)
            if not p.indirect_sent:
                times.append(p.started + self.config.probe_timeout)
        times.extend(r.expires for r in self._relays.values())
        return min(times)

    def take_outbox(self) -> list[tuple[Addr, Packet]]:
        out, self._outbox = self._outbox, []
        return out

    def take_events(self) -> list[MemberEvent]:
        out, self._events = self._events, []
        return out

    # ----------------------------------------------------------------- inputs

    def tick(self, now: float) -> None:
        self._expire_relays(now)
        self._expire_suspicions(now)
        if self._probe is not None:
            self._advance_probe(now)
        if not self._leaving and now >= self._next_probe_at:
            # Schedule from `now`, not from the missed deadline: a stalled loop must not
            # come back and fire a burst of probes.
            self._next_probe_at = now + self.config.probe_interval
            self._start_probe(now)
        if now >= self._next_gossip_at:
            self._next_gossip_at = now + self.config.gossip_interval
            self._gossip()

    def receive(self, now: float, packet: Packet, from_addr: Addr) -> None:
        for update in packet.updates:
            self._merge(now, update)
        msg = packet.message
        if isinstance(msg, Ping):
            if msg.target == self.name:
                # A member we hold DEAD is still probing us: tell it, so it refutes now
                # rather than at the next push-pull.
                sender = self._members.get(msg.source)
                notice = (sender,) if sender is not None and sender.state is DEAD else ()
                self._send(from_addr, Ack(msg.seq, self.name), notice)
        elif isinstance(msg, Ack):
            p = self._probe
            if p is not None and p.seq == msg.seq:
                self._probe = None
            relay = self._relays.pop(msg.seq, None)
            if relay is not None:
                self._send(relay.origin_addr, Ack(relay.origin_seq, msg.source))
        elif isinstance(msg, PingReq):
            seq = self._next_seq()
            self._relays[seq] = _Relay(msg.seq, msg.source_addr, now + self.config.probe_interval)
            self._send(msg.target_addr, Ping(seq, self.name, msg.target))

    def local_state(self) -> tuple[Member, ...]:
        """Full state for a push-pull exchange, tombstones included."""
        return tuple(self._members.values())

    def merge_remote_state(self, now: float, members: Iterable[Member]) -> None:
        """Merge a peer's full state.

        A DEAD record about a member we hold live is downgraded to SUSPECT (as memberlist
        does): it is second-hand and possibly stale (the peer may just have come back from a
        partition), so the member gets a suspicion timeout to refute instead of dying at once.
        """
        for m in members:
            cur = self._members.get(m.name)
            if m.state is DEAD and cur is not None and cur.state in LIVE_STATES:
                m = replace(m, state=MemberState.SUSPECT)
            self._merge(now, m)

    def push_pull_target(self) -> Member | None:
        peers = self.live_peers()
        return self._rng.sample(peers, 1)[0] if peers else None

    def reconnect_target(self, now: float, max_age: float) -> Member | None:
        """A random member declared DEAD less than `max_age` ago, to retry by push-pull.

        After a partition longer than the suspicion timeout each side holds the other DEAD
        and stops probing it; only such a retry lets the two sides merge again (both then
        refute, since each receives the other's view of itself).
        """
        names = sorted(n for n, t in self._dead_since.items() if now - t < max_age)
        return self._members[self._rng.sample(names, 1)[0]] if names else None

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Replace the local tags; a new incarnation makes every node accept the change."""
        if self._leaving:
            return
        local = self.local_member
        new = replace(local, tags=dict(tags), incarnation=local.incarnation + 1)
        self._check_fits(new)
        self._set_local(new)

    def leave(self) -> None:
        """Announce a graceful leave: others record LEFT (event LEAVE), never DEAD."""
        if self._leaving:
            return
        self._leaving = True
        self._probe = None
        local = self.local_member
        self._set_local(
            replace(local, state=MemberState.LEFT, incarnation=local.incarnation + 1)
        )

    def _check_fits(self, member: Member) -> None:
        # Our own record must fit in one datagram, or it could never be gossiped.
        if wire.member_size(member) > self.config.packet_budget:
            raise GossipConfigError(
                f"member record of {wire.member_size(member)} bytes exceeds the "
                f"{self.config.packet_budget}-byte packet budget; use fewer or shorter tags")

    # ----------------------------------------------------------------- probing

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _next_probe_target(self) -> Member | None:
        for _ in range(len(self._members) + 1):
            if self._probe_index >= len(self._probe_order):
                self._probe_order = [m.name for m in self.live_peers()]
                self._rng.shuffle(self._probe_order)
                self._probe_index = 0
                if not self._probe_order:
                    return None
            m = self._members.get(self._probe_order[self._probe_index])
            self._probe_index += 1
            if m is not None and m.state in LIVE_STATES:
                return m
        return None

    def _start_probe(self, now: float) -> None:
        target = self._next_probe_target()
        if target is None:
            return
        seq = self._next_seq()
        self._probe = _Probe(seq, target.name, now)
        self._send(target.addr, Ping(seq, self.name, target.name))

    def _advance_probe(self, now: float) -> None:
        p = self._probe
        assert p is not None
        target = self._members.get(p.target)
        if target is None or target.state not in LIVE_STATES:
            self._probe = None
            return
        if not p.indirect_sent and now >= p.started + self.config.probe_timeout:
            p.indirect_sent = True
            helpers = [m for m in self.live_peers() if m.name != p.target]
            k = min(self.config.indirect_checks, len(helpers))
            for h in self._rng.sample(helpers, k):
                self._send(h.addr, PingReq(p.seq, self.name, self.local_member.addr,
                                           target.name, target.addr))
        if now >= p.started + self.config.probe_interval:
            self._probe = None
            if target.state is MemberState.ALIVE:
                suspect = replace(target, state=MemberState.SUSPECT)
                self._members[target.name] = suspect
                self._suspect_deadline[target.name] = now + self._suspicion_timeout()
                self._enqueue(suspect)
                # Tell the suspect directly: it is the one node that can refute.
                self._send(target.addr, None)

    def _expire_relays(self, now: float) -> None:
        for seq in [s for s, r in self._relays.items() if now >= r.expires]:
            del self._relays[seq]

    def _expire_suspicions(self, now: float) -> None:
        for name in [n for n, d in self._suspect_deadline.items() if now >= d]:
            del self._suspect_deadline[name]
            cur = self._members[name]
            if cur.state is MemberState.SUSPECT:
                dead = replace(cur, state=MemberState.DEAD)
                self._members[name] = dead
                self._dead_since[name] = now
                self._enqueue(dead)
                self._events.append(MemberEvent(EventKind.FAILED, dead))

    def _suspicion_timeout(self) -> float:
        n = len(self.live_peers()) + 1
        c = self.config
        return c.suspicion_mult * max(1.0, math.log10(n)) * c.probe_interval

    # ----------------------------------------------------------------- dissemination

    def _retransmit_limit(self) -> int:
        n = len(self.live_peers()) + 1
        return max(1, self.config.retransmit_mult * math.ceil(math.log10(n + 1)))

    def _enqueue(self, member: Member) -> None:
        # A newer record about a member replaces the queued one: old news is never sent.
        self._broadcasts[member.name] = _Broadcast(member)

    def _piggyback(self) -> tuple[Member, ...]:
        if not self._broadcasts:
            return ()
        limit = self._retransmit_limit()
        budget = self.config.packet_budget
        out: list[Member] = []
        for b in sorted(self._broadcasts.values(), key=lambda b: b.transmits):
            size = wire.member_size(b.member)
            if size > self.config.packet_budget:
                # Cannot ever fit (a peer's oversized tags): leave it to push-pull.
                del self._broadcasts[b.member.name]
                continue
            if size > budget:
                continue
            budget -= size
            out.append(b.member)
            b.transmits += 1
            if b.transmits >= limit:
                del self._broadcasts[b.member.name]
        return tuple(out)

    def _send(self, addr: Addr, message: Message | None, extra: tuple[Member, ...] = ()) -> None:
        updates = extra + self._piggyback()
        if message is None and not updates:
            return
        self._outbox.append((addr, Packet(message, updates)))

    def _gossip(self) -> None:
        if not self._broadcasts:
            return
        peers = self.live_peers()
        for m in self._rng.sample(peers, min(self.config.gossip_nodes, len(peers))):
            self._send(m.addr, None)

    # ----------------------------------------------------------------- merging news

    def _set_local(self, member: Member) -> None:
        self._members[self.name] = member
        self._enqueue(member)

    def _merge(self, now: float, u: Member) -> None:
        if u.name == self.name:
            self._merge_about_self(u)
            return
        cur = self._members.get(u.name)
        if cur is None:
            self._members[u.name] = u
            if u.state in LIVE_STATES:
                self._events.append(MemberEvent(EventKind.JOIN, u))
                if u.state is MemberState.SUSPECT:
                    self._suspect_deadline[u.name] = now + self._suspicion_timeout()
                self._enqueue(u)
            return
        if u.incarnation < cur.incarnation:
            return
        if u.state is MemberState.ALIVE:
            if u.incarnation == cur.incarnation:
                return
            self._members[u.name] = u
            self._suspect_deadline.pop(u.name, None)
            self._dead_since.pop(u.name, None)
            if cur.state in GONE_STATES:
                self._events.append(MemberEvent(EventKind.JOIN, u))
            elif cur.addr != u.addr or dict(cur.tags) != dict(u.tags):
                self._events.append(MemberEvent(EventKind.UPDATE, u))
            self._enqueue(u)
        elif u.state is MemberState.SUSPECT:
            if cur.state in GONE_STATES:
                return
            if cur.state is MemberState.SUSPECT and u.incarnation == cur.incarnation:
                return
            new = replace(cur, state=MemberState.SUSPECT, incarnation=u.incarnation)
            self._members[u.name] = new
            self._suspect_deadline.setdefault(u.name, now + self._suspicion_timeout())
            self._enqueue(new)
        elif u.state is MemberState.DEAD:
            if cur.state in GONE_STATES:
                return
            new = replace(cur, state=MemberState.DEAD, incarnation=u.incarnation)
            self._members[u.name] = new
            self._suspect_deadline.pop(u.name, None)
            self._dead_since[u.name] = now
            self._events.append(MemberEvent(EventKind.FAILED, new))
            self._enqueue(new)
        else:  # LEFT: only the member itself says so, so it also overrides DEAD.
            if cur.state is MemberState.LEFT:
                return
            new = replace(cur, state=MemberState.LEFT, incarnation=u.incarnation)
            self._members[u.name] = new
            self._suspect_deadline.pop(u.name, None)
            self._dead_since.pop(u.name, None)
            if cur.state in LIVE_STATES:
                self._events.append(MemberEvent(EventKind.LEAVE, new))
            self._enqueue(new)

    def _merge_about_self(self, u: Member) -> None:
        if self._leaving:
            return
        local = self.local_member
        refute = (
            u.incarnation > local.incarnation
            if u.state is MemberState.ALIVE
            else u.incarnation >= local.incarnation
        )
        if refute:
            # Someone holds news about us at least as new as ours (a suspicion, a death, or
            # a record from a previous run of this node): outbid it.
            self._set_local(replace(local, incarnation=u.incarnation + 1))
