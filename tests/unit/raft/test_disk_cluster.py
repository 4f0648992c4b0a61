"""Three real RaftDrivers (real files) in one process, each with a disk whose free space the
test sets, over a loopback transport that round-trips every message through the wire format
and can cut a node off. What a cluster does when disks fill: leadership moves to a node
with room, no leadership goes to a node without, a follower waiting for room for a snapshot
counts as out of room, and nothing is sent to a node that would drop it.
(tests/integration/test_disk_reserve.py runs the same on real processes and disks.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from dcl.errors import InsufficientStorage
from dcl.raft.driver import RaftDriver
from dcl.raft.storage import RaftStorage
from dcl.raft.types import (
    AppendEntries,
    ConfChange,
    ConfChangeType,
    Config,
    InstallSnapshot,
    Message,
    Role,
    SnapshotMeta,
)
from dcl.raft.wire import decode_message, encode_message
from dcl.server.replicated import LogFsm, ReplicatedBackend
from tests.unit.raft.test_driver import _follower, _joined
from tests.unit.raft.test_driver_disk import RESERVE, Disk

pytestmark = pytest.mark.timeout(60)


class Net:
    """Delivers each message in a later loop turn, as decoded from its encoding; counts the
    record bytes sent to each node; drops everything to and from a node in `cut`."""

    def __init__(self) -> None:
        self.drivers: dict[str, RaftDriver] = {}
        self.cut: set[str] = set()
        self.record_bytes_to: Counter[str] = Counter()

    def transport(self, me: str) -> Link:
        return Link(self, me)


class Link:
    def __init__(self, net: Net, me: str) -> None:
        self.net = net
        self.me = me

    def send(self, messages: Sequence[Message]) -> None:
        loop = asyncio.get_running_loop()
        for m in messages:
            driver = self.net.drivers.get(m.dst)
            if driver is None or {m.dst, self.me} & self.net.cut:
                continue
            if isinstance(m, InstallSnapshot):
                self.net.record_bytes_to[m.dst] += len(m.data)
            elif isinstance(m, AppendEntries):
                self.net.record_bytes_to[m.dst] += sum(len(e.data) for e in m.entries)
            loop.call_soon(driver.receive, decode_message(encode_message(m)))


class Node:
    def __init__(self, net: Net, tmp: Path, name: str, bootstrap: bool, **options: Any) -> None:
        self.name = name
        self.disk = Disk()
        self.fsm = LogFsm(tmp / name / "fsm")
        self.storage = RaftStorage(tmp / name / "raft")
        self.driver = RaftDriver(name, self.storage, self.fsm, net.transport(name),
                                 config=Config(election_tick=10), bootstrap=bootstrap,
                                 tick_seconds=0.05, disk=self.disk.space, **options)
        net.drivers[name] = self.driver
        self.backend = ReplicatedBackend(self.driver, self.fsm, f"{name}:1")
        self.role_changes = 0

        def changed(role: Role) -> None:
            self.role_changes += 1

        self.driver.on_role_change = changed

    async def close(self) -> None:
        await self.driver.stop()
        self.storage.close()
        self.fsm.close()


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        assert loop.time() < end, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def cluster(tmp: Path, **options: Any) -> AsyncIterator[tuple[Net, dict[str, Node]]]:
    """a, b and c, all voters, a leading, every node having applied the configuration."""
    net = Net()
    nodes = {name: Node(net, tmp, name, name == "a", **options) for name in "abc"}
    for node in nodes.values():
        node.driver.start()
    try:
        a = nodes["a"].driver
        await until(lambda: a.core.role is Role.LEADER, "a leads")
        await until(lambda: a.core.applied_index >= a.core.last_index, "a's no-op applied")
        for name in "bc":
            await a.propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, name))
        await until(lambda: all(n.driver.core.applied_index >= a.core.commit_index
                                for n in nodes.values()), "every node applied")
        yield net, nodes
    finally:
        for node in nodes.values():
            await node.close()


def leader_of(nodes: dict[str, Node]) -> Node | None:
    leaders = [n for n in nodes.values() if n.driver.core.role is Role.LEADER]
    return leaders[0] if len(leaders) == 1 else None


async def snapshot_behind(net: Net, nodes: dict[str, Node]) -> int:
    """Leave c out while a writes 4 MB and compacts behind a snapshot, so that c can only
    catch up from the snapshot; its size."""
    a = nodes["a"]
    net.cut.add("c")
    a.driver.core._retained = None  # no Raft log kept below the snapshot to catch up from
    for i in range(40):
        await a.backend.append([bytes([i]) * 100_000])
    await until(lambda: not a.driver.snapshot_in_progress and a.driver.core.first_index > 5,
                "a compacted behind a snapshot")
    snapshot = a.driver.core.snapshot
    assert snapshot is not None
    return len(snapshot.data)


SNAPSHOTS = {"snapshot_threshold_entries": 4, "snapshot_max_log_bytes": 1 << 20}


async def test_a_leader_out_of_room_hands_over_to_a_node_with_room(tmp_path: Path) -> None:
    async with cluster(tmp_path) as (_, nodes):
        a = nodes["a"]
        assert await a.backend.append([b"x"]) == 0
        a.disk.free = RESERVE - 1
        await until(lambda: leader_of(nodes) not in (None, a), "another node leads")
        new = leader_of(nodes)
        assert new is not None
        assert await new.backend.append([b"y"]) == 1
        assert a.driver.core.role is not Role.LEADER


async def test_leadership_stays_put_when_every_disk_is_out_of_room(tmp_path: Path) -> None:
    """A leader out of room must not hand over to a node out of room too, even before that
    node's heartbeat answers said so (it drops TimeoutNow): all it would get is an election
    and a leader refusing just the same. Writes are refused, naming the leader's disk."""
    async with cluster(tmp_path) as (_, nodes):
        before = {name: n.role_changes for name, n in nodes.items()}
        for node in nodes.values():
            node.disk.free = RESERVE - 1
        await asyncio.sleep(2)
        assert {name: n.role_changes for name, n in nodes.items()} == before
        assert leader_of(nodes) is nodes["a"]
        with pytest.raises(InsufficientStorage) as refused:
            await nodes["a"].backend.append([b"x"])
        assert refused.value.node == "a"


async def test_a_follower_without_room_for_a_snapshot_counts_as_out_of_room(
    tmp_path: Path,
) -> None:
    """c is above its reserve but lacks room for the snapshot it must install first: it
    says it is out of room, so the leader stops resending the snapshot's first chunk at
    every heartbeat (20 a second) and, once b is out of room too, refuses writes no quorum
    can take rather than let them time out. Freed space lets c install it at once."""
    async with cluster(tmp_path, **SNAPSHOTS) as (net, nodes):
        a, b, c = nodes["a"], nodes["b"], nodes["c"]
        size = await snapshot_behind(net, nodes)
        c.disk.free = RESERVE + size  # room for one copy, not three
        net.record_bytes_to.clear()
        net.cut.clear()
        await asyncio.sleep(2)
        assert net.record_bytes_to["c"] <= 2 * size, net.record_bytes_to  # was 40 chunks
        assert c.driver.core.last_index < a.driver.core.first_index
        b.disk.free = RESERVE - 1
        await until(lambda: a.driver.write_refusal() is not None, "a refuses writes")
        with pytest.raises(InsufficientStorage) as refused:
            await a.backend.append([b"q"])
        assert refused.value.node == "b, c"
        c.disk.free = b.disk.free = 1 << 40
        await until(lambda: c.fsm.log.next_offset == a.fsm.log.next_offset == 40,
                    "c restored the snapshot")


async def test_a_leader_hands_over_only_to_a_node_holding_every_committed_entry(
    tmp_path: Path,
) -> None:
    """a is out of room, b too, and c waits for room for a snapshot. Handing over to c (or
    trying to every 0.5 s) would keep a from taking proposals almost all the time: a
    transfer stops them, configuration changes included, until an election timeout passes.
    So a keeps leading, never in a transfer, and can still change members (add a node with
    room, say)."""
    async with cluster(tmp_path, **SNAPSHOTS) as (net, nodes):
        a, b, c = nodes["a"], nodes["b"], nodes["c"]
        size = await snapshot_behind(net, nodes)
        c.disk.free = RESERVE + size
        b.disk.free = RESERVE - 1
        await asyncio.sleep(0.3)
        a.disk.free = RESERVE - 1
        net.cut.clear()
        loop = asyncio.get_running_loop()
        end = loop.time() + 2
        while loop.time() < end:
            assert a.driver.core.transferee is None
            await asyncio.sleep(0.01)
        assert leader_of(nodes) is a
        await a.driver.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "d"))


async def test_a_leader_sends_a_follower_out_of_room_no_records(tmp_path: Path) -> None:
    async with cluster(tmp_path) as (net, nodes):
        a, c = nodes["a"], nodes["c"]
        c.disk.free = RESERVE - 1
        for _ in range(300):
            await a.backend.append([b"r" * 1000])
        net.record_bytes_to.clear()
        await asyncio.sleep(1)
        assert net.record_bytes_to["c"] == 0
        assert c.driver.core.last_index < a.driver.core.last_index
        c.disk.free = 1 << 40
        await until(lambda: c.driver.core.last_index == a.driver.core.last_index,
                    "c caught up", timeout=2)


async def test_a_chunk_from_a_deposed_leader_leaves_the_current_transfer_alone(
    tmp_path: Path,
) -> None:
    disk = Disk(free=RESERVE + 250_000)
    fsm, storage, driver = _follower(tmp_path, disk=disk.space)
    driver.start()
    try:
        await _joined(driver)  # term 1, leader L
        current = InstallSnapshot(2, "M", "f", SnapshotMeta(9, 2, frozenset({"M", "f"})), 0,
                                  b"a" * 1000, False, 50_000)
        driver.receive(current)
        assert driver.core.term == 2 and len(driver.core._incoming) == 1000
        stale = InstallSnapshot(1, "L", "f", SnapshotMeta(9, 1, frozenset({"L", "f"})), 0,
                                b"z" * 10, False, 10_000_000)  # no room for it: dropped
        driver.receive(stale)
        assert len(driver.core._incoming) == 1000
    finally:
        await driver.stop()
        storage.close()
        fsm.close()
