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
import os
from pathlib import Path

import pytest

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
