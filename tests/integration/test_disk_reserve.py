"""A node whose disk fills up, on real `dcl agent` processes (`--min-free-bytes`).

The node under test runs in a mount namespace of its own (`unshare`, as root): its data dir
is a small tmpfs only that process sees, which also holds a ballast file beside the node's
own files; the other nodes use the normal disk and the default reserve. The ballast is
reached from here through /proc/PID/root and deleting it frees the space, as an operator
would.

What an operator checks: a leader whose disk reaches the reserve hands leadership to a
node with room while clients write on; a follower whose disk reaches it stops taking
entries but stays up and serves what it has while the others go on; once a quorum lacks
room, writes are refused (RESOURCE_EXHAUSTED naming the nodes; the client raises
InsufficientStorage) and nothing is appended for them; each node catches up exactly once
space is freed. No node fills its disk or exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import cast

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from dcl.api.log.v1 import log_grpc, log_pb2
from dcl.client import DclClient
from dcl.errors import InsufficientStorage
from dcl.server.acl import Authorizer
from dcl.server.certs import PkiFiles
from dcl.server.replicated import LogFsm, ReplicatedBackend
from dcl.server.server import build_server
from dcl.tls import client_context, server_context
from tests.integration.cluster_harness import CALL_TIMEOUT, Cluster, NodeProcess, eventually
from tests.integration.test_metrics_endpoint import Samples, one, serve_metrics
from tests.unit.raft.test_driver import leader, record_value, until_applied
from tests.unit.raft.test_driver_disk import RESERVE as RESERVE_UNIT
from tests.unit.raft.test_driver_disk import Disk

pytestmark = pytest.mark.timeout(90)

MIB = 1 << 20
#: The node under test's disk: a tmpfs of TMPFS bytes, BALLAST of which a file takes, and a
#: reserve that leaves the node about 8 MiB to write (each record is stored twice: Raft log
#: and commit log), so a few MiB of records are acknowledged before it refuses; once the
#: ballast is deleted, it has 32 MiB to write again.
TMPFS = 48 * MIB
BALLAST = 32 * MIB
RESERVE = 8 * MIB
RECORD = 1024
BATCH = 64
#: Bound of every produce loop: 100 MiB of records; the disk fills long before.
MAX_BATCHES = 100 * MIB // (RECORD * BATCH)
SETTLE = 20.0
#: A follower counts as stopped once its next offset stayed put this long while the leader
#: took this many batches (it normally follows within a batch or two).
STALL_BATCHES = 16
STALL_SECONDS = 1.0
#: A leader whose disk is full hands over within moments (it tries every 0.5 s); a client
#: retrying its refusals with backoff (at most 1 s apart) gets through with these.
CLIENT_RETRIES = 10
#: A node stops within a batch or two of the reserve (it measures at most every 10 ms).
OVERSHOOT = 1 * MIB
#: What a node logs when its storage failed (it then exits) or anything else went wrong.
FAILURE = re.compile(r"^\S+ \S+ (ERROR|CRITICAL) |raft driver failed|No space left|ENOSPC"
                     r"|Traceback|fsync failed")


#: A scrape of one node's metrics (`serve_metrics`).
Scrape = Callable[[NodeProcess], Coroutine[None, None, Samples]]


def produce_request(value: bytes) -> log_pb2.ProduceRequest:
    return log_pb2.ProduceRequest(record=log_pb2.Record(value=value))


def value(offset: int) -> bytes:
    return b"%08d" % offset + b"d" * (RECORD - 8)


def batch_at(offset: int) -> list[bytes]:
    return [value(offset + i) for i in range(BATCH)]


@pytest.fixture(scope="module")
def private_mounts(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip unless this process may mount a tmpfs in a mount namespace of its own (root)."""
    if shutil.which("unshare") is None:
        pytest.skip("no `unshare` command (util-linux): cannot give a node a small disk")
    target = tmp_path_factory.mktemp("probe")
    script = (f"mount -t tmpfs -o size=1m dcl {shlex.quote(str(target))} "
              f"&& head -c 4096 /dev/zero > {shlex.quote(str(target / 'probe'))}")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, timeout=30, check=False)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs in a private mount namespace (needs root): "
                    + done.stderr.decode(errors="replace").strip())
    assert not (target / "probe").exists(), "the probe's tmpfs leaked out of its namespace"


def on_small_disk(node: NodeProcess) -> None:
    """Run node on a private tmpfs of TMPFS bytes mounted at its data dir, BALLAST of them
    taken by `ballast` (not one of the node's files), and a reserve of RESERVE. The tmpfs
    goes away with the process: a restart would start on an empty disk."""
    directory = shlex.quote(str(node.data_dir))
    script = (f"mkdir -p {directory} "
              f"&& mount -t tmpfs -o size={TMPFS} dcl {directory} "
              f"&& head -c {BALLAST} /dev/zero > {directory}/ballast "
              '&& exec "$@"')
    node.wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                    "dcl-small-disk"]
    node.extra_args += ["--min-free-bytes", str(RESERVE)]


def seen_by(node: NodeProcess, path: Path) -> Path:
    """`path` as the node's process sees it (through its mount namespace)."""
    assert node.proc is not None
    return Path(f"/proc/{node.proc.pid}/root") / path.relative_to("/")


def disk_free(node: NodeProcess) -> tuple[int, int]:
    """(size, free) of the node's data dir's filesystem, as the node measures it."""
    st = os.statvfs(seen_by(node, node.data_dir))
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def assert_small_disk(node: NodeProcess) -> None:
    size, free = disk_free(node)
    assert size == TMPFS, f"{node.name} is not on its own tmpfs (size {size})"
    assert free < TMPFS - BALLAST, f"no ballast on {node.name}'s disk (free {free})"


def free_space(node: NodeProcess) -> None:
    """Delete the ballast, as an operator would."""
    ballast = seen_by(node, node.data_dir / "ballast")
    os.unlink(ballast)
    _, free = disk_free(node)
    assert free > RESERVE + BALLAST // 2, f"{node.name}: deleting the ballast freed nothing"


async def refusal(node: NodeProcess, method: str) -> GRPCError:
    """The error a raw log.v1 Produce or ProduceStream of one record gets from node."""
    request = log_pb2.ProduceRequest(record=log_pb2.Record(value=b"refused"))
    with node.channel() as channel:
        stub = log_grpc.LogStub(channel)
        with pytest.raises(GRPCError) as info:
            if method == "Produce":
                await stub.Produce(request, timeout=CALL_TIMEOUT)
            else:
                async with stub.ProduceStream.open(timeout=CALL_TIMEOUT) as stream:
                    await stream.send_message(request, end=True)
                    reply = await stream.recv_message()
                    assert reply is None, f"{method} was acknowledged at {reply.offset}"
                    await stream.recv_trailing_metadata()
    return info.value


async def next_offset(node: NodeProcess) -> int:
    """node's next offset; an error from a node that exited names the exit (log tail)."""
    try:
        return await node.next_offset()
    except (GRPCError, OSError):
        assert node.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(timeout=2)
        assert node.running, f"{node.name} exited:\n{node.log_tail()}"
        raise


async def assert_serves_exactly(nodes: list[NodeProcess], acked: list[bytes]) -> None:
    """Every node serves exactly the acknowledged records, in order (followers may take a
    moment to apply the last ones)."""
    for node in nodes:

        async def same(node: NodeProcess = node) -> bool:
            if not node.running:
                raise AssertionError(f"{node.name} exited:\n{node.log_tail()}")
            return await node.consume_all() == acked

        await eventually(same, timeout=SETTLE, what=f"{node.name} serves the acked records")


def assert_no_storage_failure(node: NodeProcess) -> None:
    assert node.running, f"{node.name} exited:\n{node.log_tail()}"
    text = node.log_path.read_text(errors="replace")
    failures = [line for line in text.splitlines() if FAILURE.search(line)]
    assert not failures, "\n".join(failures)


async def catches_up_once_freed(cluster: Cluster, node: NodeProcess, leader: NodeProcess,
                                acked: list[bytes], scrape: Scrape) -> None:
    """Space freed on node (a follower that took no records): it catches up by itself to
    exactly the acknowledged records, takes new ones as they come, and says its disk is fine
    again, without a storage failure."""
    free_space(node)
    await assert_serves_exactly([node], acked)
    for _ in range(4):
        assert await leader.produce_batch(batch_at(len(acked))) == len(acked)
        acked += batch_at(len(acked))
    await assert_serves_exactly(cluster.nodes, acked)
    assert one(await scrape(node), "dcl_disk_low") == 0
    assert "disk above its reserve again" in node.log_path.read_text()
    assert_no_storage_failure(node)


async def test_a_leader_whose_disk_fills_hands_leadership_to_a_follower_with_room(
    pki: PkiFiles, tmp_path: Path, private_mounts: None
) -> None:
    """node-0 leads on a small disk, its followers have room. When its disk reaches the
    reserve it hands leadership over and writes go on, as a Kafka broker's partitions move
    off a failed log directory: a DclClient writing all along sees no error (it retries
    the refusals, which appended nothing). node-0 stays up as a follower holding a prefix
    of the log, does not fill its disk, and catches up exactly once space is freed."""
    cluster = Cluster(pki, tmp_path)
    scrape = serve_metrics(cluster, pki)
    node0 = cluster.nodes[0]
    on_small_disk(node0)
    async with cluster:
        target = await cluster.leader_among(cluster.nodes, timeout=SETTLE)
        assert target is node0
        assert_small_disk(node0)
        acked: list[bytes] = []
        moved_at: int | None = None  # records acked when node-0 was seen not leading
        tls = (pki.root_client_cert, pki.root_client_key, pki.ca_cert)
        # A client writing through the handoff sees no error: node-0's refusals for its
        # disk (nothing appended) and its redirects are retried on the new leader.
        async with DclClient([n.rpc_addr for n in cluster.nodes], tls,
                             retries=CLIENT_RETRIES) as client:
            for batch in range(MAX_BATCHES):
                assert await client.produce_batch(batch_at(len(acked))) == len(acked)
                acked += batch_at(len(acked))
                if moved_at is None and batch % 4 == 3:
                    target = await cluster.leader_among(cluster.nodes, timeout=SETTLE)
                    moved_at = None if target is node0 else len(acked)
                if moved_at is not None and len(acked) - moved_at >= STALL_BATCHES * BATCH:
                    break
        assert moved_at is not None, f"node-0 kept leading through {len(acked)} records"
        assert len(acked) - moved_at >= STALL_BATCHES * BATCH
        assert moved_at * RECORD >= 2 * MIB, f"handed over after {moved_at} records only"
        assert "handing leadership to" in node0.log_path.read_text()

        # node-0: up, a follower taking no records, its reserve kept, serving a prefix.
        assert_no_storage_failure(node0)
        _, free = disk_free(node0)
        assert RESERVE - OVERSHOOT <= free < RESERVE, free
        held = await node0.consume_all()
        assert held == acked[:len(held)] and len(held) < len(acked), len(held)
        assert one(await scrape(node0), "dcl_disk_low") == 1
        await assert_serves_exactly(cluster.others(node0), acked)
        assert await cluster.leader_among(cluster.nodes, timeout=SETTLE) is target

        await catches_up_once_freed(cluster, node0, target, acked, scrape)


async def test_a_follower_whose_disk_fills_lags_behind_serving_what_it_has_then_catches_up(
    pki: PkiFiles, tmp_path: Path, private_mounts: None
) -> None:
    cluster = Cluster(pki, tmp_path)
    scrape = serve_metrics(cluster, pki)
    node2 = cluster.nodes[2]
    on_small_disk(node2)
    async with cluster:
        leader = await cluster.leader_among(cluster.nodes, timeout=SETTLE)
        assert leader is not node2
        assert_small_disk(node2)
        (other,) = [n for n in cluster.others(leader) if n is not node2]

        # Writes go on (a quorum without node-2) while node-2 stops taking them: its next
        # offset stays put for STALL_BATCHES batches and at least STALL_SECONDS.
        acked: list[bytes] = []
        held, since, unchanged = -1, time.monotonic(), 0
        for _ in range(MAX_BATCHES):
            assert await leader.produce_batch(batch_at(len(acked))) == len(acked)
            acked += batch_at(len(acked))
            now_held = await next_offset(node2)
            if now_held != held:
                held, since, unchanged = now_held, time.monotonic(), 0
                continue
            unchanged += 1
            if unchanged >= STALL_BATCHES and time.monotonic() - since >= STALL_SECONDS:
                break
        else:
            raise AssertionError(f"{node2.name} took all {len(acked)} records")
        assert held * RECORD >= 2 * MIB, f"{node2.name} stopped at {held} records"
        assert len(acked) - held >= STALL_BATCHES * BATCH
        _, free = disk_free(node2)
        assert RESERVE - OVERSHOOT <= free < RESERVE, free

        # Still up, serving the records it has: the leader's, up to where it stopped.
        assert await node2.next_offset() == held
        assert await node2.consume_all() == acked[:held]
        assert_no_storage_failure(node2)
        assert "disk below its reserve" in node2.log_path.read_text()
        samples = await scrape(node2)
        assert one(samples, "dcl_disk_low") == 1
        # (Its replication refusals may be none: once its heartbeat answers say its disk is
        # low, the leader sends it no records to drop.)
        assert one(samples, "dcl_disk_refusals_total", kind="appends") == 0
        on_leader = await scrape(leader)
        assert one(on_leader, "dcl_raft_peer_lag_entries", peer=node2.name, voter="true") > 0
        await assert_serves_exactly([leader, other], acked)
        assert await cluster.leader_among(cluster.nodes, timeout=SETTLE) is leader

        await catches_up_once_freed(cluster, node2, leader, acked, scrape)


async def test_a_produce_stream_appends_nothing_after_a_request_refused_for_the_disk(
    pki: PkiFiles, authorizer: Authorizer, tmp_path: Path
) -> None:
    """In-process: a real TLS gRPC server over a one-node Raft leader whose fsync is delayed
    (injected, 0.3 s). r1 is in flight when the disk drops below the reserve, r2 is refused
    at once, and space is back when r3 arrives: the stream must end on r2 with r1 acked and
    nothing after it appended (r3 landing after a refused r2 would reorder the stream, and a
    client resending r2 and r3 would duplicate r3)."""
    disk = Disk()
    async with leader(tmp_path, disk=disk.space, async_fsync=False) as driver:
        fsm = cast(LogFsm, driver._fsm)
        backend = ReplicatedBackend(driver, fsm, "127.0.0.1:1")
        await until_applied(driver)
        storage = driver._storage
        real_sync = storage.sync

        def delayed_sync() -> None:
            time.sleep(0.3)
            real_sync()

        storage.sync = delayed_sync  # type: ignore[method-assign]
        server = build_server(
            backend, ssl_context=server_context(pki.server_cert, pki.server_key, pki.ca_cert),
            authorizer=authorizer)
        await server.start()
        channel = Channel("127.0.0.1", server.port, ssl=client_context(
            pki.root_client_cert, pki.root_client_key, pki.ca_cert))
        acks: list[int] = []
        try:
            stub = log_grpc.LogStub(channel)
            with pytest.raises(GRPCError) as info:
                async with stub.ProduceStream.open(timeout=CALL_TIMEOUT) as stream:
                    await stream.send_message(produce_request(b"r1"))
                    await asyncio.sleep(0.05)  # r1 is waiting for its fsync
                    disk.free = RESERVE_UNIT - 1
                    await stream.send_message(produce_request(b"r2"))
                    await asyncio.sleep(0.05)  # r2 refused; the disk is fine again for r3
                    disk.free = 1 << 40
                    await stream.send_message(produce_request(b"r3"), end=True)
                    while (ack := await stream.recv_message()) is not None:
                        acks.append(ack.offset)
            assert info.value.status is Status.RESOURCE_EXHAUSTED, info.value
            assert acks == [0]
            await asyncio.sleep(0.5)  # anything proposed after r1 would have landed by now
            assert fsm.log.next_offset == 1
            assert record_value(fsm, 0) == b"r1"
        finally:
            storage.sync = real_sync  # type: ignore[method-assign]
            channel.close()
            await server.close()


async def test_writes_stop_when_a_quorum_lacks_disk_and_resume_when_one_has_room(
    pki: PkiFiles, tmp_path: Path, private_mounts: None
) -> None:
    """Both followers on small disks, the leader's with room. Once a quorum of voters lacks
    room, the leader refuses writes naming them (their heartbeat answers say so), instead of
    taking writes no quorum can commit, which would time out with their outcome unknown.
    The one batch in flight as the second follower filled has that fate (it commits once a
    follower has room again); every later one is refused. Freeing one follower's disk
    restores a quorum; freeing the other's lets it catch up."""
    cluster = Cluster(pki, tmp_path)
    node0, node1, node2 = cluster.nodes
    on_small_disk(node1)
    on_small_disk(node2)
    async with cluster:
        assert await cluster.leader_among(cluster.nodes, timeout=SETTLE) is node0
        acked: list[bytes] = []
        unknown: list[bytes] = []
        refused: GRPCError | None = None
        for _ in range(MAX_BATCHES):
            values = batch_at(len(acked) + len(unknown))
            try:
                first = await node0.produce_batch(values)
            except GRPCError as exc:
                if exc.status is Status.RESOURCE_EXHAUSTED:
                    refused = exc
                    break
                assert exc.status in (Status.DEADLINE_EXCEEDED, Status.UNAVAILABLE), exc
                assert not unknown, f"a second write with its outcome unknown: {exc}"
                unknown = values
                continue
            except TimeoutError:  # our deadline
                assert not unknown, "a second write with its outcome unknown"
                unknown = values
                continue
            assert not unknown, "a write was taken after one no quorum could commit"
            assert first == len(acked)
            acked += values
        assert refused is not None, f"{len(acked) * RECORD} bytes taken, none refused"
        assert re.match(r"insufficient storage: nodes node-1, node-2 have no room on disk ",
                        refused.message or ""), refused.message
        tls = (pki.root_client_cert, pki.root_client_key, pki.ca_cert)
        async with DclClient([node0.rpc_addr], tls, retries=1) as client:
            with pytest.raises(InsufficientStorage) as info:
                await client.produce(b"refused")
            assert info.value.node == "node-1, node-2"
        for method in ("Produce", "ProduceStream"):
            error = await refusal(node0, method)
            assert error.status is Status.RESOURCE_EXHAUSTED, error
            assert "nodes node-1, node-2 have no room on disk" in (error.message or "")
        await assert_serves_exactly([node0], acked)
        for node in (node1, node2):
            assert_no_storage_failure(node)
            held = await node.consume_all()
            assert held == (acked + unknown)[:len(held)], f"{node.name} diverged"
            assert len(held) >= len(acked) - BATCH, f"{node.name} held {len(held)}"
        assert await cluster.leader_among(cluster.nodes, timeout=SETTLE) is node0

        # One follower with room again: a quorum; the batch in flight commits, writes resume.
        free_space(node1)
        acked += unknown
        # node-1 catches up, which commits the batch in flight (the leader had it logged).
        await assert_serves_exactly([node0, node1], acked)

        async def accepted() -> int | None:  # once node-1's heartbeat answers say it has room
            try:
                return await node0.produce_batch(batch_at(len(acked))) + 1
            except GRPCError as exc:  # only a refusal (nothing appended) is tried again
                if exc.status is Status.RESOURCE_EXHAUSTED:
                    return None
                raise

        first = await eventually(accepted, timeout=10, what="a write with a quorum again")
        assert first - 1 == len(acked), "the refused writes were appended"
        acked += batch_at(len(acked))
        await assert_serves_exactly([node0, node1], acked)
        free_space(node2)
        await assert_serves_exactly(cluster.nodes, acked)
        for node in cluster.nodes:
            assert_no_storage_failure(node)
