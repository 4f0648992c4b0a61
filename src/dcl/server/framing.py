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
from collections.abc import Iterable, Sequence
from typing import Any

from grpclib.server import Stream

__all__ = [
    "FRAME_PREFIX_BYTES",
    "CorkedTransport",
    "fitting",
    "frame_messages",
    "send_encoded",
    "send_room",
]

_PREFIX = struct.Struct(">?I")
#: Bytes gRPC puts before each message: a compressed flag and the message's length.
FRAME_PREFIX_BYTES = _PREFIX.size


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


async def send_room(stream: Stream[Any, Any]) -> int:
    """Wait until the client can take more of this stream's data; returns how many bytes
    (the stream's HTTP/2 send window, which the connection's window also bounds).

    Why: grpclib waits for flow control only once it is handed a message, so a streaming
    handler that reads its next batch first parks it (read, encoded, framed and copied once
    more inside grpclib) for as long as the client does not read: a consumer that stopped
    reading held about 8 MiB of the node's memory. Reading only what fits (`fitting`) once
    there is room holds nothing while the window is shut.
    """
    h2 = stream._stream
    assert h2.id is not None  # a server's stream has its request's id from the start
    while True:
        await h2.connection.write_ready.wait()
        window = int(h2._h2_connection.local_flow_control_window(h2.id))
        if window > 0:
            return window
        h2.window_updated.clear()
        await h2.window_updated.wait()


def fitting(sizes: Iterable[int], room: int) -> int:
    """How many leading items of these sizes fit in `room` bytes together; at least one
    (an item larger than the whole window still has to go, a part at a time)."""
    used = count = 0
    for size in sizes:
        used += size
        if used > room:
            break
        count += 1
    return max(count, 1)


class CorkedTransport:
    """A transport wrapper that coalesces the writes of one event-loop turn into one.

    grpclib writes each HTTP/2 frame group as soon as it is produced: a unary response is
    three writes (headers, message, trailers), each its own TLS record and ``send`` syscall,
    and 64 calls finishing together are 192 of them. Buffering until the loop's next turn
    turns that into one TLS record and one syscall per turn, at the cost of delaying the
    bytes until the current turn's callbacks have run (which is when they would have been
    sent together anyway under load). Everything but ``write``/``close`` passes through.

    A turn's bytes go down in writes of at most `MAX_WRITE` bytes, one per loop turn, and
    none while the transport has asked us to pause (`pause`/`resume`, from the protocol's
    `pause_writing`/`resume_writing`): the TLS layer encrypts each write whole into an
    OpenSSL memory buffer, which holds what the socket has not taken and keeps its largest
    size for as long as the connection lives. One 4 MiB write (a consumer's whole
    flow-control window) pinned 4.5 MiB per connection for good; pieces written regardless
    of the pause piled up there as well once the socket pushed back. A turn per piece also
    lets a lost connection stop the writes before the next piece.
    """

    MAX_WRITE = 256 << 10

    def __init__(self, inner: asyncio.Transport) -> None:
        self._inner = inner
        self._buffer: list[bytes] = []
        #: What is left of a turn's bytes after the pieces written so far.
        self._rest: memoryview | None = None
        self._paused = self._lost = self._scheduled = False
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._buffer.append(bytes(data))
        self._schedule()

    def _schedule(self) -> None:
        """One flush pending at a time (a second would write two pieces per turn)."""
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the next piece; runs a turn after a write, then a turn per piece while
        there is more, and again after `resume`."""
        self._scheduled = False
        if self._paused:
            return
        rest = self._take()
        if rest is None:
            return
        self._rest = rest[self.MAX_WRITE :] if len(rest) > self.MAX_WRITE else None
        if self._rest is not None or self._buffer:
            self._schedule()
        self._inner.write(rest[: self.MAX_WRITE])

    def _take(self) -> memoryview | None:
        """The bytes still to write (or None: nothing, or nowhere to write them)."""
        if self._lost or self._inner.is_closing():
            self._rest, self._buffer = None, []
            return None
        if self._rest is None:
            if not self._buffer:
                return None
            self._rest = memoryview(b"".join(self._buffer))
            self._buffer.clear()
        return self._rest

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        if self._rest is not None or self._buffer:
            self._schedule()

    def lost(self) -> None:
        """The connection is gone: drop what is buffered."""
        self._lost = True
        self._rest, self._buffer = None, []

    def close(self) -> None:
        """Everything buffered goes down now, paused or not (then TLS closes after it)."""
        rest = self._take()
        if rest is not None:
            rest = memoryview(b"".join([rest, *self._buffer]))
            for start in range(0, len(rest), self.MAX_WRITE):
                self._inner.write(rest[start : start + self.MAX_WRITE])
        self._rest, self._buffer = None, []
        self._inner.close()

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
