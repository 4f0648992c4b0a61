"""gRPC framing of pre-serialized messages and the corked transport, over a real socket pair."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from pathlib import Path
from typing import Any

from dcl.api.log.v1 import log_pb2
from dcl.server.certs import generate_pki
from dcl.server.framing import CorkedTransport, fitting, frame_messages
from dcl.server.records import encode_consume_response, encode_produce_response, encode_record
from dcl.tls import client_context, server_context


def parse_frames(data: bytes) -> list[bytes]:
    """Split gRPC length-prefixed frames the way a client does."""
    out, pos = [], 0
    while pos < len(data):
        compressed, length = struct.unpack_from(">?I", data, pos)
        assert not compressed
        out.append(data[pos + 5 : pos + 5 + length])
        pos += 5 + length
    return out


def test_framed_messages_parse_back_as_the_same_protobufs() -> None:
    records = [encode_record(b"v%d" % i, i, 3) for i in range(5)] + [encode_record(b"", 0)]
    payloads = [encode_consume_response(r) for r in records]
    frames = parse_frames(frame_messages(payloads))
    decoded = [log_pb2.ConsumeResponse.FromString(f).record for f in frames]
    assert [(r.value, r.offset) for r in decoded] == [
        (b"v0", 0), (b"v1", 1), (b"v2", 2), (b"v3", 3), (b"v4", 4), (b"", 0)]
    assert frame_messages([]) == b""


def test_produce_responses_encode_like_protobuf() -> None:
    for offset in (0, 1, 127, 128, 2**40):
        expected = log_pb2.ProduceResponse(offset=offset).SerializeToString()
        assert encode_produce_response(offset) == expected


async def test_writes_in_one_loop_turn_reach_the_peer_together_and_in_order() -> None:
    a, b = socket.socketpair()
    b.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=a)
    corked = CorkedTransport(transport)
    try:
        corked.write(b"one,")
        corked.write(b"")
        corked.write(bytearray(b"two,"))
        corked.write(memoryview(b"three"))
        # Nothing is on the wire until the loop turns.
        try:
            early = b.recv(100)
        except BlockingIOError:
            early = b""
        assert early == b""
        await asyncio.sleep(0.01)
        assert b.recv(100) == b"one,two,three"

        corked.write(b"tail")
        corked.close()  # flushes what is buffered before closing
        await asyncio.sleep(0.01)
        assert b.recv(100) == b"tail"
        assert corked.is_closing()
        corked.write(b"after close")  # dropped, not an error
        await asyncio.sleep(0.01)
        assert b.recv(100) == b""  # EOF
    finally:
        transport.close()
        b.close()


def test_fitting_counts_the_leading_items_within_the_room_and_at_least_one() -> None:
    assert fitting([10, 10, 10], 25) == 2
    assert fitting([10, 10, 10], 30) == 3
    assert fitting([10, 10, 10], 1000) == 3
    assert fitting([100, 1], 50) == 1  # larger than the room: still goes, alone
    assert fitting([], 10) == 1  # callers only ask with at least one item


class _Sizes:
    """Passes writes on to a real transport, noting each one's size."""

    def __init__(self, inner: asyncio.Transport) -> None:
        self.inner, self.sizes = inner, list[int]()

    def write(self, data: Any) -> None:
        self.sizes.append(len(data))
        self.inner.write(data)

    def is_closing(self) -> bool:
        return self.inner.is_closing()


async def test_a_large_turn_goes_down_in_bounded_writes_intact_and_in_order() -> None:
    """TLS keeps its buffer at the largest write it was handed, for the connection's life."""
    a, b = socket.socketpair()
    b.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=a)
    spy = _Sizes(transport)
    corked = CorkedTransport(spy)  # type: ignore[arg-type]
    parts = [os.urandom(700_000), os.urandom(5), os.urandom(CorkedTransport.MAX_WRITE * 2)]
    try:
        for part in parts:
            corked.write(part)
        received = bytearray()
        expected = b"".join(parts)
        async with asyncio.timeout(10):
            while len(received) < len(expected):
                received += await loop.sock_recv(b, 1 << 20)
        assert bytes(received) == expected
        assert max(spy.sizes) == CorkedTransport.MAX_WRITE
        assert sum(spy.sizes) == len(expected)
        corked.write(b"small")  # a turn under the bound is one write, as before
        await asyncio.sleep(0.01)
        assert spy.sizes[-1] == 5
    finally:
        transport.close()
        b.close()


class _CorkedSide(asyncio.Protocol):
    """A server side that writes through a CorkedTransport, as DclServer's protocol does."""

    def __init__(self, accepted: asyncio.Future[_CorkedSide]) -> None:
        self.accepted = accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        self.transport = transport
        self.corked = CorkedTransport(transport)  # type: ignore[arg-type]
        self.accepted.set_result(self)

    def pause_writing(self) -> None:
        self.corked.pause()

    def resume_writing(self) -> None:
        self.corked.resume()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.corked.lost()


async def test_a_turn_larger_than_a_slow_reader_takes_waits_for_it_instead_of_piling_up_in_tls(
    tmp_path: Path,
) -> None:
    """8 MiB written in one turn to a TLS client that reads nothing for a while: TLS holds
    at most its high-water mark (512 KiB) and one piece, not the 8 MiB the socket could
    not take (OpenSSL keeps that buffer's largest size for the connection's life); once
    the client reads, every byte arrives, in order."""
    pki = generate_pki(tmp_path / "pki")
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[_CorkedSide] = loop.create_future()
    server = await loop.create_server(
        lambda: _CorkedSide(accepted), "127.0.0.1", 0,
        ssl=server_context(pki.server_cert, pki.server_key, pki.ca_cert))
    port = server.sockets[0].getsockname()[1]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    sock.connect(("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(
        sock=sock, server_hostname="localhost",
        ssl=client_context(pki.root_client_cert, pki.root_client_key, pki.ca_cert))
    try:
        side = await asyncio.wait_for(accepted, 10)
        data = os.urandom(8 << 20)
        for start in range(0, len(data), 100_000):  # grpclib's many writes in one turn
            side.corked.write(data[start : start + 100_000])
        await asyncio.sleep(1)  # the socket and the unread client fill up meanwhile
        held = side.transport.get_write_buffer_size()  # type: ignore[attr-defined]
        assert held <= (512 << 10) + CorkedTransport.MAX_WRITE, held
        received = await asyncio.wait_for(reader.readexactly(len(data)), 30)
        assert received == data
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


async def test_close_sends_what_was_written_while_a_large_turn_was_going_down() -> None:
    """grpclib closes on a client's GOAWAY or a failed keepalive; a call's trailers written
    after a large turn started going down in pieces must still go out before the close."""
    a, b = socket.socketpair()
    b.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=a)
    corked = CorkedTransport(transport)
    big = os.urandom(CorkedTransport.MAX_WRITE * 3)
    try:
        corked.write(big)
        await asyncio.sleep(0)  # one piece down, two pending
        corked.write(b"TRAILERS")
        corked.close()
        received = bytearray()
        async with asyncio.timeout(10):
            while chunk := await loop.sock_recv(b, 1 << 20):
                received += chunk
        assert bytes(received) == big + b"TRAILERS"
    finally:
        b.close()


async def test_pieces_go_down_one_per_loop_turn_across_a_pause() -> None:
    a, b = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=a)
    spy = _Sizes(transport)
    corked = CorkedTransport(spy)  # type: ignore[arg-type]
    reader = loop.create_task(_drain(loop, b))
    try:
        corked.pause()
        corked.write(os.urandom(CorkedTransport.MAX_WRITE * 6))
        await asyncio.sleep(0)
        assert spy.sizes == []  # paused: nothing goes down
        corked.resume()
        for turn in range(1, 7):
            await asyncio.sleep(0)
            assert len(spy.sizes) == turn
    finally:
        transport.close()
        reader.cancel()
        b.close()


async def _drain(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    sock.setblocking(False)
    while await loop.sock_recv(sock, 1 << 20):
        pass
