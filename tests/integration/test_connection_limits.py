"""A flood of connections that send nothing, on a real node with few descriptors.

Every accepted connection holds a file descriptor before TLS or any byte. Without a cap,
a host that can reach the RPC port (no certificate needed) used them all up, and the node
then failed to open its own files and stopped ("raft driver failed: Too many open
files"). What an operator checks: the node stays up, goes on serving the connections it
had and writing records, a new client still gets in, and silent connections are shed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import pytest
from grpclib.client import Channel

from dcl.api.dcl.v1 import batch_grpc, batch_pb2
from dcl.server.acl import Authorizer
from dcl.server.certs import PkiFiles
from dcl.server.local import LocalBackend
from dcl.server.server import build_server
from dcl.tls import client_context, server_context
from tests.integration.cluster_harness import NodeProcess, eventually, node_port
from tests.integration.conftest import LOG_CONFIG
from tests.integration.test_metrics_endpoint import one, request, scraper_context, values

pytestmark = pytest.mark.timeout(90)

FLOOD = 300  # more than the node's 256 descriptors


async def test_a_flood_of_silent_connections_is_capped_and_the_node_keeps_writing(
    pki: PkiFiles, tmp_path: Path,
) -> None:
    metrics_port = node_port()
    node = NodeProcess("flooded", node_port(), tmp_path / "node", pki, open_files=256)
    node.extra_args += ["--max-connections", "64", "--segment-bytes", "65536",
                        "--metrics-port", str(metrics_port)]
    node.start(bootstrap=True, join=[], snapshot_threshold=100_000)
    flood: list[socket.socket] = []
    channels: list[Channel] = []

    async def produce(count: int, fresh: bool = False) -> int:
        """Through the first channel, or a new one (a client that connects now)."""
        if fresh or not channels:
            channels.append(Channel("127.0.0.1", node.port, ssl=client_context(
                pki.root_client_cert, pki.root_client_key, pki.ca_cert)))
        reply = await batch_grpc.BatchStub(channels[-1 if fresh else 0]).ProduceBatch(
            batch_pb2.ProduceBatchRequest(values=[b"x" * 1000] * count), timeout=10)
        assert reply is not None
        return int(reply.first_offset)

    async def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        root = scraper_context(pki.root_client_cert, pki.root_client_key, pki.ca_cert)
        reply = await request(metrics_port, root)
        assert reply.status == 200
        return values(reply.body)

    try:
        async def ready() -> bool:
            with contextlib.suppress(Exception):
                return await produce(1) >= 0
            return False

        await eventually(ready, timeout=30, what="the node takes writes")
        start = await produce(1)
        for _ in range(FLOOD):  # connect and send nothing
            flood.append(socket.create_connection(("127.0.0.1", node.port), timeout=5))

        # The connection opened before goes on, and 300 KB of records roll segments.
        for _ in range(30):
            await produce(10)
        # A client that connects in the middle of the flood gets in: its connection takes
        # the place of the oldest silent one.
        assert await produce(1, fresh=True) == start + 301
        samples = await scrape()
        assert one(samples, "dcl_rpc_connections_max") == 64
        assert one(samples, "dcl_rpc_connections") <= 64
        # 63 silent ones fit beside our first connection; every later one, and our new
        # client, cut the oldest silent one (none was refused: none was established).
        assert one(samples, "dcl_rpc_connections_shed_total", reason="evicted") >= FLOOD - 63
        assert one(samples, "dcl_rpc_connections_shed_total", reason="total") == 0

        loop = asyncio.get_running_loop()

        def cut(sock: socket.socket) -> bool:
            try:
                return sock.recv(1) == b""
            except ConnectionError:
                return True

        oldest = flood[: FLOOD - 64]
        assert all(await asyncio.gather(*(loop.run_in_executor(None, cut, s) for s in oldest)))
        for sock in flood:
            sock.close()

        async def drained() -> bool:
            return one(await scrape(), "dcl_rpc_connections") <= 2  # our two clients

        await eventually(drained, timeout=10, what="the flood's connections are gone")
        assert node.running
        assert await produce(1) == start + 302  # nothing lost, nothing twice
    finally:
        for sock in flood:
            sock.close()
        for channel in channels:
            channel.close()
        node.stop()


async def test_a_connection_that_does_not_finish_its_handshake_in_time_is_closed(
    pki: PkiFiles, tmp_path: Path,
) -> None:
    """asyncio's own handshake timeout is 60 s: a silent connection held a descriptor (and
    a 256 KiB buffer) that long."""
    backend = LocalBackend.open(tmp_path / "log", LOG_CONFIG, server_id="n1")
    server = build_server(
        backend, ssl_context=server_context(pki.server_cert, pki.server_key, pki.ca_cert),
        authorizer=Authorizer(pki.acl_model, pki.acl_policy), handshake_timeout=0.5)
    await server.start()
    loop = asyncio.get_running_loop()
    try:
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        began = loop.time()
        try:
            closed = await loop.run_in_executor(None, silent.recv, 1)
        finally:
            silent.close()
        assert closed == b"" and loop.time() - began < 5
        assert server.connection_cap.open == 0
    finally:
        await server.close()
        await backend.close()
