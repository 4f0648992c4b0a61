"""Fewer, larger writes: many gRPC messages per HTTP/2 write, and corked transports.

grpclib's ``Stream.send_message`` frames, encodes and writes one message at a time: one
HTTP/2 DATA frame, one TLS record and one socket write per message. A ConsumeStream that
pushes small records, or a ProduceStream acknowledging a run of appends, would spend most of
its CPU on that per-message machinery (and so would the client, one frame event per message).
gRPC framing is just a 1-byte compressed flag and a 4-byte big-endian length before each
message, so a run of already-serialized messages is concatenated here and handed to the
HTTP/2 layer once; it is split into DATA frames by size and flow control there, and the peer
parses the messages exactly as if they had been sent one by one.

This reaches into grpclib's server stream (``_stream``) because grpclib has no public
"send raw bytes" call; grpclib is pinned to a minor range in pyproject, and the streaming
tests exercise this path end to end, so a change there fails loudly.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from typing import Any

from grpclib.server import Stream

__all__ = ["CorkedTransport", "frame_messages", "send_encoded"]

_PREFIX = struct.Struct(">?I")


def frame_messages(payloads: Sequence[bytes]) -> bytes:
    """gRPC length-prefixed framing (uncompressed) of serialized messages, back to back."""
    pack = _PREFIX.pack
    parts: list[bytes] = []
    for payload in payloads:
        parts += (pack(False, len(payload)), payload)
    return b"".join(parts)


async def send_encoded(stream: Stream[Any, Any], payloads: Sequence[bytes]) -> None:
    """Send serialized response messages on a server-streaming call in one write."""
    if not payloads:
        return
    if not stream._send_initial_metadata_done:
        await stream.send_initial_metadata()
    await stream._stream.send_data(frame_messages(payloads))
    stream._send_message_done = True
    stream._messages_sent += len(payloads)


class CorkedTransport:
    """A transport wrapper that coalesces the writes of one event-loop turn into one.

    grpclib writes each HTTP/2 frame group as soon as it is produced: a unary response is
    three writes (headers, message, trailers), each its own TLS record and ``send`` syscall,
    and 64 calls finishing together are 192 of them. Buffering until the loop's next turn
    turns that into one TLS record and one syscall per turn, at the cost of delaying the
    bytes until the current turn's callbacks have run (which is when they would have been
    sent together anyway under load). Everything but ``write``/``close`` passes through.
    """

    def __init__(self, inner: asyncio.Transport) -> None:
        self._inner = inner
        self._buffer: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._buffer:
            self._loop.call_soon(self.flush)
        self._buffer.append(bytes(data))

    def flush(self) -> None:
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        if not self._inner.is_closing():
            self._inner.write(data)

    def close(self) -> None:
        self.flush()
        self._inner.close()

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
