"""The client-facing gRPC services: ``log.v1.Log`` and ``dcl.v1.Batch``.

Handlers only translate between protobuf and the Backend seam, and raise dcl.errors; the
DclServer wrapper authorizes each call once and maps errors to statuses (dcl.server.errors).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard, TypeVar

from grpclib.server import Stream

from dcl.api.dcl.v1 import batch_grpc, batch_pb2
from dcl.api.log.v1 import log_grpc, log_pb2
from dcl.errors import InvalidRequest
from dcl.server.backend import Backend
from dcl.server.framing import FRAME_PREFIX_BYTES, fitting, send_encoded, send_room
from dcl.server.records import (
    BATCH_OVERHEAD_BYTES,
    BATCH_RECORD_OVERHEAD_BYTES,
    consume_batch_response,
    consume_response,
    encode_consume_response,
    encode_produce_response,
)

__all__ = [
    "DEFAULT_MAX_RECORD_BYTES",
    "BatchService",
    "Limits",
    "LogService",
]

DEFAULT_MAX_RECORD_BYTES = 1 << 20

_Req = TypeVar("_Req")


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds that protect the node from one caller; shared by both services."""

    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    #: Appends one ProduceStream may have awaiting durability before it stops reading
    #: (HTTP/2 flow control then pushes back on the client).
    max_in_flight: int = 1024
    default_batch_records: int = 1024
    max_batch_records: int = 16384
    default_batch_bytes: int = 1 << 20
    #: Payload bound; with per-record framing a response stays under grpcio's default 4 MiB
    #: receive limit, so standard clients can consume.
    max_batch_bytes: int = 3 << 20

    def check_values(self, values: Sequence[bytes]) -> None:
        """Reject the whole request before anything is appended."""
        if not values:
            raise InvalidRequest("empty batch: at least one record is required")
        limit = self.max_record_bytes
        for index, value in enumerate(values):
            if len(value) > limit:
                raise InvalidRequest(
                    f"record {index} is {len(value)} bytes; the limit is {limit} bytes"
                )

    def batch_bounds(self, max_records: int, max_bytes: int) -> tuple[int, int]:
        records = min(max_records or self.default_batch_records, self.max_batch_records)
        return records, min(max_bytes or self.default_batch_bytes, self.max_batch_bytes)


#: The least a unary read takes once its client has any room (see `ConsumeBatch`).
MIN_UNARY_READ = 1 << 20


async def _room_to_read(stream: Stream[Any, Any], backend: Backend, offset: int) -> int:
    """The client's room for what a read at `offset` sends (`send_room`); but 1 at once
    when the offset is not in the log, so the read's error goes out without waiting (a
    status is headers only, which flow control does not hold back)."""
    if backend.lowest_offset <= offset < backend.next_offset:
        return await send_room(stream)
    return 1


async def _recv_one(stream: Stream[_Req, Any]) -> _Req:
    request = await stream.recv_message()
    if request is None:
        raise InvalidRequest("missing request message")
    return request


def _failed(exc: BaseException) -> asyncio.Future[int]:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future


def _succeeded(ack: object) -> TypeGuard[asyncio.Future[int]]:
    return (
        isinstance(ack, asyncio.Future)
        and ack.done()
        and not ack.cancelled()
        and ack.exception() is None
    )


def _discard(pending: asyncio.Queue[Awaitable[int] | None]) -> None:
    """Acks nobody will send. Those not yet settled are cancelled: an append still queued
    in the backend (held back, see ReplicatedBackend._flush) is then never proposed, so a
    stream that ends keeps its records in order (none after the first one not acked). The
    settled ones have their exceptions retrieved, so asyncio does not log them as lost."""
    while not pending.empty():
        ack = pending.get_nowait()
        if not isinstance(ack, asyncio.Future):
            continue
        if not ack.done():
            ack.cancel()
        elif not ack.cancelled():
            ack.exception()


class LogService(log_grpc.LogBase):
    """``log.v1.Log``: the wire-compatible single-record API."""

    def __init__(self, backend: Backend, limits: Limits | None = None):
        self._backend = backend
        self._limits = limits or Limits()

    async def Produce(
        self, stream: Stream[log_pb2.ProduceRequest, log_pb2.ProduceResponse]
    ) -> None:
        request = await _recv_one(stream)
        values = [request.record.value]
        self._limits.check_values(values)
        offset = await self._backend.append(values)
        await stream.send_message(log_pb2.ProduceResponse(offset=offset))

    async def Consume(
        self, stream: Stream[log_pb2.ConsumeRequest, log_pb2.ConsumeResponse]
    ) -> None:
        request = await _recv_one(stream)
        await _room_to_read(stream, self._backend, request.offset)  # as in ConsumeBatch
        await stream.send_message(consume_response(self._backend.read(request.offset)))

    async def ConsumeStream(
        self, stream: Stream[log_pb2.ConsumeRequest, log_pb2.ConsumeResponse]
    ) -> None:
        request = await _recv_one(stream)
        backend, limits = self._backend, self._limits
        offset = request.offset
        while True:
            if offset >= backend.next_offset:
                await backend.wait_for(offset)
            # Only what the client has room for (a consumer that stops reading must not
            # leave a batch parked in our memory); a few records read past it are dropped.
            room = await _room_to_read(stream, backend, offset)
            records = backend.read_batch(
                offset, limits.default_batch_records, min(limits.default_batch_bytes, room)
            )
            payloads = [encode_consume_response(r) for r in records]
            del payloads[fitting((len(p) + FRAME_PREFIX_BYTES for p in payloads), room):]
            # One write for the whole batch (dcl.server.framing): per-message sends would
            # cost a DATA frame, a TLS record and a syscall per record.
            await send_encoded(stream, payloads)
            offset += len(payloads)

    async def ProduceStream(
        self, stream: Stream[log_pb2.ProduceRequest, log_pb2.ProduceResponse]
    ) -> None:
        """Pipelined: requests are appended as they arrive; acks go out in request order.

        A reader task feeds appends into a bounded queue while this task awaits each append's
        durability in turn. The first failure (bad record, NotLeader, ...) ends the stream
        after every earlier request was acked; nothing after it is appended.
        """
        pending: asyncio.Queue[Awaitable[int] | None] = asyncio.Queue(self._limits.max_in_flight)
        reader = asyncio.create_task(self._read_produce_requests(stream, pending))
        try:
            while (ack := await pending.get()) is not None:
                acks = [encode_produce_response(await ack)]
                # Acks that are already settled go out in the same write (appends made in
                # one loop turn share a Raft entry, so they settle together).
                while not pending.empty():
                    head: object = pending._queue[0]  # type: ignore[attr-defined]
                    if not _succeeded(head):
                        break  # not settled yet, a failure (reported in order), or the end
                    pending.get_nowait()
                    acks.append(encode_produce_response(head.result()))
                await send_encoded(stream, acks)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            _discard(pending)

    async def _read_produce_requests(
        self,
        stream: Stream[log_pb2.ProduceRequest, log_pb2.ProduceResponse],
        pending: asyncio.Queue[Awaitable[int] | None],
    ) -> None:
        try:
            async for request in stream:
                values = [request.record.value]
                self._limits.check_values(values)
                appended = self._backend.append(values)
                await pending.put(appended)
                if isinstance(appended, asyncio.Future) and appended.done() and (
                    appended.cancelled() or appended.exception() is not None
                ):
                    # Refused at once (NotLeader, a low disk): read no further. A later
                    # request could be taken once the cause clears (space freed), landing
                    # after one that was refused; the stream ends on this one anyway.
                    return
        except Exception as exc:  # handed to the acking task, which reports it in order
            await pending.put(_failed(exc))
            return
        await pending.put(None)

    async def GetServers(
        self, stream: Stream[log_pb2.GetServersRequest, log_pb2.GetServersResponse]
    ) -> None:
        await _recv_one(stream)
        servers = [
            log_pb2.Server(id=s.id, rpc_addr=s.rpc_addr, is_leader=s.is_leader)
            for s in self._backend.servers()
        ]
        await stream.send_message(log_pb2.GetServersResponse(servers=servers))


class BatchService(batch_grpc.BatchBase):
    """``dcl.v1.Batch``: many records per call, the fast path."""

    def __init__(self, backend: Backend, limits: Limits | None = None):
        self._backend = backend
        self._limits = limits or Limits()

    async def ProduceBatch(
        self, stream: Stream[batch_pb2.ProduceBatchRequest, batch_pb2.ProduceBatchResponse]
    ) -> None:
        request = await _recv_one(stream)
        values = request.values
        self._limits.check_values(values)
        first = await self._backend.append(values)
        await stream.send_message(
            batch_pb2.ProduceBatchResponse(first_offset=first, count=len(values))
        )

    async def ConsumeBatch(
        self, stream: Stream[batch_pb2.ConsumeBatchRequest, batch_pb2.ConsumeBatchResponse]
    ) -> None:
        """At the tail (offset == next_offset) answers an empty batch rather than an error,
        so a polling reader needs no special case; beyond the tail is OUT_OF_RANGE."""
        request = await _recv_one(stream)
        backend = self._backend
        max_records, max_bytes = self._limits.batch_bounds(request.max_records, request.max_bytes)
        next_offset = backend.next_offset
        records: list[bytes] = []
        if request.offset != next_offset:
            # Not before the client has room for it: calls a client leaves unread (100 on
            # one connection) would each park a batch in our memory (400 MiB per connection
            # of 3 MiB batches). A send uses the room at once, so while the connection's
            # window is shut the calls after it wait here holding nothing. At least
            # `MIN_UNARY_READ`, so a client with small windows still gets useful batches.
            room = max(await _room_to_read(stream, backend, request.offset), MIN_UNARY_READ)
            records = backend.read_batch(request.offset, max_records, min(max_bytes, room))
        await stream.send_message(consume_batch_response(records, backend.next_offset))

    async def ConsumeBatchStream(
        self, stream: Stream[batch_pb2.ConsumeBatchRequest, batch_pb2.ConsumeBatchResponse]
    ) -> None:
        request = await _recv_one(stream)
        backend = self._backend
        max_records, max_bytes = self._limits.batch_bounds(request.max_records, request.max_bytes)
        offset = request.offset
        while True:
            if offset >= backend.next_offset:
                await backend.wait_for(offset)
            room = await _room_to_read(stream, backend, offset)  # as in ConsumeStream
            records = backend.read_batch(offset, max_records, min(max_bytes, room))
            fits = fitting((len(r) + BATCH_RECORD_OVERHEAD_BYTES for r in records),
                           room - FRAME_PREFIX_BYTES - BATCH_OVERHEAD_BYTES)
            del records[fits:]
            offset += len(records)
            await stream.send_message(consume_batch_response(records, backend.next_offset))
