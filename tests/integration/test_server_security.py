"""Hostile and unauthorized callers: they are refused, and the server keeps serving."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

import pytest
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from dcl.api.dcl.v1 import admin_grpc, admin_pb2, batch_grpc, batch_pb2
from dcl.api.log.v1 import log_grpc, log_pb2
from dcl.errors import NotLeader, Unavailable
from dcl.server.acl import Authorizer
from dcl.server.backend import ServerInfo
from dcl.server.certs import PkiFiles, generate_pki, issue_client_certificate
from dcl.server.errors import LEADER_METADATA_KEY
from dcl.server.server import DclServer, build_server
from dcl.server.services import LogService
from dcl.tls import client_context, server_context
from tests.integration.conftest import Node, eventually, running_node

pytestmark = pytest.mark.timeout(20)

# Under TLS 1.3 the client finishes its side of the handshake before the server checks the
# client certificate, so the refusal can surface as a dropped connection rather than an
# SSLError; either way no request reaches a handler.
HANDSHAKE_FAILURES = (ConnectionError, ssl.SSLError, StreamTerminatedError)


def produce_request(value: bytes) -> log_pb2.ProduceRequest:
    return log_pb2.ProduceRequest(record=log_pb2.Record(value=value))


async def assert_still_serving(node: Node) -> None:
    stub = log_grpc.LogStub(node.channel())
    offset = (await stub.Produce(produce_request(b"still here"))).offset
    assert (await stub.Consume(log_pb2.ConsumeRequest(offset=offset))).record.value == b"still here"


async def test_unauthorized_subject_is_denied_produce_and_consume(node: Node) -> None:
    stub = log_grpc.LogStub(node.channel("nobody"))
    batch = batch_grpc.BatchStub(node.channel("nobody"))
    calls: list[Awaitable[Any]] = [
        stub.Produce(produce_request(b"nope")),
        stub.Consume(log_pb2.ConsumeRequest(offset=0)),
        stub.GetServers(log_pb2.GetServersRequest()),
        batch.ProduceBatch(batch_pb2.ProduceBatchRequest(values=[b"nope"])),
        batch.ConsumeBatch(batch_pb2.ConsumeBatchRequest(offset=0)),
    ]
    for call in calls:
        with pytest.raises(GRPCError) as info:
            await call
        assert info.value.status is Status.PERMISSION_DENIED
        assert "nobody" in (info.value.message or "")

    with pytest.raises(GRPCError) as info:
        async with stub.ConsumeStream.open() as stream:
            await stream.send_message(log_pb2.ConsumeRequest(offset=0), end=True)
            await stream.recv_message()
    assert info.value.status is Status.PERMISSION_DENIED
    assert node.backend.next_offset == 0


async def test_peer_certificate_may_forward_writes(node: Node) -> None:
    stub = log_grpc.LogStub(node.channel("peer"))
    assert (await stub.Produce(produce_request(b"forwarded"))).offset == 0


async def test_certificate_from_an_unknown_ca_fails_the_handshake(
    node: Node, foreign_pki: PkiFiles
) -> None:
    # Trusts our server (our CA) but presents a client certificate our CA never signed.
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(node.pki.ca_cert))
    ctx.load_cert_chain(foreign_pki.root_client_cert, foreign_pki.root_client_key)
    ctx.set_alpn_protocols(["h2"])
    stub = log_grpc.LogStub(Channel("127.0.0.1", node.server.port, ssl=ctx))
    with pytest.raises(HANDSHAKE_FAILURES):
        await asyncio.wait_for(stub.Produce(produce_request(b"intruder")), 5)
    stub.Produce.channel.close()
    assert node.requests_seen == []
    await assert_still_serving(node)


async def test_missing_client_certificate_fails_the_handshake(node: Node) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(node.pki.ca_cert))
    ctx.set_alpn_protocols(["h2"])
    channel = Channel("127.0.0.1", node.server.port, ssl=ctx)
    stub = log_grpc.LogStub(channel)
    with pytest.raises(HANDSHAKE_FAILURES):
        await asyncio.wait_for(stub.Produce(produce_request(b"anonymous")), 5)
    channel.close()
    assert node.requests_seen == []
    await assert_still_serving(node)


async def read_until_closed(reader: asyncio.StreamReader) -> None:
    """Drain until EOF; the server hanging up (or resetting) is the expected outcome."""
    try:
        while await asyncio.wait_for(reader.read(65536), 5):
            pass
    except (ConnectionError, ssl.SSLError):
        pass


async def test_raw_tcp_junk_is_dropped_and_server_keeps_serving(node: Node) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", node.server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 8)
    await writer.drain()
    await read_until_closed(reader)
    writer.close()
    assert node.requests_seen == []
    await assert_still_serving(node)


async def test_tls_client_speaking_junk_is_dropped_and_server_keeps_serving(node: Node) -> None:
    pki = node.pki
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_cert))
    ctx.load_cert_chain(pki.root_client_cert, pki.root_client_key)
    ctx.set_alpn_protocols(["h2"])
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", node.server.port, ssl=ctx, server_hostname="localhost"
    )
    writer.write(b"this is not an HTTP/2 connection preface\r\n\r\n" * 100)
    await writer.drain()
    await read_until_closed(reader)
    writer.close()
    assert node.requests_seen == []
    await assert_still_serving(node)


class RawCodec(ProtoCodec):
    """Sends bytes verbatim, to put malformed protobuf on the wire."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        if isinstance(message, bytes):
            return message
        return super().encode(message, message_type)


async def test_malformed_protobuf_is_invalid_argument_and_server_keeps_serving(
    node: Node,
) -> None:
    pki = node.pki
    ctx = client_context(pki.root_client_cert, pki.root_client_key, pki.ca_cert)
    channel = Channel("127.0.0.1", node.server.port, ssl=ctx, codec=RawCodec())
    produce = UnaryUnaryMethod(channel, "/log.v1.Log/Produce", bytes, log_pb2.ProduceResponse)
    try:
        with pytest.raises(GRPCError) as info:
            # Field 1, length-delimited, claiming 100 bytes but carrying 3.
            await produce(b"\x0a\x64abc")
        assert info.value.status is Status.INVALID_ARGUMENT
    finally:
        channel.close()
    assert node.backend.next_offset == 0
    await assert_still_serving(node)


async def test_client_vanishing_mid_consume_stream_does_not_hurt_the_server(node: Node) -> None:
    stub = log_grpc.LogStub(node.channel())
    await stub.Produce(produce_request(b"first"))

    doomed = node.channel()
    stream = log_grpc.LogStub(doomed).ConsumeStream.open()
    await stream.__aenter__()
    await stream.send_message(log_pb2.ConsumeRequest(offset=0), end=True)
    assert (await stream.recv_message()) is not None
    assert node.server.active_calls == 1
    doomed.close()  # drop the TCP connection with the stream open

    await eventually(lambda: node.server.active_calls == 0)
    await stub.Produce(produce_request(b"second"))
    await assert_still_serving(node)
    async with stub.ConsumeStream.open() as fresh:
        await fresh.send_message(log_pb2.ConsumeRequest(offset=1), end=True)
        msg = await fresh.recv_message()
        assert msg is not None and msg.record.value == b"second"
        await fresh.cancel()


class FollowerBackend:
    """The Backend seam as a follower sees it (Raft is not wired yet): writes are refused
    with the leader's address, reads fail with a bug (to prove INTERNAL mapping)."""

    def append(self, values: Sequence[bytes]) -> Awaitable[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        future.set_exception(NotLeader("node-1", "10.0.0.1:8400"))
        return future

    def read(self, offset: int) -> bytes:
        raise RuntimeError("simulated bug")

    def read_batch(self, offset: int, max_records: int, max_bytes: int) -> list[bytes]:
        raise RuntimeError("simulated bug")

    def __init__(self) -> None:
        self.lowest_offset = 0
        self.next_offset = 0
        self.has_leader = True

    async def wait_for(self, offset: int) -> None:
        await asyncio.Event().wait()

    def servers(self) -> list[ServerInfo]:
        return [ServerInfo("node-1", "10.0.0.1:8400", True)]


async def test_not_leader_is_failed_precondition_with_leader_in_trailers(
    pki: PkiFiles, authorizer: Authorizer, caplog: pytest.LogCaptureFixture
) -> None:
    server = DclServer(
        [LogService(FollowerBackend())],
        ssl_context=server_context(pki.server_cert, pki.server_key, pki.ca_cert),
        authorizer=authorizer,
    )
    async with server:
        ctx = client_context(pki.root_client_cert, pki.root_client_key, pki.ca_cert)
        channel = Channel("127.0.0.1", server.port, ssl=ctx)
        stub = log_grpc.LogStub(channel)
        try:
            with pytest.raises(GRPCError) as info:
                async with stub.Produce.open() as stream:
                    await stream.send_message(produce_request(b"x"), end=True)
                    await stream.recv_message()
            assert info.value.status is Status.FAILED_PRECONDITION
            assert stream.trailing_metadata is not None
            assert stream.trailing_metadata[LEADER_METADATA_KEY] == "10.0.0.1:8400"

            with (
                caplog.at_level(logging.ERROR, logger="dcl.server"),
                pytest.raises(GRPCError) as info,
            ):
                await stub.Consume(log_pb2.ConsumeRequest(offset=0))
            assert info.value.status is Status.INTERNAL
            assert "simulated bug" not in (info.value.message or "")
            assert any("simulated bug" in (r.exc_text or "") for r in caplog.records)

            servers = await stub.GetServers(log_pb2.GetServersRequest())
            assert servers.servers[0].rpc_addr == "10.0.0.1:8400"
        finally:
            channel.close()


class ClusterOnlyAdmin(admin_grpc.AdminBase):
    """A stand-in Admin service (the Raft layer owns the real one) to prove that extra
    handlers register easily and inherit the ``admin`` ACL action."""

    async def Join(self, stream: Any) -> None:
        raise Unavailable("not in this test")

    async def Leave(self, stream: Any) -> None:
        raise Unavailable("not in this test")

    async def Cluster(self, stream: Any) -> None:
        await stream.recv_message()
        await stream.send_message(admin_pb2.ClusterResponse(leader_id="node-1"))


async def test_extra_handlers_are_authorized_by_their_service_action(
    pki: PkiFiles, authorizer: Authorizer
) -> None:
    backend = FollowerBackend()
    backend.has_leader = False
    server = build_server(
        backend,
        ssl_context=server_context(pki.server_cert, pki.server_key, pki.ca_cert),
        authorizer=authorizer,
        extra_handlers=[ClusterOnlyAdmin()],
        health_check_ttl=0.01,
    )
    channels: list[Channel] = []

    def stub(cert: Path, key: Path) -> admin_grpc.AdminStub:
        channel = Channel(
            "127.0.0.1", server.port, ssl=client_context(cert, key, pki.ca_cert)
        )
        channels.append(channel)
        return admin_grpc.AdminStub(channel)

    async with server:
        try:
            for cert, key in [(pki.root_client_cert, pki.root_client_key),
                              (pki.peer_cert, pki.peer_key)]:
                reply = await stub(cert, key).Cluster(admin_pb2.ClusterRequest())
                assert reply.leader_id == "node-1"
            with pytest.raises(GRPCError) as info:
                await stub(pki.nobody_client_cert, pki.nobody_client_key).Cluster(
                    admin_pb2.ClusterRequest()
                )
            assert info.value.status is Status.PERMISSION_DENIED

            health = HealthStub(channels[0])
            reply_status = (await health.Check(HealthCheckRequest())).status
            assert reply_status == HealthCheckResponse.NOT_SERVING
            backend.has_leader = True

            async def serving() -> bool:
                status = (await health.Check(HealthCheckRequest())).status
                return bool(status == HealthCheckResponse.SERVING)

            deadline = asyncio.get_running_loop().time() + 5
            while not await serving():
                assert asyncio.get_running_loop().time() < deadline, "never became SERVING"
                await asyncio.sleep(0.02)
        finally:
            for channel in channels:
                channel.close()


async def test_issued_identities_get_exactly_the_rights_policy_grants(tmp_path: Path) -> None:
    """`dcl certs client` identities: a producer-only client can still discover the cluster
    (GetServers needs produce OR consume) and produce, but not consume; and vice versa."""
    pki = generate_pki(tmp_path / "pki")
    writer = issue_client_certificate(pki.directory, "writer")
    reader = issue_client_certificate(pki.directory, "reader")
    assert writer[0].name == "writer-client.pem" and reader[1].name == "reader-client-key.pem"
    with pytest.raises(FileExistsError):
        issue_client_certificate(pki.directory, "writer")
    with pytest.raises(ValueError, match="invalid client name"):
        issue_client_certificate(pki.directory, "../evil")
    policy = tmp_path / "policy.csv"
    policy.write_text("p, writer, *, produce\np, reader, *, consume\n")
    authorizer = Authorizer(pki.acl_model, policy)

    async with running_node(pki, authorizer, tmp_path / "log") as node:
        def stub(identity: tuple[Path, Path]) -> log_grpc.LogStub:
            ctx = client_context(identity[0], identity[1], pki.ca_cert)
            channel = Channel("127.0.0.1", node.server.port, ssl=ctx)
            node._channels.append(channel)
            return log_grpc.LogStub(channel)

        w, r = stub(writer), stub(reader)
        for client in (w, r):
            servers = (await client.GetServers(log_pb2.GetServersRequest())).servers
            assert [s.is_leader for s in servers] == [True]
        offset = (await w.Produce(produce_request(b"from writer"))).offset
        assert (await r.Consume(log_pb2.ConsumeRequest(offset=offset))).record.value == (
            b"from writer")
        for denied, who in ((w.Consume(log_pb2.ConsumeRequest(offset=offset)), "writer"),
                            (r.Produce(produce_request(b"from reader")), "reader")):
            with pytest.raises(GRPCError) as info:
                await denied
            assert info.value.status is Status.PERMISSION_DENIED
            assert who in (info.value.message or "")
        assert node.backend.next_offset == offset + 1
