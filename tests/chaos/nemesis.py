"""The nemesis: injects one fault at a time on a schedule that one seed determines.

The order of fault kinds is a seeded shuffle of every kind, repeated (so a short run covers all
kinds); durations, victims and link modes come from the same seeded generator. Each fault is
written to the history as a start and a stop record sharing an id. Between faults the nemesis
waits a quiet period and for the cluster to have a leader again, so faults do not pile up
beyond what one fault at a time means. (Timing still varies with the machine, so a seed fixes
the schedule, not the interleaving with client operations.)
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from grpclib.exceptions import GRPCError, StreamTerminatedError

from dcl.api.log.v1 import log_grpc, log_pb2
from tests.chaos.disk import DISK_FAULTS, lying_disk
from tests.chaos.history import History
from tests.chaos.proxy import LinkProxy, LinkState
from tests.integration.cluster_harness import Cluster, NodeProcess

__all__ = ["DEMO_KINDS", "FAULT_KINDS", "Nemesis"]

log = logging.getLogger("tests.chaos.nemesis")

FAULT_KINDS = (
    "kill_follower", "kill_leader", "pause_follower", "pause_leader",
    "partition_majority", "isolate_leader", "one_way", "flaky",
    "disk_store_tail", "disk_store_cut_synced", "disk_index_oversize", "disk_zero_block",
)

#: Faults a correct system cannot survive, to show the checker fails: only on request.
DEMO_KINDS = ("lying_disk",)

#: Default election timeout is tick 0.05 s x election_tick 10 = 0.5 s; pauses exceed it.
PAUSE_RANGE = (1.0, 2.5)
DOWN_RANGE = (0.5, 3.0)
PARTITION_RANGE = (1.5, 4.0)
QUIET_RANGE = (1.0, 3.0)
LEADER_WAIT = 20.0


class Nemesis:
    def __init__(self, cluster: Cluster, proxies: dict[tuple[str, str], LinkProxy],
                 history: History, seed: int, kinds: Sequence[str] = FAULT_KINDS) -> None:
        self.cluster = cluster
        self.proxies = proxies
        self.history = history
        self.rng = random.Random(f"nemesis-{seed}")
        self.kinds = list(kinds)
        self.paused: set[str] = set()
        #: Nodes the nemesis took down on purpose (killed, not yet restarted).
        self.down: set[str] = set()
        #: Nodes found exited without the nemesis killing them: (name, exit code, log tail).
        self.crashes: list[tuple[str, int | None, str]] = []
        self.injected: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self._next_id = 0

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> Iterable[str]:
        while True:
            order = list(self.kinds)
            self.rng.shuffle(order)
            yield from order

    async def run(self, duration: float, *, cover: bool = False) -> None:
        """Inject faults for `duration` seconds; with cover, go on (up to 3x as long) until
        every kind was injected at least once."""
        start = time.monotonic()
        deadline, hard_deadline = start + duration, start + 3 * duration
        await self.wait_for_leader()
        for kind in self.schedule():
            self.check_crashes()
            now = time.monotonic()
            missing = [k for k in self.kinds if not self.injected[k]]
            if now >= hard_deadline or (now >= deadline and not (cover and missing)):
                return
            if now >= deadline and kind not in missing:
                continue
            await getattr(self, kind)()
            await asyncio.sleep(self.rng.uniform(*QUIET_RANGE))
            await self.wait_for_leader()

    def check_crashes(self) -> None:
        """A node that exited although the nemesis did not kill it crashed (or refused to
        start): record it, with its log's tail, and start it again so the run goes on."""
        for node in self.cluster.nodes:
            if node.running or node.name in self.down or node.proc is None:
                continue
            code = node.proc.returncode
            tail = node.log_tail(25)
            self.crashes.append((node.name, code, tail))
            self.history.add({"type": "crash", "node": node.name, "time": self.history.now(),
                              "returncode": code, "log_tail": tail})
            log.error("%s exited unexpectedly (code %s):\n%s", node.name, code, tail)
            self.cluster.start(node)

    async def heal_all(self) -> None:
        """Every link passes, every paused node continues, every stopped node restarts."""
        self.check_crashes()
        for proxy in self.proxies.values():
            proxy.heal()
        for node in self.cluster.nodes:
            self._resume(node)
        for node in self.cluster.nodes:
            if not node.running:
                self.cluster.start(node)

    # ------------------------------------------------------------------ helpers

    def _start(self, kind: str, nodes: Sequence[NodeProcess], at: float | None = None,
               **detail: Any) -> int:
        self._next_id += 1
        self.injected[kind] += 1
        self.history.nemesis(kind, "start", at=at, id=self._next_id,
                             nodes=[n.name for n in nodes], **detail)
        log.info("fault %s start nodes=%s %s", kind, [n.name for n in nodes], detail)
        return self._next_id

    def _stop(self, kind: str, fault_id: int) -> None:
        self.history.nemesis(kind, "stop", id=fault_id)
        log.info("fault %s stop", kind)

    def _live(self) -> list[NodeProcess]:
        return [n for n in self.cluster.nodes if n.running and n.name not in self.paused]

    async def _leader_seen_by(self, node: NodeProcess) -> str | None:
        try:
            with node.channel() as channel:
                reply = await log_grpc.LogStub(channel).GetServers(
                    log_pb2.GetServersRequest(), timeout=1.0)
        except (GRPCError, OSError, StreamTerminatedError, TimeoutError):
            return None
        assert reply is not None
        leaders = [s.id for s in reply.servers if s.is_leader]
        return leaders[0] if leaders else None

    async def find_leader(self) -> NodeProcess | None:
        """The node a majority of the cluster names as leader now, if any."""
        live = self._live()
        named = await asyncio.gather(*(self._leader_seen_by(n) for n in live))
        votes = Counter(n for n in named if n is not None)
        quorum = len(self.cluster.nodes) // 2 + 1
        for name, count in votes.most_common(1):
            if count >= quorum:
                return next((n for n in live if n.name == name), None)
        return None

    async def wait_for_leader(self, timeout: float = LEADER_WAIT) -> NodeProcess | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_crashes()
            leader = await self.find_leader()
            if leader is not None:
                return leader
            await asyncio.sleep(0.1)
        log.warning("no leader within %.0fs", timeout)
        return None

    async def _leader_and_followers(self) -> tuple[NodeProcess, list[NodeProcess]] | None:
        leader = await self.wait_for_leader()
        if leader is None:
            return None
        return leader, [n for n in self._live() if n is not leader]

    def _pause(self, node: NodeProcess) -> None:
        assert node.proc is not None
        node.proc.send_signal(signal.SIGSTOP)
        self.paused.add(node.name)

    def _resume(self, node: NodeProcess) -> None:
        if node.name in self.paused:
            self.paused.discard(node.name)
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGCONT)

    def _block(self, links: Iterable[tuple[str, str]], state: LinkState) -> list[str]:
        names = []
        for link in links:
            self.proxies[link].set(state)
            names.append(f"{link[0]}->{link[1]}")
        return names

    def _heal_links(self) -> None:
        for proxy in self.proxies.values():
            proxy.heal()

    def _blocked_state(self) -> LinkState:
        """A partition either holds bytes (blackhole) or resets connections."""
        return LinkState(hold=True) if self.rng.random() < 0.6 else LinkState(reject=True)

    def _cut(self, side_a: Sequence[str], side_b: Sequence[str]) -> list[tuple[str, str]]:
        return [(a, b) for a in side_a for b in side_b] + [(b, a) for a in side_a for b in side_b]

    async def _kill_restart(self, kind: str, node: NodeProcess, **detail: Any) -> None:
        down = self.rng.uniform(*DOWN_RANGE)
        killed_at = self.history.now()
        self.down.add(node.name)
        node.kill()
        fault = self._start(kind, [node], at=killed_at, down=round(down, 3), **detail)
        await asyncio.sleep(down)
        self.cluster.start(node)
        self.down.discard(node.name)
        self._stop(kind, fault)

    # ------------------------------------------------------------------ faults

    async def _target(self, kind: str, *, leader: bool) -> NodeProcess | None:
        """The leader, or a random follower; None (counted as skipped) when there is none."""
        found = await self._leader_and_followers()
        if found is None or not (leader or found[1]):
            self.skipped[kind] += 1
            return None
        return found[0] if leader else self.rng.choice(found[1])

    async def kill_follower(self) -> None:
        if node := await self._target("kill_follower", leader=False):
            await self._kill_restart("kill_follower", node)

    async def kill_leader(self) -> None:
        if node := await self._target("kill_leader", leader=True):
            await self._kill_restart("kill_leader", node)

    async def _pause_for(self, kind: str, node: NodeProcess) -> None:
        pause = self.rng.uniform(*PAUSE_RANGE)
        fault = self._start(kind, [node], pause=round(pause, 3))
        self._pause(node)
        await asyncio.sleep(pause)
        self._resume(node)
        self._stop(kind, fault)

    async def pause_follower(self) -> None:
        if node := await self._target("pause_follower", leader=False):
            await self._pause_for("pause_follower", node)

    async def pause_leader(self) -> None:
        if node := await self._target("pause_leader", leader=True):
            await self._pause_for("pause_leader", node)

    async def _partition(self, kind: str, nodes: Sequence[NodeProcess],
                         links: list[tuple[str, str]], state: LinkState,
                         **detail: Any) -> None:
        duration = self.rng.uniform(*PARTITION_RANGE)
        named = self._block(links, state)
        fault = self._start(kind, nodes, duration=round(duration, 3), links=named,
                            mode=_describe(state), **detail)
        await asyncio.sleep(duration)
        self._heal_links()
        self._stop(kind, fault)

    async def partition_majority(self) -> None:
        names = [n.name for n in self.cluster.nodes]
        self.rng.shuffle(names)
        minority = names[: (len(names) - 1) // 2]
        majority = names[len(minority):]
        nodes = [n for n in self.cluster.nodes if n.name in minority]
        await self._partition("partition_majority", nodes, self._cut(minority, majority),
                              self._blocked_state(), minority=minority, majority=majority)

    async def isolate_leader(self) -> None:
        leader = await self.wait_for_leader()
        if leader is None:
            self.skipped["isolate_leader"] += 1
            return
        others = [n.name for n in self.cluster.nodes if n is not leader]
        await self._partition("isolate_leader", [leader], self._cut([leader.name], others),
                              self._blocked_state())

    async def one_way(self) -> None:
        """One node can only send, or only receive: half of each of its links is cut."""
        leader = await self.wait_for_leader()
        node = leader if leader is not None and self.rng.random() < 0.5 else \
            self.rng.choice(self.cluster.nodes)
        others = [n.name for n in self.cluster.nodes if n is not node]
        outbound = self.rng.random() < 0.5
        links = [(node.name, o) for o in others] if outbound else \
            [(o, node.name) for o in others]
        await self._partition("one_way", [node], links, self._blocked_state(),
                              direction="outbound" if outbound else "inbound",
                              was_leader=node is leader)

    async def flaky(self) -> None:
        state = LinkState(delay=self.rng.uniform(0.005, 0.05),
                          jitter=self.rng.uniform(0.0, 0.05),
                          drop_probability=self.rng.uniform(0.01, 0.1))
        await self._partition("flaky", list(self.cluster.nodes), list(self.proxies), state)

    async def _disk(self, kind: str) -> None:
        found = await self._leader_and_followers()
        candidates = self._live() if found is None else [found[0], *found[1]]
        if not candidates:
            self.skipped[kind] += 1
            return
        node = self.rng.choice(candidates)
        fault_rng = random.Random(self.rng.random())
        down = self.rng.uniform(*DOWN_RANGE)
        started = time.monotonic()
        killed_at = self.history.now()
        self.down.add(node.name)
        node.kill()
        detail = DISK_FAULTS[kind](node.data_dir, fault_rng)
        recorded = kind
        if detail is None:  # nothing of that kind to damage yet: a plain kill and restart
            self.skipped[kind] += 1
            recorded = "kill_leader" if found and node is found[0] else "kill_follower"
            detail = {"instead_of": kind}
        fault = self._start(recorded, [node], at=killed_at, down=round(down, 3),
                            was_leader=bool(found and node is found[0]), **detail)
        await asyncio.sleep(max(0.0, down - (time.monotonic() - started)))
        self.cluster.start(node)
        self.down.discard(node.name)
        self._stop(recorded, fault)

    async def disk_store_tail(self) -> None:
        await self._disk("disk_store_tail")

    async def disk_store_cut_synced(self) -> None:
        await self._disk("disk_store_cut_synced")

    async def disk_index_oversize(self) -> None:
        await self._disk("disk_index_oversize")

    async def disk_zero_block(self) -> None:
        await self._disk("disk_zero_block")


    async def lying_disk(self) -> None:
        """Every node loses fsynced Raft-log bytes at once (see disk.lying_disk)."""
        nodes = list(self.cluster.nodes)
        killed_at = self.history.now()
        for node in nodes:
            self.down.add(node.name)
            node.kill()
        details = {n.name: lying_disk(n.data_dir, random.Random(self.rng.random()))
                   for n in nodes}
        fault = self._start("lying_disk", nodes, at=killed_at, cuts=details)
        await asyncio.sleep(1.0)
        for node in nodes:
            self.cluster.start(node)
            self.down.discard(node.name)
        self._stop("lying_disk", fault)


def _describe(state: LinkState) -> str:
    if state.hold:
        return "hold"
    if state.reject:
        return "reject"
    return f"delay={state.delay:.3f}+{state.jitter:.3f} drop={state.drop_probability:.3f}"
