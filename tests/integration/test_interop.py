"""A standard grpcio client talks to our grpclib server (mutual TLS, log.v1 wire contract)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from dcl.api.log.v1 import log_pb2
from dcl.server.certs import PkiFiles
from tests.integration.conftest import Node

pytestmark = pytest.mark.timeout(30)

_PREFIX = "/log.v1.Log/"


def _channel(pki: PkiFiles, port: int, identity: str = "root") -> grpc.Channel:
    cert, key = {
        "root": (pki.root_client_cert, pki.root_client_key),
        "nobody": (pki.nobody_client_cert, pki.nobody_client_key),
    }[identity]
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_cert.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
    # grpcio checks the server name from the target: dial "localhost", a SAN of server.pem.
    return grpc.secure_channel(f"localhost:{port}", credentials)


def _grpcio_session(pki: PkiFiles, port: int) -> tuple[list[int], list[log_pb2.Record], int]:
    """Runs in a worker thread: grpcio's sync API blocks, the server needs the event loop."""
    with _channel(pki, port) as channel:
        produce = channel.unary_unary(
            _PREFIX + "Produce",
            request_serializer=log_pb2.ProduceRequest.SerializeToString,
            response_deserializer=log_pb2.ProduceResponse.FromString,
        )
        consume = channel.unary_unary(
            _PREFIX + "Consume",
            request_serializer=log_pb2.ConsumeRequest.SerializeToString,
            response_deserializer=log_pb2.ConsumeResponse.FromString,
        )
        produce_stream = channel.stream_stream(
            _PREFIX + "ProduceStream",
            request_serializer=log_pb2.ProduceRequest.SerializeToString,
            response_deserializer=log_pb2.ProduceResponse.FromString,
        )
        offsets = [
            produce(log_pb2.ProduceRequest(record=log_pb2.Record(value=b"grpcio-%d" % i)),
                    timeout=10).offset
            for i in range(3)
        ]

        def requests() -> Iterator[log_pb2.ProduceRequest]:
            for i in range(3, 50):
                yield log_pb2.ProduceRequest(record=log_pb2.Record(value=b"grpcio-%d" % i))

        offsets += [ack.offset for ack in produce_stream(requests(), timeout=10)]
        records = [
            consume(log_pb2.ConsumeRequest(offset=o), timeout=10).record for o in (0, 49)
        ]
        consume_stream = channel.unary_stream(
            _PREFIX + "ConsumeStream",
            request_serializer=log_pb2.ConsumeRequest.SerializeToString,
            response_deserializer=log_pb2.ConsumeResponse.FromString,
        )
        # The stream follows the tail forever; take what exists, then cancel.
        call = consume_stream(log_pb2.ConsumeRequest(offset=40), timeout=10)
        records += [next(call).record for _ in range(10)]
        call.cancel()
        try:
            consume(log_pb2.ConsumeRequest(offset=1000), timeout=10)
        except grpc.RpcError as err:
            code = err.code().value[0]
        else:
            code = 0
        return offsets, records, code


async def test_grpcio_client_produces_and_consumes(node: Node) -> None:
    offsets, records, past_end_code = await asyncio.to_thread(
        _grpcio_session, node.pki, node.server.port
    )
    assert offsets == list(range(50))
    expected = [0, 49, *range(40, 50)]
    assert [(r.value, r.offset) for r in records] == [(b"grpcio-%d" % o, o) for o in expected]
    assert past_end_code == grpc.StatusCode.OUT_OF_RANGE.value[0]


def _denied_code(pki: PkiFiles, port: int) -> grpc.StatusCode:
    with _channel(pki, port, "nobody") as channel:
        produce = channel.unary_unary(
            _PREFIX + "Produce",
            request_serializer=log_pb2.ProduceRequest.SerializeToString,
            response_deserializer=log_pb2.ProduceResponse.FromString,
        )
        try:
            produce(log_pb2.ProduceRequest(record=log_pb2.Record(value=b"x")), timeout=10)
        except grpc.RpcError as err:
            code: grpc.StatusCode = err.code()
            return code
        raise AssertionError("unauthorized produce succeeded")


async def test_grpcio_client_sees_permission_denied(node: Node) -> None:
    code = await asyncio.to_thread(_denied_code, node.pki, node.server.port)
    assert code == grpc.StatusCode.PERMISSION_DENIED
