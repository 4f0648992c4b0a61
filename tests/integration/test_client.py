"""dcl.client against real grpclib servers over real mutual TLS on 127.0.0.1.

Where a test needs a node that is not the leader, or one whose acks never arrive, it runs a
real server over a small Backend wrapper (our own seam) around a real LocalBackend.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import aclosing, asynccontextmanager
from pathlib import Path

import pytest
from grpclib.events import RecvRequest, listen

from dcl.client import DclClient, ProduceOutcomeUnknown, SyncClient
from dcl.errors import InvalidRequest, NotLeader, OffsetOutOfRange, PermissionDenied, Unavailable
from dcl.server.acl import Authorizer
from dcl.server.backend import Backend, ServerInfo
from dcl.server.certs import PkiFiles
from dcl.server.local import LocalBackend
from dcl.server.records import encode_record
from dcl.server.server import DclServer, build_server
from dcl.tls import server_context
from tests.integration.conftest import LOG_CONFIG, Node, eventually

pytestmark = pytest.mark.timeout(20)

Tls = tuple[Path, Path, Path]


def root_tls(pki: PkiFiles) -> Tls:
    return pki.root_client_cert, pki.root_client_key, pki.ca_cert


def nobody_tls(pki: PkiFiles) -> Tls:
    return pki.nobody_client_cert, pki.nobody_client_key, pki.ca_cert


def dead_address() -> str:
    """A 127.0.0.1 port nothing listens on (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


class Delegating:
    """A Backend that forwards everything to a LocalBackend; subclasses change one thing."""

    def __init__(self, inner: LocalBackend):
        self.inner = inner

    def append(self, values: Sequence[bytes]) -> Awaitable[int]:
        return self.inner.append(values)

    def read(self, offset: int) -> bytes:
        return self.inner.read(offset)

    def read_batch(self, offset: int, max_records: int, max_bytes: int) -> list[bytes]:
        return self.inner.read_batch(offset, max_records, max_bytes)

    @property
    def lowest_offset(self) -> int:
        return self.inner.lowest_offset

    @property
    def next_offset(self) -> int:
        return self.inner.next_offset

    async def wait_for(self, offset: int) -> None:
        await self.inner.wait_for(offset)

    def servers(self) -> list[ServerInfo]:
        return self.inner.servers()

    @property
    def has_leader(self) -> bool:
        return self.inner.has_leader


class Follower(Delegating):
    """Serves the leader's records but refuses appends with NotLeader(leader's address).

    With ``claims_leadership`` its GetServers wrongly names itself leader (a stale view), so
    a client sends produce here first and must follow the redirect.
    """

    def __init__(self, leader: LocalBackend, *, claims_leadership: bool):
        super().__init__(leader)
        self.claims_leadership = claims_leadership
        self.rpc_addr = ""

    def append(self, values: Sequence[bytes]) -> Awaitable[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        future.set_exception(NotLeader("leader", self.inner.rpc_addr))
        return future

    def servers(self) -> list[ServerInfo]:
        if self.claims_leadership:
            return [ServerInfo("follower", self.rpc_addr, True)]
        return [
            ServerInfo("leader", self.inner.rpc_addr, True),
            ServerInfo("follower", self.rpc_addr, False),
        ]


class AckNever(Delegating):
    """Appends for real (durably) but never acknowledges: the client's deadline passes."""

    def __init__(self, inner: LocalBackend):
        super().__init__(inner)
        self.never = asyncio.Event()

    def append(self, values: Sequence[bytes]) -> Awaitable[int]:
        appended = self.inner.append(values)

        async def ack_never() -> int:
            offset = await appended
            await self.never.wait()
            return offset

        return ack_never()


@asynccontextmanager
async def serving(
    backend: Backend, pki: PkiFiles, authorizer: Authorizer, port: int = 0
) -> AsyncIterator[tuple[DclServer, list[str]]]:
    """A real server over backend; yields it and the RPC methods it received, in order."""
    server = build_server(
        backend,
        ssl_context=server_context(pki.server_cert, pki.server_key, pki.ca_cert),
        authorizer=authorizer,
        port=port,
    )
    seen: list[str] = []

    async def record(event: RecvRequest) -> None:
        seen.append(event.method_name)

    listen(server.grpc, RecvRequest, record)
    await server.start()
    try:
        yield server, seen
    finally:
        await server.close()


@asynccontextmanager
async def local_backend(directory: Path) -> AsyncIterator[LocalBackend]:
    backend = LocalBackend.open(directory, LOG_CONFIG, server_id="node-x")
    try:
        yield backend
    finally:
        await backend.close()


async def test_produce_then_consume_round_trips_through_the_leader(
    node: Node, pki: PkiFiles
) -> None:
    async with DclClient([node.server.address], root_tls(pki)) as client:
        first = await client.produce(b"hello")
        second = await client.produce(b"world")
        assert (first, second) == (0, 1)
        assert await client.consume(1) == b"world"
        servers = await client.get_servers()
    assert [(s.rpc_addr, s.is_leader) for s in servers] == [(node.server.address, True)]


async def test_produce_batch_gives_dense_offsets_across_chunks(node: Node, pki: PkiFiles) -> None:
    values = [bytes([i % 256]) * 2048 for i in range(100)]
    async with DclClient([node.server.address], root_tls(pki), max_chunk_bytes=64 * 1024) as client:
        await client.produce(b"before")
        first = await client.produce_batch(values)
        got: list[tuple[int, bytes]] = []
        offset = first
        while len(got) < len(values):
            records, offset = await client.consume_batch(offset, max_records=37)
            got.extend(records)
    assert first == 1
    assert [o for o, _ in got] == list(range(1, 101))
    assert [v for _, v in got] == values
    assert node.requests_seen.count("/dcl.v1.Batch/ProduceBatch") == 4  # 31 values per chunk


async def test_consume_past_the_end_raises_offset_out_of_range(node: Node, pki: PkiFiles) -> None:
    async with DclClient([node.server.address], root_tls(pki)) as client:
        await client.produce(b"only")
        with pytest.raises(OffsetOutOfRange) as info:
            await client.consume(5)
        assert info.value.offset == 5
        with pytest.raises(OffsetOutOfRange):
            await client.consume_batch(5)
        assert await client.consume_batch(1) == ([], 1)  # the tail itself is empty, not an error
    # Not transient: asked once, not retried.
    assert node.requests_seen.count("/log.v1.Log/Consume") == 1


async def test_a_rejected_produce_raises_invalid_request_and_is_not_retried(
    node: Node, pki: PkiFiles
) -> None:
    async with DclClient([node.server.address], root_tls(pki)) as client:
        with pytest.raises(InvalidRequest):
            await client.produce(b"x" * ((1 << 20) + 1))  # over the server's record limit
        with pytest.raises(InvalidRequest):
            await client.produce_batch([])
    assert node.requests_seen.count("/log.v1.Log/Produce") == 1
    assert node.backend.next_offset == 0


async def test_a_certificate_without_rights_gets_permission_denied(
    node: Node, pki: PkiFiles
) -> None:
    client = DclClient([node.server.address], nobody_tls(pki), retries=3)
    with pytest.raises(PermissionDenied):
        await client.connect()
    await client.close()
    assert node.requests_seen == ["/log.v1.Log/GetServers"]


async def test_stream_follows_the_tail(node: Node, pki: PkiFiles) -> None:
    async with DclClient([node.server.address], root_tls(pki)) as client:
        await client.produce_batch([b"a", b"b", b"c"])
        received: list[tuple[int, bytes]] = []

        async def follow() -> None:
            async with aclosing(client.stream(1)) as records:
                async for record in records:
                    received.append(record)

        follower = asyncio.create_task(follow())
        try:
            await eventually(lambda: len(received) == 2)
            await client.produce(b"d")
            await client.produce_batch([b"e", b"f"])
            await eventually(lambda: len(received) == 5)
        finally:
            follower.cancel()
            with pytest.raises(asyncio.CancelledError):
                await follower
    assert received == [(1, b"b"), (2, b"c"), (3, b"d"), (4, b"e"), (5, b"f")]
    await eventually(lambda: node.server.active_calls == 0)


async def test_produce_sent_to_a_follower_is_redirected_to_the_named_leader(
    node: Node, pki: PkiFiles, authorizer: Authorizer
) -> None:
    follower = Follower(node.backend, claims_leadership=True)
    async with serving(follower, pki, authorizer) as (server, seen):
        follower.rpc_addr = server.address
        async with DclClient([server.address], root_tls(pki)) as client:
            assert client.leader == server.address  # the stale view
            assert await client.produce(b"x") == 0
            assert await client.produce_batch([b"y", b"z"]) == 1
            assert client.leader == node.server.address
    assert seen.count("/log.v1.Log/Produce") == 1  # once, then straight to the leader
    assert "/dcl.v1.Batch/ProduceBatch" not in seen
    assert node.backend.next_offset == 3


async def test_reads_go_to_followers_and_writes_to_the_leader(
    node: Node, pki: PkiFiles, authorizer: Authorizer
) -> None:
    follower = Follower(node.backend, claims_leadership=False)
    async with serving(follower, pki, authorizer) as (server, seen):
        follower.rpc_addr = server.address
        # Seeded with the follower, whose GetServers names both nodes.
        async with DclClient([server.address], root_tls(pki)) as client:
            assert await client.produce_batch([b"a", b"b"]) == 0
            assert await client.consume(1) == b"b"
            assert await client.consume_batch(0) == ([(0, b"a"), (1, b"b")], 2)
    assert node.requests_seen == ["/dcl.v1.Batch/ProduceBatch"]
    assert seen.count("/log.v1.Log/Consume") == 1
    assert seen.count("/dcl.v1.Batch/ConsumeBatch") == 1
    assert "/dcl.v1.Batch/ProduceBatch" not in seen


async def test_a_dead_first_seed_is_skipped(node: Node, pki: PkiFiles) -> None:
    async with DclClient([dead_address(), node.server.address], root_tls(pki)) as client:
        assert await client.produce(b"v") == 0
        assert await client.consume(0) == b"v"


async def test_no_seed_answering_raises_unavailable(pki: PkiFiles) -> None:
    client = DclClient([dead_address(), dead_address()], root_tls(pki))
    with pytest.raises(Unavailable):
        await client.connect()
    await client.close()


async def test_produce_whose_ack_is_lost_raises_outcome_unknown_and_is_not_retried(
    pki: PkiFiles, authorizer: Authorizer, tmp_path: Path
) -> None:
    async with local_backend(tmp_path / "log") as inner:
        async with serving(AckNever(inner), pki, authorizer) as (server, seen):
            inner.rpc_addr = address = server.address
            async with DclClient([address], root_tls(pki), timeout=0.5) as client:
                with pytest.raises(ProduceOutcomeUnknown) as info:
                    await client.produce(b"once")
                with pytest.raises(ProduceOutcomeUnknown):
                    await client.produce_batch([b"twice", b"thrice"])
        assert info.value.address == address
        # The records were appended exactly once each: no retry duplicated them.
        assert seen.count("/log.v1.Log/Produce") == 1
        assert seen.count("/dcl.v1.Batch/ProduceBatch") == 1
        assert inner.next_offset == 3
        assert [inner.read(o) for o in range(3)] == [
            encode_record(b"once", 0),
            encode_record(b"twice", 1),
            encode_record(b"thrice", 2),
        ]


async def test_produce_to_a_dead_leader_is_retried_then_unavailable_without_appending(
    pki: PkiFiles, authorizer: Authorizer, tmp_path: Path
) -> None:
    leader_address = dead_address()
    async with local_backend(tmp_path / "log") as backend:
        backend.rpc_addr = leader_address
        follower = Follower(backend, claims_leadership=False)
        async with serving(follower, pki, authorizer) as (server, _):
            follower.rpc_addr = server.address
            async with DclClient(
                [server.address], root_tls(pki), retries=3, backoff_base=0.01
            ) as client:
                assert client.leader == leader_address
                # Every attempt is refused before anything is sent: safe to retry, then give up.
                with pytest.raises(Unavailable) as info:
                    await client.produce(b"refused")
                assert not isinstance(info.value, ProduceOutcomeUnknown)
                assert backend.next_offset == 0

                # The leader comes up on its address: the next produce appends exactly once.
                port = int(leader_address.rsplit(":", 1)[1])
                async with serving(backend, pki, authorizer, port=port) as (_, leader_seen):
                    assert await client.produce(b"accepted") == 0
                    assert await client.consume(0) == b"accepted"
                assert leader_seen.count("/log.v1.Log/Produce") == 1
        assert backend.next_offset == 1


async def test_stream_resumes_after_its_server_restarts_without_gaps_or_duplicates(
    pki: PkiFiles, authorizer: Authorizer, tmp_path: Path
) -> None:
    async with local_backend(tmp_path / "log") as backend:
        received: list[tuple[int, bytes]] = []
        async with serving(backend, pki, authorizer) as (server, _):
            backend.rpc_addr = address = server.address
            client = DclClient(
                [address], root_tls(pki), retries=50, backoff_base=0.01, backoff_max=0.05
            )
            await client.connect()
            await client.produce_batch([b"a", b"b"])

            async def follow() -> None:
                async with aclosing(client.stream(0)) as records:
                    async for record in records:
                        received.append(record)

            follower = asyncio.create_task(follow())
            await eventually(lambda: len(received) == 2)
        # The server ended the stream with UNAVAILABLE; a new one comes up on the same port.
        port = int(address.rsplit(":", 1)[1])
        try:
            async with serving(backend, pki, authorizer, port=port):
                await backend.append([b"c", b"d"])
                await eventually(lambda: len(received) == 4)
        finally:
            follower.cancel()
            with pytest.raises(asyncio.CancelledError):
                await follower
            await client.close()
        assert received == [(0, b"a"), (1, b"b"), (2, b"c"), (3, b"d")]


async def test_sync_client_round_trips(node: Node, pki: PkiFiles) -> None:
    address = node.server.address

    def script() -> tuple[int, bytes, list[tuple[int, bytes]]]:
        with SyncClient([address], root_tls(pki)) as client:
            first = client.produce_batch([b"p", b"q", b"r"])
            value = client.consume(first + 1)
            records = client.stream(first)
            taken = [next(records) for _ in range(3)]
            records.close()
            return first, value, taken

    first, value, taken = await asyncio.to_thread(script)
    assert (first, value) == (0, b"q")
    assert taken == [(0, b"p"), (1, b"q"), (2, b"r")]
    await eventually(lambda: node.server.active_calls == 0)
