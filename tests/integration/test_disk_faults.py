"""Disk faults on restart: a node restarted on damaged files recovers or refuses, never serves
garbage, and no acknowledged record is lost.

Real `dcl agent` processes (3 nodes, mutual TLS) with small segments, so the commit log and
the Raft log roll and the Raft log is compacted behind snapshots. One cluster goes through the
faults in turn; after each restart the damaged node's commit log must equal the leader's at
every offset (value and term), including records produced while it was down or recovering.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from dcl.api.dcl.v1 import batch_grpc, batch_pb2
from dcl.server.certs import PkiFiles
from tests.integration.cluster_harness import CALL_TIMEOUT, Cluster, NodeProcess, eventually

pytestmark = pytest.mark.timeout(90)

SETTLE = 30.0
SEGMENT_BYTES = 16 << 10
Record = tuple[int, bytes, int]


async def records(node: NodeProcess) -> list[Record]:
    """(offset, value, term) of every record the node serves; a DATA_LOSS answer raises."""
    out: list[Record] = []
    with node.channel() as channel:
        stub = batch_grpc.BatchStub(channel)
        while True:
            reply = await stub.ConsumeBatch(
                batch_pb2.ConsumeBatchRequest(offset=len(out)), timeout=CALL_TIMEOUT)
            assert reply is not None
            out += [(r.offset, r.value, r.term) for r in reply.records]
            if not reply.records or len(out) >= reply.next_offset:
                return out


async def produce(leader: NodeProcess, rng: random.Random, batches: int) -> list[bytes]:
    values: list[bytes] = []
    for _ in range(batches):
        batch = [rng.randbytes(rng.randrange(50, 400)) for _ in range(rng.randrange(1, 12))]
        first = await leader.produce_batch(batch)
        assert first >= 0
        values += batch
    return values


async def assert_caught_up(node: NodeProcess, leader: NodeProcess, acked: list[bytes]) -> None:
    """The node serves exactly the leader's records, which hold every acknowledged value."""

    async def same() -> list[Record] | None:
        if not node.running:
            raise AssertionError(f"{node.name} exited:\n{node.log_tail()}")
        theirs = await records(leader)
        ours = await records(node)
        return ours if ours == theirs and len(ours) >= len(acked) else None

    final = await eventually(same, timeout=SETTLE, what=f"{node.name} equals {leader.name}")
    assert [offset for offset, _, _ in final] == list(range(len(final)))
    assert [value for _, value, _ in final] == acked  # one producer: acked in offset order


def commit_log(node: NodeProcess) -> Path:
    return node.data_dir / "fsm" / "commitlog"


def nonempty(paths: list[Path]) -> list[Path]:
    return [p for p in paths if p.stat().st_size]


def zero(path: Path, position: int, size: int) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        f.write(bytes(size))


async def test_a_node_restarted_on_damaged_files_recovers_or_refuses_never_serves_garbage(
    pki: PkiFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DCL_SEGMENT_BYTES", str(SEGMENT_BYTES))
    # No Raft log kept below snapshots: step 3 rebuilds from the snapshot, and step 4's
    # second-newest Raft segment then holds live entries (a retained one may be damaged
    # harmlessly: tests/unit/raft/test_storage.py covers that).
    monkeypatch.setenv("DCL_RAFT_RETAIN_BYTES", "0")
    rng = random.Random(6)
    async with Cluster(pki, tmp_path, snapshot_threshold=25) as cluster:
        leader = await cluster.wait_for_members(cluster.nodes, timeout=SETTLE)
        acked = await produce(leader, rng, 60)
        first, second = cluster.others(leader)
        await assert_caught_up(first, leader, acked)

        # 1 + 2: clean stop; the active commit-log store cut at a random byte (the records the
        # checkpoint vouched for are gone) and every index left oversized with zero fill.
        first.stop()
        stores = nonempty(sorted(commit_log(first).glob("*.store")))
        assert len(stores) >= 3, "small segments: the commit log rolled"
        active = stores[-1]
        with open(active, "r+b") as f:
            f.truncate(rng.randrange(active.stat().st_size))
        for index in commit_log(first).glob("*.index"):
            with open(index, "ab") as f:
                f.write(bytes(12 * 4096))
        cluster.start(first)
        acked += await produce(leader, rng, 10)
        await assert_caught_up(first, leader, acked)
        assert "commit log rebuilt from local raft state" in first.log_path.read_text()

        # 3: the leader crashes; a zeroed block in a sealed commit-log segment, found at open
        # and rebuilt (here from the Raft snapshot: its Raft log was compacted past it).
        leader.kill()
        sealed = nonempty(sorted(commit_log(leader).glob("*.store")))[:-1]
        target = sealed[0]
        zero(target, rng.randrange(target.stat().st_size - 512), 512)
        new_leader = await cluster.leader_among([first, second], timeout=SETTLE)
        acked += await produce(new_leader, rng, 10)
        cluster.start(leader)
        acked += await produce(new_leader, rng, 10)
        await assert_caught_up(leader, new_leader, acked)
        text = leader.log_path.read_text()
        assert "commit log damaged" in text and "commit log rebuilt" in text
        await assert_caught_up(first, new_leader, acked)
        await assert_caught_up(second, new_leader, acked)

        # Damage while running (no restart to find it): the bad range answers DATA_LOSS,
        # never other bytes, both record by record and in batches.
        victim = second if second is not new_leader else first
        sealed = nonempty(sorted(commit_log(victim).glob("*.store")))[:-1]
        base = int(sealed[1].stem)
        zero(sealed[1], 0, 64)
        for read in (victim.consume(base), records(victim)):
            with pytest.raises(GRPCError) as info:
                await read
            assert info.value.status is Status.DATA_LOSS
        assert await victim.consume(base - 1) == acked[base - 1]

        # 4: a zeroed block in a sealed Raft segment holding live entries: refuse to start,
        # naming the file, rather than act on a log that may have lost acknowledged entries.
        raft_stores = sorted((victim.data_dir / "raft" / "log").glob("*.store"))
        while len(raft_stores) < 2:
            acked += await produce(new_leader, rng, 5)
            raft_stores = sorted((victim.data_dir / "raft" / "log").glob("*.store"))
        victim.stop()
        raft_stores = sorted((victim.data_dir / "raft" / "log").glob("*.store"))
        damaged = raft_stores[-2]  # its last entry is newer than any snapshot (not compacted)
        zero(damaged, damaged.stat().st_size - 64, 64)
        cluster.start(victim)
        assert victim.proc is not None
        code = victim.proc.wait(timeout=SETTLE)
        assert code != 0
        assert str(damaged) in victim.log_tail(), victim.log_tail()
        # The other two keep serving every acknowledged record.
        acked += await produce(new_leader, rng, 5)
        survivor = first if victim is second else second
        await assert_caught_up(survivor, new_leader, acked)
