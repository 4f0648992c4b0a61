"""A hostile, deterministic network: delay, reordering, loss, duplication and partitions.

Every decision is drawn from the world's single seeded rng, so a seed replays the same
deliveries in the same order. Raft must tolerate any of these behaviours, so the network is
free to do all of them; what it must never do is invent or corrupt a message.

Partitions are a set of *directed* blocked links, which models both symmetric splits and
one-way failures (A hears B but B does not hear A) -- the latter are what trip up pre-vote and
check-quorum. A link is checked both when a message is sent and when it would be delivered, so
cutting a link also loses what is already in flight on it.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

NodeId = Hashable


@dataclass(slots=True)
class InFlight:
    """A message on the wire; delivered by time, ties broken by send order (`seq`)."""

    deliver_at: int
    seq: int
    src: Any
    dst: Any
    message: Any
    duplicate: bool = False


@dataclass(slots=True)
class LinkPolicy:
    """How unreliable the network currently is; the world changes it during fault phases."""

    min_delay: int = 1
    max_delay: int = 12
    drop_rate: float = 0.0
    dup_rate: float = 0.0
    # With this probability a message takes a long detour (reorders it past many others).
    spike_rate: float = 0.0
    spike_delay: int = 120


class Network:
    """In-flight messages plus the partition matrix."""

    def __init__(self, rng: random.Random, faults: Counter[str]) -> None:
        self._rng = rng
        # (deliver_at, send sequence, message): tuples compare faster than dataclasses.
        self._heap: list[tuple[int, int, InFlight]] = []
        self._seq = 0
        self.blocked: set[tuple[Any, Any]] = set()
        self.policy = LinkPolicy()
        self._faults = faults

    def __len__(self) -> int:
        return len(self._heap)

    def send(self, src: Any, dst: Any, message: Any, now: int) -> None:
        """Put a message on the wire, or lose it, according to links and policy."""
        if (src, dst) in self.blocked:
            self._faults["drop_partition"] += 1
            return
        policy = self.policy
        if policy.drop_rate and self._rng.random() < policy.drop_rate:
            self._faults["drop"] += 1
            return
        self._push(src, dst, message, now + self._delay(), duplicate=False)
        if policy.dup_rate and self._rng.random() < policy.dup_rate:
            self._faults["duplicate"] += 1
            self._push(src, dst, message, now + self._delay(), duplicate=True)

    def _delay(self) -> int:
        policy = self.policy
        if policy.spike_rate and self._rng.random() < policy.spike_rate:
            self._faults["delay_spike"] += 1
            return self._rng.randint(policy.max_delay, policy.spike_delay)
        return self._rng.randint(policy.min_delay, policy.max_delay)

    def _push(self, src: Any, dst: Any, message: Any, at: int, duplicate: bool) -> None:
        self._seq += 1
        item = InFlight(at, self._seq, src, dst, message, duplicate)
        heapq.heappush(self._heap, (at, self._seq, item))

    def redeliver(self, item: InFlight, at: int) -> None:
        """Put back a message that was held (its receiver was paused), keeping its identity."""
        self._push(item.src, item.dst, item.message, at, item.duplicate)

    def next_time(self) -> int | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: int) -> InFlight | None:
        """Next message due at or before `now` whose link is still open (others are lost)."""
        while self._heap and self._heap[0][0] <= now:
            item = heapq.heappop(self._heap)[2]
            if (item.src, item.dst) in self.blocked:
                self._faults["drop_partition"] += 1
                continue
            return item
        return None

    # -- partitions -----------------------------------------------------------------------------

    def isolate(self, node: Any, others: Iterable[Any]) -> None:
        for other in others:
            if other != node:
                self.blocked.add((node, other))
                self.blocked.add((other, node))

    def split(self, side_a: Iterable[Any], side_b: Iterable[Any]) -> None:
        """Symmetric partition between two groups."""
        b = list(side_b)
        for x in side_a:
            for y in b:
                if x != y:
                    self.blocked.add((x, y))
                    self.blocked.add((y, x))

    def block_one_way(self, src: Any, dst: Any) -> None:
        self.blocked.add((src, dst))

    def heal(self) -> None:
        self.blocked.clear()

    def clear(self) -> None:
        self._heap.clear()
