"""Many gRPC messages in one HTTP/2 write, for server-streaming hot paths.

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

import struct
from collections.abc import Sequence
from typing import Any

from grpclib.server import Stream

__all__ = ["frame_messages", "send_encoded"]

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
