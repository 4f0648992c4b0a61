"""Three-node clusters of real `dcl agent` processes over mutual TLS on 127.0.0.1.

Each test starts its own cluster (node-0 bootstraps; node-1 and node-2 ask the others to
admit them with Admin.Join, which redirects to the leader), so a failure in one story cannot
leak into the next; see tests/integration/cluster_harness.py.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.health.v1 import health_pb2

from dcl.api.dcl.v1 import batch_pb2
from dcl.api.log.v1 import log_grpc, log_pb2
from dcl.server.certs import PkiFiles
from dcl.server.server import MESSAGE_OVERHEAD_BYTES
from dcl.server.services import Limits
from tests.integration.cluster_harness import TRANSIENT, Cluster, NodeProcess, eventually

pytestmark = pytest.mark.timeout(75)

#: Elections, joins and catch-up on a loaded 2-core machine: generous, but polled.
SETTLE = 30.0


async def wait_for_log(node: NodeProcess, expected: dict[int, bytes]) -> None:
    """Poll node until every expected (offset, value) is readable there."""
    need = max(expected) + 1

    async def present() -> bool:
        values = await node.consume_all()
        if len(values) < need:
            return False
        wrong = {o: values[o] for o, v in expected.items() if values[o] != v}
        assert not wrong, f"{node.name} holds other values at acknowledged offsets: {wrong}"
        return True

    await eventually(present, timeout=SETTLE, what=f"{node.name} holds offsets 0..{need - 1}")


@pytest.mark.parametrize("announce_ms", [None, "2"])
async def test_records_produced_on_the_leader_are_readable_on_every_follower(
    pki: PkiFiles, tmp_path: Path, announce_ms: str | None
) -> None:
    """Also with commit announcements held for the next write (--commit-announce-ms): the
    last write's commit still reaches the followers."""
    cluster = Cluster(pki, tmp_path)
    if announce_ms is not None:
        for node in cluster.nodes:
            node.extra_args += ["--commit-announce-ms", announce_ms]
    async with cluster:
        # Cluster start already waited for every node's GetServers to list all three with
        # their rpc addresses and to agree on exactly one leader; check the shape once more.
        leader = await cluster.wait_for_members(cluster.nodes, timeout=SETTLE)
        for node in cluster.nodes:
            servers = await node.servers()
            assert sorted((s.id, s.rpc_addr, s.is_leader) for s in servers) == sorted(
                (n.name, n.rpc_addr, n is leader) for n in cluster.nodes)

        single = await leader.produce(b"single")
        first = await leader.produce_batch([b"batch-0", b"batch-1", b"batch-2"])
        expected = {single: b"single"} | {first + i: b"batch-%d" % i for i in range(3)}
        assert sorted(expected) == list(range(single, single + 4))

        for follower in cluster.others(leader):
            await wait_for_log(follower, expected)
            assert await follower.consume(first + 1) == b"batch-1"


async def test_concurrent_and_pipelined_appends_each_get_their_own_offset(
    pki: PkiFiles, tmp_path: Path
) -> None:
    """Appends in flight together share Raft entries on the leader (coalescing); every
    acknowledgement must still name the offset that holds exactly that record, and a
    ProduceStream's acks must come back in request order."""
    async with Cluster(pki, tmp_path) as cluster:
        leader = await cluster.wait_for_members(cluster.nodes, timeout=SETTLE)
        acked: dict[int, bytes] = {}

        async def unary(i: int) -> None:
            value = b"unary-%d" % i
            acked[await leader.produce(value)] = value

        async def stream(s: int, count: int) -> None:
            with leader.channel() as channel:
                async with log_grpc.LogStub(channel).ProduceStream.open(timeout=30) as st:
                    values = [b"stream-%d-%d" % (s, i) for i in range(count)]
                    for value in values:  # all sent before any ack is read: pipelined
                        await st.send_message(
                            log_pb2.ProduceRequest(record=log_pb2.Record(value=value)))
                    await st.end()
                    offsets = [(await st.recv_message()).offset for _ in values]  # type: ignore[union-attr]
            assert offsets == sorted(offsets), "stream acks out of request order"
            acked.update(zip(offsets, values, strict=True))

        await asyncio.gather(*(unary(i) for i in range(100)),
                             *(stream(s, 200) for s in range(3)))
        assert sorted(acked) == list(range(len(acked))) and len(acked) == 700
        for node in cluster.nodes:
            await wait_for_log(node, acked)


async def test_a_batch_as_large_as_a_client_request_may_be_is_replicated(
    pki: PkiFiles, tmp_path: Path
) -> None:
    """The records of one ProduceBatch become one Raft entry, and Raft framing makes it a few
    bytes larger than the request: peers must accept it, or replication wedges for good."""
    limit = Limits().max_record_bytes + MESSAGE_OVERHEAD_BYTES
    values = [b"%06d" % i + b"r" * 994 for i in range(1100)]
    size = batch_pb2.ProduceBatchRequest(values=values).ByteSize()
    values.append(b"p" * (limit - size - 3 - 16))  # 3: the last value's tag and length
    assert limit - 16 <= batch_pb2.ProduceBatchRequest(values=values).ByteSize() <= limit
    async with Cluster(pki, tmp_path) as cluster:
        leader = await cluster.wait_for_members(cluster.nodes, timeout=SETTLE)
        first = await leader.produce_batch(values)
        after = await leader.produce(b"after")
        expected = {first + i: v for i, v in enumerate(values)} | {after: b"after"}
        for follower in cluster.others(leader):
            await wait_for_log(follower, expected)


async def test_every_node_serves_health_once_a_leader_exists(
    pki: PkiFiles, tmp_path: Path
) -> None:
    async with Cluster(pki, tmp_path) as cluster:
        for node in cluster.nodes:
            async def serving(node: NodeProcess = node) -> bool:
                return await node.health() == health_pb2.HealthCheckResponse.SERVING

            await eventually(serving, timeout=SETTLE, what=f"{node.name} SERVING")


async def test_produce_on_a_follower_is_refused_with_the_leaders_address(
    pki: PkiFiles, tmp_path: Path
) -> None:
    async with Cluster(pki, tmp_path) as cluster:
        leader = await cluster.wait_for_members(cluster.nodes, timeout=SETTLE)
        for follower in cluster.others(leader):
            async def redirected(follower: NodeProcess = follower) -> bool:
                status, leader_addr = await follower.produce_refusal(b"misdirected")
                assert status is Status.FAILED_PRECONDITION
                # The address book entry may trail the election by one commit.
                return leader_addr == leader.rpc_addr

            await eventually(redirected, timeout=SETTLE, what=f"{follower.name} redirects")
        assert await leader.next_offset() == 0, "a refused produce must append nothing"


async def test_killing_the_leader_elects_another_and_loses_no_acknowledged_record(
    pki: PkiFiles, tmp_path: Path
) -> None:
    async with Cluster(pki, tmp_path) as cluster:
        leader = await cluster.wait_for_members(cluster.nodes, timeout=SETTLE)
        acked: dict[int, bytes] = {}

        def ack(first: int, values: list[bytes]) -> None:
            for i, value in enumerate(values):
                assert first + i not in acked, f"offset {first + i} acknowledged twice"
                acked[first + i] = value

        async def produce_until_it_fails(node: NodeProcess, worker: int) -> None:
            """Produce (alternating single and batch) until the node stops answering."""
            for n in range(10_000):
                values = [b"w%d-%d-%d" % (worker, n, j) for j in range(1 + n % 2 * 4)]
                try:
                    if len(values) == 1:
                        ack(await node.produce(values[0]), values)
                    else:
                        ack(await node.produce_batch(values), values)
                except TRANSIENT:
                    return  # outcome unknown: in flight when the leader died

        # Kill the leader while four producers have calls in flight.
        producers = [asyncio.create_task(produce_until_it_fails(leader, w)) for w in range(4)]
        try:
            async def enough_acked() -> bool:
                return len(acked) >= 100

            await eventually(enough_acked, timeout=SETTLE, what="100 records acknowledged")
            leader.kill()
            await asyncio.wait_for(asyncio.gather(*producers), timeout=SETTLE)
        finally:
            for task in producers:
                task.cancel()
        survivors = cluster.others(leader)
        new_leader = await cluster.leader_among(survivors, timeout=SETTLE)
        assert new_leader is not leader

        for i in range(10):
            value = b"after-%d" % i
            ack(await new_leader.produce(value), [value])
        batch = [b"after-batch-%d" % i for i in range(10)]
        ack(await new_leader.produce_batch(batch), batch)

        for node in survivors:
            await wait_for_log(node, acked)

        cluster.start(leader)  # same data dir and port
        await cluster.wait_for_members(cluster.nodes, timeout=SETTLE)
        await wait_for_log(leader, acked)
        assert await leader.consume_all() == await new_leader.consume_all()


@pytest.mark.parametrize("retain", ["0", None], ids=["no-retention", "default-retention"])
async def test_a_restarted_node_catches_up_after_compaction(
    pki: PkiFiles, tmp_path: Path, retain: str | None
) -> None:
    """The leader compacted its Raft log past what the victim needs. With no log kept below
    the snapshot the victim gets the snapshot; with the default retention (256 MiB, far more
    than this test writes) it gets the log entries instead, and no snapshot travels."""
    cluster = Cluster(pki, tmp_path, snapshot_threshold=50)
    if retain is not None:
        for node in cluster.nodes:
            node.extra_args += ["--raft-retain-bytes", retain]
    async with cluster:
        leader = await cluster.wait_for_members(cluster.nodes, timeout=SETTLE)
        victim = cluster.others(leader)[0]
        victim_last = next(s.last_index for s in (await leader.cluster()).servers
                           if s.id == victim.name)
        victim.kill()

        expected: dict[int, bytes] = {}
        for i in range(150):  # one Raft entry each: three snapshots' worth
            batch = [b"%d-a" % i, b"%d-b" % i]
            first = await leader.produce_batch(batch)
            expected |= {first + j: v for j, v in enumerate(batch)}

        async def compacted() -> bool:
            """The leader's log no longer holds the entry the victim needs next."""
            found = re.findall(r"snapshot node=\S+ index=(\d+)", leader.log_path.read_text())
            return any(int(index) > victim_last + 1 for index in found)

        await eventually(compacted, timeout=SETTLE, what="leader compacted past the victim")

        cluster.start(victim)
        await cluster.wait_for_members(cluster.nodes, timeout=SETTLE)
        await wait_for_log(victim, expected)
        assert await victim.consume_all() == await leader.consume_all()
        assert len(await victim.consume_all()) == 300
        installed = "installing snapshot" in victim.log_path.read_text()
        if retain == "0":
            assert installed, "the victim must have caught up from a snapshot, not log entries"
        else:
            assert not installed, "the victim must have caught up from retained log entries"


async def test_a_node_catching_up_stops_taking_entries_at_its_raft_log_memory_limit(
    pki: PkiFiles, tmp_path: Path
) -> None:
    """A restarted node gets 32 MiB of log as fast as the leader can send it, with a 512 KiB
    Raft-log cap: its snapshots (copies of its growing commit log) cannot keep up, and
    entries arriving while one builds used to pile up in memory. It must stop taking them
    at its limit (`--raft-log-memory-bytes`) until a snapshot frees memory, say so, and
    still end with exactly the leader's records."""
    cluster = Cluster(pki, tmp_path, snapshot_threshold=1)
    limit = 768 << 10  # by flag; the driver's tests cover the default, twice the cap
    for node in cluster.nodes:
        node.extra_args += ["--snapshot-log-bytes", str(512 << 10)]
        node.extra_args += ["--raft-log-memory-bytes", str(limit)]
    async with cluster:
        leader = await cluster.wait_for_members(cluster.nodes, timeout=SETTLE)
        victim = cluster.others(leader)[0]
        victim.kill()
        expected: dict[int, bytes] = {}
        for i in range(64):  # one 512 KiB Raft entry each
            batch = [b"%d-%d-" % (i, j) + b"x" * 4000 for j in range(128)]
            first = await leader.produce_batch(batch)
            expected |= {first + j: v for j, v in enumerate(batch)}

        cluster.start(victim)
        await cluster.wait_for_members(cluster.nodes, timeout=SETTLE)
        await wait_for_log(victim, expected)
        assert await victim.consume_all() == await leader.consume_all()
        text = victim.log_path.read_text()
        refused = [(int(held), int(at)) for held, at in
                   re.findall(r"refusing appends .*log_bytes=(\d+) limit=(\d+)", text)]
        assert refused, "the victim never reached its memory limit"
        # It stops at its limit, over by at most the message that crossed it (the leader
        # puts up to 1 MiB of entries in one).
        assert {at for _, at in refused} == {limit}
        assert all(limit <= held < limit + (1 << 20) for held, _ in refused), refused
        assert "taking appends again" in text


async def test_a_removed_node_stops_receiving_records(pki: PkiFiles, tmp_path: Path) -> None:
    async with Cluster(pki, tmp_path) as cluster:
        leader = await cluster.wait_for_members(cluster.nodes, timeout=SETTLE)
        removed, kept = cluster.others(leader)
        before = await leader.produce(b"before-leave")
        await wait_for_log(removed, {before: b"before-leave"})

        await leader.leave(removed.name)
        remaining = [leader, kept]
        await cluster.wait_for_members(remaining, timeout=SETTLE)

        after = await leader.produce(b"after-leave")
        await wait_for_log(kept, {after: b"after-leave"})

        # The removed node keeps running, but nothing new reaches it.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert await removed.consume(after) is None, "a removed node received a record"
            assert await removed.next_offset() == after
            await asyncio.sleep(0.1)
        assert removed.running
        # It stops advertising itself as healthy, so load balancers route around it.
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING

        async def unhealthy() -> bool:
            return await removed.health() == not_serving

        await eventually(unhealthy, timeout=SETTLE, what="removed node reports NOT_SERVING")
        # Nor does it disturb the others: the leader still commits without it.
        last = await leader.produce(b"still-serving")
        await wait_for_log(kept, {last: b"still-serving"})
        assert await removed.consume(last) is None
