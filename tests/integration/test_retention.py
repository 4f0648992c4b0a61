"""Commit-log retention on a cluster of real processes (`--retention-bytes`, `--retention-ms`).

What an operator checks: the disk a node's log takes stays near the limit while writes go
on; a read below a node's first offset answers OUT_OF_RANGE naming the range it holds; the
newest records are served everywhere; a node killed and restarted keeps its log (it does
not take the cut for lost segments and rebuild); a node that catches up by snapshot gets
only the retained records, at their offsets.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from dcl.api.log.v1 import log_grpc, log_pb2
from dcl.server.certs import PkiFiles
from tests.integration.cluster_harness import CALL_TIMEOUT, Cluster, NodeProcess, eventually
from tests.integration.test_cli import one_line_error, run_dcl

pytestmark = pytest.mark.timeout(120)

KIB = 1024
SEGMENT = 64 * KIB
RETAIN = 256 * KIB
SETTLE = 30.0


def value_at(offset: int) -> bytes:
    return b"%08d" % offset + b"r" * 1016


async def held_range(node: NodeProcess) -> tuple[int, int]:
    """[first, next) offsets the node holds, from the OUT_OF_RANGE detail of a read at 0."""
    with node.channel() as channel:
        try:
            await log_grpc.LogStub(channel).Consume(log_pb2.ConsumeRequest(offset=0),
                                                    timeout=CALL_TIMEOUT)
        except GRPCError as exc:
            assert exc.status is Status.OUT_OF_RANGE, exc
            match = re.search(r"holds \[(\d+), (\d+)\)", exc.message or "")
            assert match, f"no range in {exc.message!r}"
            return int(match[1]), int(match[2])
    return 0, -1  # offset 0 is still there


def store_sizes(node: NodeProcess) -> list[int]:
    """Sizes of the node's commit-log store files, oldest first (names sort by offset)."""
    stores = sorted((node.data_dir / "fsm" / "commitlog").glob("*.store"))
    return [path.stat().st_size for path in stores]


async def cut_below(node: NodeProcess, end: int) -> tuple[int, int] | None:
    """The node's range once it holds every record up to `end` and retention cut its head."""
    first, next_offset = await held_range(node)
    return (first, next_offset) if first > 0 and next_offset >= end else None


async def test_retention_bounds_each_nodes_log_and_survives_restart_and_catch_up(
    pki: PkiFiles, tmp_path: Path
) -> None:
    cluster = Cluster(pki, tmp_path, snapshot_threshold=20)
    for node in cluster.nodes:
        node.extra_args += ["--segment-bytes", str(SEGMENT), "--retention-bytes", str(RETAIN),
                            "--raft-retain-bytes", "0", "--snapshot-log-bytes", str(4 * SEGMENT)]
    async with cluster:
        leader = await cluster.wait_for_members(cluster.nodes, timeout=SETTLE)
        end = 0
        for _ in range(32):  # 2 MiB of 1 KiB records, eight times the limit
            end = await leader.produce_batch([value_at(end + i) for i in range(64)]) + 64

        for node in cluster.nodes:

            async def trimmed(node: NodeProcess = node) -> tuple[int, int] | None:
                """Cut as far as the limit allows: one segment less would be under it. The
                files are read on both sides of the range, so that a cut between the two
                reads (a pass runs every 2 s) is not taken for this state."""
                sizes = store_sizes(node)
                held = await cut_below(node, end)
                if store_sizes(node) != sizes:
                    return None
                return held if held and sum(sizes) - sizes[0] < RETAIN else None

            first, next_offset = await eventually(trimmed, timeout=SETTLE,
                                                  what=f"{node.name} cut its log")
            assert next_offset == end
            assert sum(store_sizes(node)) >= RETAIN, f"{node.name} dropped more than it had to"
            assert await node.consume(first) == value_at(first)
            assert await node.consume(end - 1) == value_at(end - 1)
            assert await node.consume(first - 1) is None  # OUT_OF_RANGE, not another record

        # The CLI reads from where the log starts by default, and says where it starts
        # when asked for less.
        first, _ = await held_range(leader)
        tls = ["--ca-file", str(pki.ca_cert), "--cert-file", str(pki.root_client_cert),
               "--key-file", str(pki.root_client_key), "--addr", leader.rpc_addr]
        result = run_dcl("consume", "--count", "2", "--output", "json", *tls)
        assert result.returncode == 0, result.stderr
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert [line["offset"] for line in lines] == [first, first + 1]
        assert lines[0]["value"] == value_at(first).decode()
        error = one_line_error(run_dcl("consume", "--from", "0", *tls))
        assert f"offset out of range: 0 (log holds [{first}, {end}))" in error, error
        # `dcl status` shows each node's range and what it takes on disk.
        result = run_dcl("status", "--output", "json", *tls)
        assert result.returncode == 0, result.stderr
        for row in json.loads(result.stdout):
            node = next(n for n in cluster.nodes if n.name == row["node"])
            assert (row["first_offset"], row["next_offset"]) == await held_range(node)
            assert row["log_bytes"] == sum(store_sizes(node)) < RETAIN + SEGMENT + 2 * KIB
        table = run_dcl("status", *tls)
        assert table.stdout.count(f" {first}-{end} ") == 3, table.stdout

        # A crash: the node comes back with the log it had, not a rebuilt one.
        victim = cluster.others(leader)[0]
        before = await held_range(victim)
        victim.kill()
        cluster.start(victim)
        await cluster.wait_for_members(cluster.nodes, timeout=SETTLE)
        after = await eventually(lambda: cut_below(victim, end), timeout=SETTLE,
                                 what="restarted node serving")
        assert after[0] >= before[0]
        text = victim.log_path.read_text()
        assert "lost its first segments" not in text and "rebuilt" not in text

        # A new node catches up by snapshot (no Raft log kept below it): it gets the
        # leader's retained records only, at their offsets, and then new ones. First the
        # leader takes a snapshot of its cut log (smaller than the 2 MiB written).
        for _ in range(8):
            end = await leader.produce_batch([value_at(end + i) for i in range(64)]) + 64

        async def small_snapshot() -> bool:
            sizes = re.findall(rf"snapshot node={leader.name} index=\d+ bytes=(\d+)",
                               leader.log_path.read_text())
            return any(int(size) < 1024 * KIB for size in sizes)

        await eventually(small_snapshot, timeout=SETTLE, what="a snapshot of the cut log")
        newcomer = cluster.add_node()
        await cluster.wait_for_members(cluster.nodes, timeout=SETTLE)
        tail = await leader.produce_batch([value_at(end)]) + 1
        first, _ = await eventually(lambda: cut_below(newcomer, tail), timeout=SETTLE,
                                    what="newcomer caught up")
        assert "installing snapshot" in newcomer.log_path.read_text()
        for offset in (first, tail - 2, tail - 1):
            assert await newcomer.consume(offset) == value_at(offset)


async def test_age_retention_drops_segments_once_their_newest_record_is_old_enough(
    pki: PkiFiles, tmp_path: Path
) -> None:
    cluster = Cluster(pki, tmp_path, size=1)
    cluster.nodes[0].extra_args += ["--segment-bytes", str(SEGMENT), "--retention-ms", "5000"]
    async with cluster:
        node = cluster.nodes[0]
        end = 0
        started = time.monotonic()
        for _ in range(8):  # 512 KiB: eight segments
            end = await node.produce_batch([value_at(end + i) for i in range(64)]) + 64
        assert len(store_sizes(node)) >= 8
        if time.monotonic() - started < 4:  # else the first records may be 5 s old already
            assert await held_range(node) == (0, -1), "cut before the records were 5 s old"

        async def only_the_active_segment() -> tuple[int, int] | None:
            return await cut_below(node, end) if len(store_sizes(node)) == 1 else None

        first, _ = await eventually(only_the_active_segment, timeout=SETTLE,
                                    what="every sealed segment dropped")
        assert await node.consume(end - 1) == value_at(end - 1)
        assert await node.consume(first) == value_at(first)
