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
    """40 consumers, each on its own connection, read one message from the start of a
    20 MiB log and then stop reading (a hung or paused client). Flow control stops the
    node from sending them more; it must not keep what it would send next in memory,
    and it must go on serving everyone else.

    Before, each held about 7.6 MiB: its next batch read, encoded and framed while it
    waited for the window (4.6 MiB without that), and the TLS layer's buffer grown to the
    whole 4 MiB window written at once, kept for the connection's life (3.8 without that).
    Now about 0.7 MiB: the TLS read and write buffers (256 KiB each) and bookkeeping.
    """
    cluster = Cluster(pki, tmp_path, size=1)
    async with cluster:
        node = cluster.nodes[0]
        values = [os.urandom(1024)] * 512
        for _ in range(40):
            await node.produce_batch(values)
        before = await settled_rss(node)
        async with contextlib.AsyncExitStack() as stack:
            stalled: list[Any] = []
            for i in range(40):
                channel = stack.enter_context(node.channel())
                if i % 2:
                    call: Any = log_grpc.LogStub(channel).ConsumeStream.open()
                    request: Any = log_pb2.ConsumeRequest(offset=0)
                else:
                    call = batch_grpc.BatchStub(channel).ConsumeBatchStream.open()
                    request = batch_pb2.ConsumeBatchRequest(offset=0, max_bytes=3 * MIB)
                stream = await stack.enter_async_context(call)
                await stream.send_message(request, end=True)
                assert await stream.recv_message() is not None
                stalled.append(stream)
            held = await settled_rss(node)
            # Everyone else is still served: a write is acked, a new reader gets the tail.
            offset = await node.produce(b"after the stall")
            assert offset == 40 * 512
            assert await node.consume(offset) == b"after the stall"
            for stream in stalled:
                await stream.cancel()
    growth = held - before
    assert growth < 40 * 2 * MIB, f"40 stalled consumers hold {growth / MIB:.0f} MiB"
