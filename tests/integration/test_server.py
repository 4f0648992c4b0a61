"""log.v1 and dcl.v1.Batch over a real mutually authenticated grpclib server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

import pytest
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.config import Configuration
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from dcl.api.dcl.v1 import batch_grpc, batch_pb2
from dcl.api.log.v1 import log_grpc, log_pb2
from dcl.server.acl import Action, Authorizer
from dcl.server.certs import PkiFiles
from dcl.server.local import LocalBackend
from dcl.server.server import build_server
from dcl.server.services import Limits
from dcl.tls import client_context, server_context
from tests.integration.conftest import LOG_CONFIG, Node, NodeFactory, eventually

pytestmark = pytest.mark.timeout(20)


def produce_request(value: bytes) -> log_pb2.ProduceRequest:
    return log_pb2.ProduceRequest(record=log_pb2.Record(value=value))


async def test_produce_then_consume_returns_the_same_record(node: Node) -> None:
    stub = log_grpc.LogStub(node.channel())
    first = await stub.Produce(produce_request(b"hello"))
    second = await stub.Produce(produce_request(b"world"))
    assert (first.offset, second.offset) == (0, 1)

    got = await stub.Consume(log_pb2.ConsumeRequest(offset=1))
    assert got.record.value == b"world"
    assert got.record.offset == 1


async def test_consume_past_the_end_is_out_of_range_naming_the_offset(node: Node) -> None:
    stub = log_grpc.LogStub(node.channel())
    await stub.Produce(produce_request(b"only"))
    with pytest.raises(GRPCError) as info:
        await stub.Consume(log_pb2.ConsumeRequest(offset=7))
    assert info.value.status is Status.OUT_OF_RANGE
    assert "7" in (info.value.message or "")


async def test_produce_stream_acks_pipelined_requests_in_order(node: Node) -> None:
    stub = log_grpc.LogStub(node.channel())
    count = 500
    async with stub.ProduceStream.open() as stream:
        # Send everything before reading any ack: the server must pipeline, not lock-step.
        for i in range(count):
            await stream.send_message(produce_request(b"r%d" % i))
        await stream.end()
        acks = [ack.offset async for ack in stream]
    assert acks == list(range(count))
    got = await stub.Consume(log_pb2.ConsumeRequest(offset=count - 1))
    assert got.record.value == b"r%d" % (count - 1)


async def test_concurrent_produce_calls_get_distinct_offsets(node: Node) -> None:
    stub = log_grpc.LogStub(node.channel())
    results = await asyncio.gather(*(stub.Produce(produce_request(b"x")) for _ in range(200)))
    assert sorted(r.offset for r in results) == list(range(200))


async def test_consume_stream_follows_the_tail(node: Node) -> None:
    stub = log_grpc.LogStub(node.channel())
    await stub.Produce(produce_request(b"before"))
    async with stub.ConsumeStream.open() as stream:
        await stream.send_message(log_pb2.ConsumeRequest(offset=0), end=True)
        first = await stream.recv_message()
        assert first is not None
        assert (first.record.value, first.record.offset) == (b"before", 0)

        for i in range(3):
            await stub.Produce(produce_request(b"after%d" % i))
        for i in range(3):
            msg = await stream.recv_message()
            assert msg is not None
            assert (msg.record.value, msg.record.offset) == (b"after%d" % i, i + 1)
        await stream.cancel()


async def test_consume_stream_from_a_future_offset_waits_for_it(node: Node) -> None:
    stub = log_grpc.LogStub(node.channel())
    async with stub.ConsumeStream.open() as stream:
        await stream.send_message(log_pb2.ConsumeRequest(offset=2), end=True)
        receive = asyncio.ensure_future(stream.recv_message())
        await stub.Produce(produce_request(b"a"))
        await stub.Produce(produce_request(b"b"))
        assert not receive.done()
        await stub.Produce(produce_request(b"c"))
        msg = await receive
        assert msg is not None
        assert (msg.record.value, msg.record.offset) == (b"c", 2)
        await stream.cancel()


async def test_oversize_record_is_invalid_argument_and_not_appended(
    node_factory: NodeFactory,
) -> None:
    async with node_factory(limits=Limits(max_record_bytes=1024)) as node:
        stub = log_grpc.LogStub(node.channel())
        batch = batch_grpc.BatchStub(node.channel())
        with pytest.raises(GRPCError) as info:
            await stub.Produce(produce_request(b"x" * 1025))
        assert info.value.status is Status.INVALID_ARGUMENT
        with pytest.raises(GRPCError) as info:
            await batch.ProduceBatch(batch_pb2.ProduceBatchRequest(values=[b"ok", b"x" * 1025]))
        assert info.value.status is Status.INVALID_ARGUMENT
        assert node.backend.next_offset == 0

        ok = await stub.Produce(produce_request(b"x" * 1024))
        assert ok.offset == 0


async def test_message_far_above_the_limit_is_rejected_and_server_keeps_serving(
    node_factory: NodeFactory,
) -> None:
    async with node_factory(limits=Limits(max_record_bytes=1024)) as node:
        stub = log_grpc.LogStub(node.channel())
        with pytest.raises(GRPCError) as info:
            await stub.Produce(produce_request(b"x" * (256 * 1024)))
        assert info.value.status is Status.RESOURCE_EXHAUSTED
        assert (await stub.Produce(produce_request(b"fine"))).offset == 0


async def test_default_record_limit_is_one_mebibyte(node: Node) -> None:
    stub = log_grpc.LogStub(node.channel())
    with pytest.raises(GRPCError) as info:
        await stub.Produce(produce_request(b"x" * ((1 << 20) + 1)))
    assert info.value.status is Status.INVALID_ARGUMENT
    assert (await stub.Produce(produce_request(b"x" * (1 << 20)))).offset == 0


async def test_produce_stream_stops_at_a_bad_record_after_acking_earlier_ones(
    node_factory: NodeFactory,
) -> None:
    async with node_factory(limits=Limits(max_record_bytes=16)) as node:
        stub = log_grpc.LogStub(node.channel())
        acks: list[int] = []
        with pytest.raises(GRPCError) as info:
            async with stub.ProduceStream.open() as stream:
                await stream.send_message(produce_request(b"a"))
                await stream.send_message(produce_request(b"b"))
                for _ in range(2):
                    ack = await stream.recv_message()
                    assert ack is not None
                    acks.append(ack.offset)
                await stream.send_message(produce_request(b"x" * 17))
                await stream.send_message(produce_request(b"never appended"), end=True)
                assert await stream.recv_message() is None
        assert info.value.status is Status.INVALID_ARGUMENT
        assert acks == [0, 1]
        assert node.backend.next_offset == 2


async def test_empty_batch_is_invalid_argument(node: Node) -> None:
    batch = batch_grpc.BatchStub(node.channel())
    with pytest.raises(GRPCError) as info:
        await batch.ProduceBatch(batch_pb2.ProduceBatchRequest(values=[]))
    assert info.value.status is Status.INVALID_ARGUMENT


async def test_batch_produce_and_consume_round_trip(node: Node) -> None:
    batch = batch_grpc.BatchStub(node.channel())
    values = [b"v%d" % i for i in range(100)]
    reply = await batch.ProduceBatch(batch_pb2.ProduceBatchRequest(values=values))
    assert (reply.first_offset, reply.count) == (0, 100)

    page = await batch.ConsumeBatch(batch_pb2.ConsumeBatchRequest(offset=10, max_records=5))
    assert [r.value for r in page.records] == values[10:15]
    assert [r.offset for r in page.records] == list(range(10, 15))
    assert page.next_offset == 100

    small = await batch.ConsumeBatch(batch_pb2.ConsumeBatchRequest(offset=0, max_bytes=1))
    assert len(small.records) == 1, "at least one record even when it exceeds max_bytes"

    tail = await batch.ConsumeBatch(batch_pb2.ConsumeBatchRequest(offset=100))
    assert list(tail.records) == [] and tail.next_offset == 100
    with pytest.raises(GRPCError) as info:
        await batch.ConsumeBatch(batch_pb2.ConsumeBatchRequest(offset=101))
    assert info.value.status is Status.OUT_OF_RANGE


async def test_consume_batch_stream_follows_the_tail(node: Node) -> None:
    batch = batch_grpc.BatchStub(node.channel())
    await batch.ProduceBatch(batch_pb2.ProduceBatchRequest(values=[b"a", b"b"]))
    async with batch.ConsumeBatchStream.open() as stream:
        await stream.send_message(batch_pb2.ConsumeBatchRequest(offset=0), end=True)
        first = await stream.recv_message()
        assert first is not None
        assert [r.value for r in first.records] == [b"a", b"b"]
        await batch.ProduceBatch(batch_pb2.ProduceBatchRequest(values=[b"c", b"d", b"e"]))
        seen: list[bytes] = []
        while len(seen) < 3:
            msg = await stream.recv_message()
            assert msg is not None
            seen += [r.value for r in msg.records]
        assert seen == [b"c", b"d", b"e"]
        await stream.cancel()


async def test_a_reader_with_the_smallest_window_gets_every_record_once_in_order(
    node: Node,
) -> None:
    """Streams send only what the client's flow-control window has room for (so a reader
    that stops reading holds no batch in the node's memory). A 64 KiB window, the least
    grpclib allows, against records from 10 B to 200 KiB (larger than the whole window,
    so sent a part at a time), and runs of small records whose framing overflows what
    is left of the window: every record arrives once, in order, on both streams."""
    sizes = [10, 1000, 30_000, 200_000, 100, 64_000]
    values = [os.urandom(sizes[i % len(sizes)]) for i in range(60)]
    small = [os.urandom(i % 50) for i in range(20_000)]
    batch = batch_grpc.BatchStub(node.channel())
    for part in [values[i : i + 6] for i in range(0, 60, 6)] + [
        small[i : i + 1000] for i in range(0, len(small), 1000)
    ]:
        await batch.ProduceBatch(batch_pb2.ProduceBatchRequest(values=part))
    values += small
    window = 2**16 - 1
    narrow = Channel(
        "127.0.0.1", node.server.port,
        ssl=client_context(node.pki.root_client_cert, node.pki.root_client_key,
                           node.pki.ca_cert),
        config=Configuration(http2_connection_window_size=window,
                             http2_stream_window_size=window),
    )
    try:
        async with log_grpc.LogStub(narrow).ConsumeStream.open() as stream:
            await stream.send_message(log_pb2.ConsumeRequest(offset=0), end=True)
            records: list[log_pb2.Record] = []
            while len(records) < len(values):
                reply = await stream.recv_message()
                assert reply is not None
                records.append(reply.record)
            await stream.cancel()
        assert [r.offset for r in records] == list(range(len(values)))
        assert [r.value for r in records] == values

        async with batch_grpc.BatchStub(narrow).ConsumeBatchStream.open() as bstream:
            request = batch_pb2.ConsumeBatchRequest(offset=0, max_bytes=3 << 20)
            await bstream.send_message(request, end=True)
            records, replies = [], 0
            while len(records) < len(values):
                breply = await bstream.recv_message()
                assert breply is not None and breply.records
                records += breply.records
                replies += 1
            await bstream.cancel()
        assert [r.offset for r in records] == list(range(len(values)))
        assert [r.value for r in records] == values
        assert replies > 100  # 3.4 MB in 3 MiB replies would be 2; in 64 KiB windows, many

        # Unary calls too read no more than the client has room for, 1 MiB at least.
        records, calls = [], 0
        while len(records) < len(values):
            page = await batch_grpc.BatchStub(narrow).ConsumeBatch(batch_pb2.ConsumeBatchRequest(
                offset=len(records), max_records=16384, max_bytes=3 << 20))
            assert page is not None and page.records
            assert sum(len(r.value) for r in page.records[:-1]) < 1 << 20
            records += page.records
            calls += 1
        assert [r.offset for r in records] == list(range(len(values)))
        assert [r.value for r in records] == values
        assert calls >= 4  # 3.4 MB: 2 calls of 3 MiB; at most 1 MiB (and a record) per call
    finally:
        narrow.close()


async def test_an_out_of_range_read_is_answered_at_once_while_the_connection_is_full(
    node: Node,
) -> None:
    """Reads wait for the client's flow-control room before reading; a read that can only
    fail must not: its status is headers only, which flow control does not hold back. Here
    a stream the client does not read has used the connection's whole window."""
    batch = batch_grpc.BatchStub(node.channel())
    values = [b"v" * 1024] * 512
    for _ in range(12):  # 6 MiB, more than the client's 4 MiB connection window
        await batch.ProduceBatch(batch_pb2.ProduceBatchRequest(values=values))
    channel = node.channel()
    async with batch_grpc.BatchStub(channel).ConsumeBatchStream.open() as stalled:
        await stalled.send_message(
            batch_pb2.ConsumeBatchRequest(offset=0, max_records=16384, max_bytes=3 << 20),
            end=True)
        await asyncio.sleep(0.5)  # the window fills; the client reads none of it
        with pytest.raises(GRPCError) as single:
            await log_grpc.LogStub(channel).Consume(log_pb2.ConsumeRequest(offset=10**9),
                                                    timeout=3)
        assert single.value.status is Status.OUT_OF_RANGE
        with pytest.raises(GRPCError) as paged:
            await batch_grpc.BatchStub(channel).ConsumeBatch(
                batch_pb2.ConsumeBatchRequest(offset=10**9), timeout=3)
        assert paged.value.status is Status.OUT_OF_RANGE
        await stalled.cancel()


async def test_get_servers_reports_this_node_as_leader(node: Node) -> None:
    stub = log_grpc.LogStub(node.channel())
    reply = await stub.GetServers(log_pb2.GetServersRequest())
    assert [(s.id, s.rpc_addr, s.is_leader) for s in reply.servers] == [
        ("node-0", node.server.address, True)
    ]


async def test_health_check_serves_once_the_backend_has_a_leader(node: Node) -> None:
    health = HealthStub(node.channel("nobody"))
    overall = await health.Check(HealthCheckRequest())
    assert overall.status == HealthCheckResponse.SERVING
    service = await health.Check(HealthCheckRequest(service="log.v1.Log"))
    assert service.status == HealthCheckResponse.SERVING


async def test_idle_consume_stream_ends_when_the_server_closes(node: Node) -> None:
    stub = log_grpc.LogStub(node.channel())
    async with stub.ConsumeStream.open() as stream:
        await stream.send_message(log_pb2.ConsumeRequest(offset=0), end=True)
        await eventually(lambda: "/log.v1.Log/ConsumeStream" in node.requests_seen)
        await node.server.close()
        with pytest.raises((GRPCError, ConnectionError, asyncio.IncompleteReadError)):
            await stream.recv_message()


async def test_unary_calls_are_not_delayed_by_nagle(node: Node) -> None:
    """Regression: without TCP_NODELAY on accepted sockets every unary call took ~44 ms."""
    stub = log_grpc.LogStub(node.channel())
    await stub.GetServers(log_pb2.GetServersRequest())
    durations = []
    for _ in range(15):
        start = time.perf_counter()
        await stub.GetServers(log_pb2.GetServersRequest())
        durations.append(time.perf_counter() - start)
    assert sorted(durations)[7] < 0.02, f"median {sorted(durations)[7] * 1e3:.1f} ms"


async def test_a_message_declaring_a_gigabyte_is_refused_from_its_header(
    node_factory: NodeFactory,
) -> None:
    """The gRPC header says 1 GiB; only a few KiB follow. The server must refuse from the
    header (RESOURCE_EXHAUSTED) rather than buffer, or wait for, the declared gigabyte."""
    async with node_factory() as node:
        stub = log_grpc.LogStub(node.channel())
        with pytest.raises(GRPCError) as info:
            async with stub.Produce.open(timeout=5) as stream:
                await stream.send_request()
                header = b"\x00" + (1 << 30).to_bytes(4, "big")
                await stream._stream.send_data(header + b"x" * 4096)
                # The server also resets the stream whose body it will not read, so the
                # status may surface here or when the call closes.
                with contextlib.suppress(StreamTerminatedError):
                    await stream.recv_message()
        assert info.value.status is Status.RESOURCE_EXHAUSTED
        assert "1073741824" in (info.value.message or "")
        assert node.backend.next_offset == 0
        assert (await stub.Produce(produce_request(b"still serving"))).offset == 0


async def test_a_stream_reset_by_the_client_while_the_server_closes_logs_no_error(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """The peer resets its stream just as this server begins to close (a cluster shutting
    down: every node's Raft streams end at once). The handler then cannot send its
    "shutting down" status; that is an ordinary cancel, not grpclib's ERROR "Failed to
    handle cancellation" with a traceback in the operator's log."""
    stub = log_grpc.LogStub(node.channel())
    async with stub.ConsumeStream.open() as stream:
        await stream.send_message(log_pb2.ConsumeRequest(offset=0), end=True)
        await eventually(lambda: node.server.active_calls == 1)
        node.server._closing = True  # the interleaving: close() has begun, tasks not yet cancelled
        with caplog.at_level("INFO"):
            await stream.cancel()
            await eventually(lambda: node.server.active_calls == 0)
            await asyncio.sleep(0.05)
    errors = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert not errors, [r.getMessage() for r in errors]


class _Stuck:
    """A service whose one method does not end when cancelled (until told to): the bug
    close() must not hang on."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.cancels = 0

    async def call(self, stream: Any) -> None:
        await stream.recv_message()
        while not self.release.is_set():
            try:
                await asyncio.wait_for(self.release.wait(), 20)
            except asyncio.CancelledError:
                self.cancels += 1  # swallowed

    def __mapping__(self) -> dict[str, Handler]:
        return {"/test.Stuck/Call": Handler(self.call, Cardinality.UNARY_UNARY,
                                            log_pb2.GetServersRequest,
                                            log_pb2.GetServersResponse)}


async def test_close_does_not_hang_on_a_call_that_ignores_its_cancel(
    pki: PkiFiles, authorizer: Authorizer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stuck = _Stuck()
    backend = LocalBackend.open(tmp_path / "log", LOG_CONFIG, server_id="n0")
    server = build_server(
        backend, ssl_context=server_context(pki.server_cert, pki.server_key, pki.ca_cert),
        authorizer=authorizer, extra_handlers=[stuck],
        extra_actions={"/test.Stuck/Call": Action.CONSUME})
    server.close_timeout = 0.5
    await server.start()
    channel = Channel("127.0.0.1", server.port, ssl=client_context(
        pki.root_client_cert, pki.root_client_key, pki.ca_cert))
    method = UnaryUnaryMethod(channel, "/test.Stuck/Call", log_pb2.GetServersRequest,
                              log_pb2.GetServersResponse)
    call = asyncio.ensure_future(method(log_pb2.GetServersRequest(), timeout=30))
    try:
        await eventually(lambda: server.active_calls == 1)
        started = time.monotonic()
        with caplog.at_level("WARNING"):
            await server.close()
        assert time.monotonic() - started < 5
        assert stuck.cancels >= 1
        assert any("calls still running" in r.getMessage() and "/test.Stuck/Call" in
                   r.getMessage() for r in caplog.records)
    finally:
        stuck.release.set()
        call.cancel()
        with contextlib.suppress(BaseException):
            await call
        channel.close()
        await backend.close()
