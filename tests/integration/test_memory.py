"""A node's memory must not grow with the size of its log.

Snapshots hold the whole commit log (the snapshot format streams every record). The node
keeps its latest snapshot for followers that fall behind; held as bytes it would pin a copy
of the whole log on the heap for good. It is built in and held as a mapping of a file
instead, and the Raft log the core keeps in memory is capped (`--snapshot-log-bytes`).

Measured as anonymous resident memory (the heap): pages of a mapped file are page cache,
which the kernel reclaims under pressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

import pytest
from h2.exceptions import StreamClosedError

from dcl.api.dcl.v1 import batch_grpc, batch_pb2
from dcl.api.log.v1 import log_grpc, log_pb2
from dcl.server.certs import PkiFiles
from tests.integration.cluster_harness import Cluster, NodeProcess

pytestmark = pytest.mark.timeout(90)

MIB = 1 << 20


def rss_bytes(node: NodeProcess) -> int:
    assert node.proc is not None
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon line")


async def settled_rss(node: NodeProcess) -> int:
    """The least resident size over 2 s: what stays, not a moment's working buffers."""
    samples = []
    for _ in range(20):
        samples.append(rss_bytes(node))
        await asyncio.sleep(0.1)
    return min(samples)


async def test_resident_memory_stays_flat_while_the_log_grows_past_many_snapshots(
    pki: PkiFiles, tmp_path: Path
) -> None:
    cluster = Cluster(pki, tmp_path, size=1, snapshot_threshold=20)
    cluster.nodes[0].extra_args += ["--snapshot-log-bytes", str(16 * MIB)]
    async with cluster:
        node = cluster.nodes[0]
        values = [os.urandom(1024)] * 512  # one 512 KiB entry per call
        sem = asyncio.Semaphore(4)

        async def write(calls: int) -> None:
            async def one() -> None:
                async with sem:
                    await node.produce_batch(values)

            await asyncio.gather(*(one() for _ in range(calls)))

        await write(40)  # warm up: the first snapshots, buffers, allocator pools
        before = await settled_rss(node)
        await write(400)  # 200 MiB more: a dozen more snapshots, the last of ~220 MiB
        after = await settled_rss(node)
        assert await node.next_offset() == 440 * 512
    growth = after - before
    # Holding the latest snapshot on the heap costs at least the whole log (~220 MiB).
    assert growth < 64 * MIB, f"resident memory grew by {growth / MIB:.0f} MiB"


async def test_consumers_that_stop_reading_hold_little_of_the_nodes_memory(
    pki: PkiFiles, tmp_path: Path
) -> None:
    """Readers that stop reading (a hung or paused client): flow control stops the node
    from sending them more; it must not keep what it would send next in memory, and it
    must go on serving everyone else. Three kinds, measured one after another on a 20 MiB
    log of 1 KiB records and 8 records of 1 MB:

    - 40 streams, each on its own connection, read one message from the start. Before,
      each held about 7.6 MiB: its next batch read, encoded and framed while it waited for
      the window (4.6 MiB without that), and the TLS layer's buffer grown to the whole
      4 MiB window written at once, kept for the connection's life (3.8 without that).
      Now about 0.7 MiB: the TLS read and write buffers (256 KiB each) and bookkeeping.
    - 2 connections with 100 unary ConsumeBatch calls (3 MiB each) left unread: before,
      417 MiB for the two; now about 3 MiB (the calls wait for room before reading).
    - 1 connection with 100 unary Consume calls of the 1 MB records left unread: before,
      421 MiB; now about 5 MiB.

    And readers that did read: 40 connections that each took one 3 MiB batch and stay
    open held 148 MiB (TLS keeps a buffer of the largest write for the connection's life);
    now about 25 MiB.
    """
    cluster = Cluster(pki, tmp_path, size=1)
    async with cluster:
        node = cluster.nodes[0]
        values = [os.urandom(1024)] * 512
        for _ in range(40):
            await node.produce_batch(values)
        large = 40 * 512
        for i in range(8):
            assert await node.produce(os.urandom(1_000_000)) == large + i
        async with contextlib.AsyncExitStack() as stack:
            unread: list[Any] = []

            async def leave_unread(call: Any, request: Any, first: bool) -> None:
                stream = await stack.enter_async_context(call)
                await stream.send_message(request, end=True)
                if first:
                    assert await stream.recv_message() is not None
                unread.append(stream)

            before = await settled_rss(node)
            for i in range(40):
                channel = stack.enter_context(node.channel())
                if i % 2:
                    await leave_unread(log_grpc.LogStub(channel).ConsumeStream.open(),
                                       log_pb2.ConsumeRequest(offset=0), True)
                else:
                    await leave_unread(batch_grpc.BatchStub(channel).ConsumeBatchStream.open(),
                                       batch_pb2.ConsumeBatchRequest(offset=0, max_bytes=3 * MIB),
                                       True)
            streams = await settled_rss(node)
            for _ in range(2):
                batch = batch_grpc.BatchStub(stack.enter_context(node.channel()))
                for i in range(100):
                    await leave_unread(batch.ConsumeBatch.open(), batch_pb2.ConsumeBatchRequest(
                        offset=i * 200, max_bytes=3 * MIB), False)
            batches = await settled_rss(node)
            log = log_grpc.LogStub(stack.enter_context(node.channel()))
            for i in range(100):
                await leave_unread(log.Consume.open(),
                                   log_pb2.ConsumeRequest(offset=large + i % 8), False)
            singles = await settled_rss(node)
            # And readers that did read, and stay connected.
            for _ in range(40):
                reader = batch_grpc.BatchStub(stack.enter_context(node.channel()))
                page = await reader.ConsumeBatch(
                    batch_pb2.ConsumeBatchRequest(offset=0, max_records=16384, max_bytes=3 * MIB))
                assert page is not None and len(page.records) > 2000
            idle = await settled_rss(node)
            # Everyone else is still served: a write is acked, a new reader gets the tail.
            offset = await node.produce(b"after the stall")
            assert offset == large + 8
            assert await node.consume(offset) == b"after the stall"
            for stream in unread:
                with contextlib.suppress(StreamClosedError):  # the calls answered in full
                    await stream.cancel()
    growth = [(streams - before) / MIB, (batches - streams) / MIB, (singles - batches) / MIB,
              (idle - singles) / MIB]
    assert growth[0] < 40 * 2, f"40 stalled streams hold {growth[0]:.0f} MiB"
    assert growth[1] < 2 * 16, f"200 unread ConsumeBatch calls hold {growth[1]:.0f} MiB"
    assert growth[2] < 16, f"100 unread Consume calls hold {growth[2]:.0f} MiB"
    assert growth[3] < 40, f"40 idle connections after a large read hold {growth[3]:.0f} MiB"
