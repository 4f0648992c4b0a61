"""Gossip over real UDP/TCP sockets on 127.0.0.1 with AES-GCM, five nodes per cluster."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from dcl.membership import (
    EventKind,
    GossipConfig,
    GossipConfigError,
    GossipKeyRequired,
    JoinFailed,
    MemberEvent,
    Membership,
    MemberState,
    wire,
)
from dcl.membership.crypto import AAD_UDP, PacketSealer
from dcl.membership.driver import GOSSIP_TCP_CONNECTIONS
from dcl.membership.model import Member, Packet, Ping

pytestmark = pytest.mark.timeout(60)

KEY = os.urandom(32)


@dataclass
class Node:
    gossip: Membership
    events: list[MemberEvent] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.gossip.config.node_name

    def count(self, name: str, kind: EventKind) -> int:
        return sum(1 for e in self.events if e.member.name == name and e.kind is kind)

    def state_of(self, name: str) -> MemberState | None:
        for m in self.gossip.members():
            if m.name == name:
                return m.state
        return None


class Cluster:
    def __init__(self) -> None:
        self.nodes: list[Node] = []

    async def start(self, name: str, *, key: bytes | None = KEY, insecure: bool = False,
                    tags: dict[str, str] | None = None, port: int = 0,
                    tcp_timeout: float = 2.0) -> Node:
        events: list[MemberEvent] = []

        async def on_event(e: MemberEvent) -> None:  # an async handler, as the agent will use
            events.append(e)

        # Anti-entropy every ~2 s (production: 15 s): on a loaded CI machine UDP gossip can
        # drop an update for good, and only a push-pull heals that; the 10 s convergence
        # polls below must cover at least one round.
        cfg = GossipConfig(node_name=name, bind_addr=("127.0.0.1", port), key=key,
                           insecure=insecure, tags=tags or {"rpc_addr": f"127.0.0.1:{name}"},
                           push_pull_interval=2.0, tcp_timeout=tcp_timeout)
        g = Membership(cfg, on_event)
        await g.start()
        node = Node(g, events)
        self.nodes.append(node)
        return node

    async def start_joined(self, n: int) -> list[Node]:
        nodes = [await self.start(f"n{i}") for i in range(n)]
        seed = f"127.0.0.1:{nodes[0].gossip.addr[1]}"
        for node in nodes[1:]:
            assert await node.gossip.join([seed]) == 1
        await poll(lambda: all(len(x.gossip.alive_members()) == n for x in nodes), 10.0)
        return nodes

    async def stop_all(self) -> None:
        for node in self.nodes:
            await node.gossip.stop()


async def poll(cond: Callable[[], bool], timeout: float) -> float:
    """Wait until `cond()` holds; returns the seconds it took. Fails the test at the deadline."""
    start = time.monotonic()
    deadline = start + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def has_events(node: Node, n: int) -> Callable[[], bool]:
    return lambda: len(node.events) >= n


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        await c.stop_all()


async def test_five_members_converge_with_tags_and_join_events(cluster: Cluster) -> None:
    nodes = await cluster.start_joined(5)
    for node in nodes:
        seen = {m.name: m for m in node.gossip.alive_members()}
        assert dict(seen["n3"].tags)["rpc_addr"] == "127.0.0.1:n3"
        await poll(has_events(node, 4), 5.0)  # events arrive through the dispatcher task
        assert sorted(e.member.name for e in node.events if e.kind is EventKind.JOIN) == sorted(
            n.name for n in nodes if n is not node)


async def test_abruptly_stopped_member_is_declared_failed(cluster: Cluster) -> None:
    nodes = await cluster.start_joined(5)
    victim, others = nodes[4], nodes[:4]
    await victim.gossip.stop()  # sockets closed, nobody told
    first = await poll(lambda: any(o.count("n4", EventKind.FAILED) for o in others), 15.0)
    rest = await poll(lambda: all(o.count("n4", EventKind.FAILED) == 1 for o in others), 15.0)
    # A liveness bound only: the machine is shared, figures belong to bench/gossip.py.
    print(f"\nfailure detected: first peer {first:.2f} s, all 4 peers {first + rest:.2f} s")
    assert first + rest < 15.0
    assert all(o.state_of("n4") is MemberState.DEAD for o in others)
    assert all(o.count("n4", EventKind.LEAVE) == 0 for o in others)


async def test_failed_member_restarted_under_same_name_rejoins(cluster: Cluster) -> None:
    nodes = await cluster.start_joined(4)
    victim, others = nodes[3], nodes[:3]
    port = victim.gossip.addr[1]
    await victim.gossip.stop()
    await poll(lambda: all(o.state_of("n3") is MemberState.DEAD for o in others), 15.0)
    # A fresh process: incarnation 0, below the tombstone; it must outbid its own death.
    reborn = await cluster.start("n3", port=port)
    assert await reborn.gossip.join([others[0].gossip.addr]) == 1
    await poll(lambda: all(o.count("n3", EventKind.JOIN) == 2 for o in others), 5.0)
    await poll(lambda: len(reborn.gossip.alive_members()) == 4, 5.0)
    assert reborn.gossip.local_member.incarnation >= 1


async def test_graceful_leave_gives_leave_event_not_failed(cluster: Cluster) -> None:
    nodes = await cluster.start_joined(5)
    leaver, others = nodes[4], nodes[:4]
    await leaver.gossip.leave(timeout=3.0)
    await leaver.gossip.stop()
    await poll(lambda: all(o.state_of("n4") is MemberState.LEFT for o in others), 5.0)
    await poll(lambda: all(o.count("n4", EventKind.LEAVE) == 1 for o in others), 5.0)
    # LEFT is terminal, so FAILED can no longer follow.
    assert all(o.count("n4", EventKind.FAILED) == 0 for o in others)
    assert all(len(o.gossip.alive_members()) == 4 for o in others)


async def test_tag_update_reaches_every_member_as_one_update_event(cluster: Cluster) -> None:
    nodes = await cluster.start_joined(3)
    nodes[0].gossip.set_tags({"rpc_addr": "127.0.0.1:9999"})
    await poll(lambda: all(n.count("n0", EventKind.UPDATE) == 1 for n in nodes[1:]), 5.0)
    for n in nodes[1:]:
        update = next(e for e in n.events if e.kind is EventKind.UPDATE)
        assert dict(update.member.tags) == {"rpc_addr": "127.0.0.1:9999"}


async def test_node_with_wrong_key_is_dropped_counted_and_never_joins(cluster: Cluster) -> None:
    nodes = await cluster.start_joined(3)
    rogue = await cluster.start("rogue", key=os.urandom(32))
    target = nodes[0].gossip
    with pytest.raises(JoinFailed):
        await rogue.gossip.join([f"127.0.0.1:{target.addr[1]}"], retries=2, timeout=3.0)
    await poll(lambda: target.stats.auth_failures >= 2, 5.0)  # one per TCP attempt
    # A well-formed datagram announcing the rogue, sealed under the wrong key.
    fake = Member("rogue", rogue.gossip.addr, {}, MemberState.ALIVE, 5)
    frame = PacketSealer(os.urandom(32)).seal(
        wire.encode_packet(Packet(Ping(1, "rogue", "n0"), (fake,))), AAD_UDP)
    before = target.stats.auth_failures
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(frame, target.addr)
    await poll(lambda: target.stats.auth_failures > before, 5.0)
    assert all(n.state_of("rogue") is None for n in nodes)
    assert rogue.state_of("n0") is None


async def _send_tcp(addr: tuple[str, int], data: bytes) -> None:
    _reader, writer = await asyncio.open_connection(*addr)
    writer.write(data)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


@pytest.mark.parametrize("insecure", [False, True])
async def test_garbage_on_udp_and_tcp_is_dropped_and_node_keeps_working(
    cluster: Cluster, insecure: bool
) -> None:
    key = None if insecure else KEY
    a = await cluster.start("a", key=key, insecure=insecure)
    g = a.gossip
    garbage = [b"", b"\x00", b"\x01" + os.urandom(40), b"\x00{not json", b"\x00[1,2]",
               b'\x00{"v":1,"m":["p","x","a","a"],"u":[]}', os.urandom(1000)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for data in garbage:
            s.sendto(data, g.addr)
    await poll(lambda: g.stats.auth_failures + g.stats.malformed_packets == len(garbage), 5.0)
    if insecure:
        assert g.stats.malformed_packets >= 4
    for data in [b"\x00\x00\x00\x05hello", struct.pack(">I", 2**31), b"\x00\x00", b"",
                 struct.pack(">I", 100) + b"\x00short"]:
        await _send_tcp(g.addr, data)
    await poll(lambda: g.stats.auth_failures + g.stats.malformed_packets >= len(garbage) + 4,
               5.0)
    # Still serving: a fresh node joins and both see each other alive.
    b = await cluster.start("b", key=key, insecure=insecure)
    assert await b.gossip.join([g.addr]) == 1
    await poll(lambda: len(g.alive_members()) == 2 and len(b.gossip.alive_members()) == 2, 5.0)


async def test_driver_refuses_to_start_without_key_unless_insecure() -> None:
    g = Membership(GossipConfig(node_name="x", bind_addr=("127.0.0.1", 0)))
    with pytest.raises(GossipKeyRequired):
        await g.start()
    ok = Membership(GossipConfig(node_name="y", bind_addr=("127.0.0.1", 0), insecure=True))
    await ok.start()
    try:
        assert ok.local_member.state is MemberState.ALIVE
    finally:
        await ok.stop()


async def test_refused_start_releases_its_ports_and_a_second_start_is_refused() -> None:
    g = Membership(GossipConfig(node_name="g", bind_addr=("127.0.0.1", 0), key=KEY))
    await g.start()
    try:
        with pytest.raises(GossipConfigError):
            await g.start()
    finally:
        await g.stop()
    port = g.addr
    big = GossipConfig(node_name="big", bind_addr=port, key=KEY, tags={"blob": "x" * 5000})
    with pytest.raises(GossipConfigError):
        await Membership(big).start()
    # Binding the same port again proves the refused start closed both sockets.
    again = Membership(GossipConfig(node_name="g", bind_addr=port, key=KEY))
    await again.start()
    await again.stop()


async def test_join_retries_then_fails_on_dead_addresses(cluster: Cluster) -> None:
    a = await cluster.start("a")
    with socket.socket() as s:  # a port that is certainly closed
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()
    with pytest.raises(JoinFailed):
        await a.gossip.join([f"{dead[0]}:{dead[1]}"], retries=3, timeout=3.0)


async def test_a_flood_of_silent_push_pull_connections_does_not_keep_a_member_out(
    cluster: Cluster,
) -> None:
    """The push-pull port holds at most GOSSIP_TCP_CONNECTIONS: past it the oldest is cut
    for a new one, so 300 connections that send nothing neither use up the node's
    descriptors nor keep a joining member out."""
    # Silent connections are also dropped after tcp_timeout; a long one here, so that only
    # the cap sheds them while the flood (slower on a loaded machine) goes on.
    a = await cluster.start("a", tcp_timeout=60.0)
    flood: list[socket.socket] = []

    def connect_all() -> None:  # in a thread: this loop must go on accepting meanwhile
        for _ in range(300):
            flood.append(socket.create_connection(a.gossip.addr, timeout=5))

    try:
        await asyncio.get_running_loop().run_in_executor(None, connect_all)
        await poll(lambda: a.gossip.tcp_cap.shed["evicted"] >= 300 - GOSSIP_TCP_CONNECTIONS,
                   10.0)
        assert a.gossip.tcp_cap.open <= GOSSIP_TCP_CONNECTIONS
        b = await cluster.start("b")
        assert await b.gossip.join([f"127.0.0.1:{a.gossip.addr[1]}"], retries=3,
                                   timeout=10.0) == 1
        await poll(lambda: a.state_of("b") is MemberState.ALIVE, 10.0)
    finally:
        for sock in flood:
            sock.close()
