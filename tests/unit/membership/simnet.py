"""A seeded, simulated datagram network for the SWIM core.

One seed drives loss, delay (hence reordering), duplication and every node's random source,
so any failing run replays exactly. Packets go through the real codec so the simulation also
exercises `wire`. Time only advances to the next delivery or core deadline.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from dataclasses import dataclass, field

from dcl.membership import wire
from dcl.membership.model import Addr, EventKind, Member, MemberEvent, MemberState, Packet
from dcl.membership.swim import Swim, SwimConfig


@dataclass(order=True)
class _InFlight:
    at: float
    order: int
    dst: Addr = field(compare=False)
    src: Addr = field(compare=False)
    data: bytes = field(compare=False)


class SimNet:
    def __init__(
        self,
        seed: int,
        *,
        loss: float = 0.0,
        delay: tuple[float, float] = (0.001, 0.005),
        duplicate: float = 0.0,
        config: SwimConfig | None = None,
        push_pull_every: float | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.loss = loss
        self.delay = delay
        self.duplicate = duplicate
        self.config = config or SwimConfig()
        self.now = 0.0
        self.nodes: dict[str, Swim] = {}
        self.crashed: set[str] = set()
        self.isolated: set[str] = set()
        self.events: dict[str, list[MemberEvent]] = {}
        self._by_addr: dict[Addr, str] = {}
        self._queue: list[_InFlight] = []
        self._order = 0
        # Periodic anti-entropy as the driver runs it: one live peer plus one recently dead.
        self.push_pull_every = push_pull_every
        self._next_push_pull = push_pull_every if push_pull_every is not None else float("inf")

    # ------------------------------------------------------------ topology

    def add(self, name: str, tags: dict[str, str] | None = None) -> Swim:
        addr = (f"10.0.0.{len(self.nodes) + 1}", 7946)
        node = Swim(name, addr, tags or {"rpc_addr": f"{addr[0]}:8400"}, self.config,
                    random.Random(self.rng.random()), self.now)
        self.nodes[name] = node
        self.events[name] = []
        self._by_addr[addr] = name
        return node

    def push_pull(self, a: str, b: str) -> None:
        """A TCP exchange `a` -> `b`, reliable; like the driver, `b` merges before replying."""
        na, nb = self.nodes[a], self.nodes[b]
        nb.merge_remote_state(self.now, na.local_state())
        na.merge_remote_state(self.now, nb.local_state())
        self._collect(a)
        self._collect(b)

    def cluster(self, n: int) -> list[str]:
        names = [f"n{i}" for i in range(n)]
        for name in names:
            self.add(name)
        for name in names[1:]:
            self.push_pull(name, names[0])
        return names

    def crash(self, name: str) -> None:
        self.crashed.add(name)

    def inject(self, dst: str, packet: Packet, src: Addr = ("10.9.9.9", 7946)) -> None:
        node = self.nodes[dst]
        node.receive(self.now, wire.decode_packet(wire.encode_packet(packet)), src)
        self._collect(dst)

    # ------------------------------------------------------------ running

    def _collect(self, name: str) -> None:
        node = self.nodes[name]
        self.events[name].extend(node.take_events())
        for dst, packet in node.take_outbox():
            data = wire.encode_packet(packet)
            copies = 2 if self.rng.random() < self.duplicate else 1
            for _ in range(copies):
                if self.rng.random() < self.loss:
                    continue
                self._order += 1
                at = self.now + self.rng.uniform(*self.delay)
                heapq.heappush(self._queue,
                               _InFlight(at, self._order, dst, node.local_member.addr, data))

    def _running(self) -> list[str]:
        return [n for n in self.nodes if n not in self.crashed]

    def run_for(self, duration: float) -> None:
        self.run_until(lambda: False, duration)

    def run_until(self, done: object, limit: float) -> bool:
        """Advance until `done()` holds (checked after every step) or `limit` sim-seconds."""
        assert callable(done)
        end = self.now + limit
        for _ in range(2_000_000):  # bound the loop even if time stops advancing
            if done():
                return True
            running = self._running()
            nxt = min([end, self._next_push_pull,
                       *(self.nodes[n].next_deadline() for n in running)]
                      + ([self._queue[0].at] if self._queue else []))
            if nxt >= end and not done():
                self.now = end
                return bool(done())
            self.now = max(self.now, nxt)
            while self._queue and self._queue[0].at <= self.now:
                p = heapq.heappop(self._queue)
                dst = self._by_addr.get(p.dst)
                src = self._by_addr.get(p.src)
                if dst is None or dst in self.crashed:
                    continue
                if dst in self.isolated or src in self.isolated:
                    continue
                self.nodes[dst].receive(self.now, wire.decode_packet(p.data), p.src)
                self._collect(dst)
            if self.now >= self._next_push_pull:
                assert self.push_pull_every is not None
                self._next_push_pull = self.now + self.push_pull_every
                self._anti_entropy(running)
            for n in running:
                if self.nodes[n].next_deadline() <= self.now:
                    self.nodes[n].tick(self.now)
                    self._collect(n)
        raise AssertionError("simulation loop bound reached")

    def _anti_entropy(self, running: list[str]) -> None:
        for n in running:
            node = self.nodes[n]
            for target in (node.push_pull_target(), node.reconnect_target(self.now, 3600.0)):
                peer = None if target is None else self._by_addr.get(target.addr)
                if peer is None or peer in self.crashed:
                    continue
                if n in self.isolated or peer in self.isolated:
                    continue
                self.push_pull(n, peer)

    # ------------------------------------------------------------ views

    def state_of(self, observer: str, name: str) -> MemberState | None:
        m = self.nodes[observer].member(name)
        return None if m is None else m.state

    def view(self, observer: str, name: str) -> Member | None:
        return self.nodes[observer].member(name)

    def all_see(self, name: str, state: MemberState, observers: list[str] | None = None) -> bool:
        obs = observers or [n for n in self._running() if n != name]
        return all(self.state_of(o, name) is state for o in obs)

    def event_counts(self, observer: str) -> Counter[tuple[str, EventKind]]:
        return Counter((e.member.name, e.kind) for e in self.events[observer])
