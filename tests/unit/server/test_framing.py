"""gRPC framing of pre-serialized messages and the corked transport, over a real socket pair."""

from __future__ import annotations

import asyncio
import socket
import struct

from dcl.api.log.v1 import log_pb2
from dcl.server.framing import CorkedTransport, frame_messages
from dcl.server.records import encode_consume_response, encode_produce_response, encode_record


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
