"""DclClient: an asyncio client for DCL Store over grpclib with mutual TLS.

Routing. ``connect()`` asks the seeds, in order, for GetServers until one answers; the
answer is the client's view of the cluster. Produce calls go to the leader; consume calls
round-robin over the followers (the leader serves them when there are none). The client
keeps one grpclib Channel per server. The view is refreshed (GetServers, any reachable
node first, then the seeds) after connection errors, after a refusal for a leader's disk,
and when a server answers FAILED_PRECONDITION: if that answer carries ``dcl-leader``
trailing metadata, the client redirects to that address at once.

Retries. Reads (consume, consume_batch, stream, get_servers) are idempotent: they are
retried on connection errors, timeouts, UNAVAILABLE and DEADLINE_EXCEEDED, on another
server when there is one, with exponential backoff and full jitter, up to ``retries`` times.

Duplication rules for produce / produce_batch. A produce is retried only when the request
certainly did not reach a leader's log:

- the connection could not be set up (refused, reset, TLS failure, deadline) before the
  request's headers were sent: the server never saw the message;
- the server answered FAILED_PRECONDITION (not the leader): per the Backend contract the
  node appended nothing, so the client redirects and retries;
- the server answered RESOURCE_EXHAUSTED for its own disk (``InsufficientStorage``):
  nothing was appended, and leadership may be moving to a node with room, so the client
  refreshes its view and retries with backoff, raising the last error once ``retries`` run
  out (with the default 5, about 0.8 s of backoff on average, 1.55 s at most).

In every other case once the request was sent - the deadline passed, the connection broke
before the answer, or the server answered UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED,
INTERNAL or UNKNOWN - the client raises ``ProduceOutcomeUnknown`` and does not retry.
UNAVAILABLE is in that list on purpose: the server also answers it when it shuts down while
the append is being fsynced, and the status cannot tell that apart from "refused before
appending". So this client never duplicates a record by itself; a record can be duplicated
only if the *caller* retries after ProduceOutcomeUnknown (or after BatchPartiallyWritten,
by resending the whole batch), or if a server breaks the contract above (answers
FAILED_PRECONDITION for a record it appended).

``produce_batch`` splits its input into chunks of at most ``max_chunk_bytes`` (a server
refuses messages larger than its record limit plus 64 KiB). Each chunk is appended
atomically with dense offsets; chunks are sent one after another, so with concurrent
producers the chunks need not be adjacent, and a failure after the first chunk leaves the
earlier chunks appended (``BatchPartiallyWritten`` / ``ProduceOutcomeUnknown.written``).

Consistency. Followers serve what they have applied, so a consume on a follower may not see
a record just produced through the leader yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from os import PathLike
from types import TracebackType
from typing import TypeVar

import h2.exceptions
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from dcl.addresses import split_host_port
from dcl.api.dcl.v1 import admin_grpc, admin_pb2, batch_grpc, batch_pb2
from dcl.api.log.v1 import log_grpc, log_pb2
from dcl.client.errors import BatchPartiallyWritten, ProduceOutcomeUnknown, from_status
from dcl.errors import DclError, InsufficientStorage, InvalidRequest, OffsetOutOfRange, Unavailable
from dcl.tls import client_context

__all__ = [
    "LEADER_METADATA_KEY", "VALUE_FRAMING_BYTES", "ClusterStatus", "DclClient", "NodeStatus",
    "ServerInfo",
]

log = logging.getLogger(__name__)

StrPath = str | PathLike[str]
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_T = TypeVar("_T")

#: Trailing metadata naming the leader on FAILED_PRECONDITION (as dcl.server.errors sends it).
LEADER_METADATA_KEY = "dcl-leader"

#: Failures of the connection itself (not statuses the server sent).
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes ConnectionRefusedError, ssl.SSLError and (3.11) TimeoutError
    StreamTerminatedError,
    ProtocolError,
    h2.exceptions.H2Error,
    EOFError,
)

#: Statuses that mean "this server did not append anything": the request was rejected.
_DEFINITE_REJECTIONS = frozenset(
    {
        Status.INVALID_ARGUMENT,
        Status.RESOURCE_EXHAUSTED,
        Status.PERMISSION_DENIED,
        Status.UNAUTHENTICATED,
        Status.FAILED_PRECONDITION,
        Status.OUT_OF_RANGE,
        Status.UNIMPLEMENTED,
    }
)

#: Statuses worth retrying for idempotent calls.
_TRANSIENT = frozenset({Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED})

#: Per-record protobuf framing in a ProduceBatchRequest: 1 tag byte + up to 5 length bytes.
VALUE_FRAMING_BYTES = 6


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """One cluster member as GetServers reports it."""

    id: str
    rpc_addr: str
    is_leader: bool


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """One server's Raft state as one node reports it (Admin Cluster).

    A node reports its own row exactly; rows about other servers are the answering node's
    view (on the leader, ``last_index`` is the replication match index and
    ``applied_index`` is 0).
    """

    id: str
    rpc_addr: str
    role: str
    term: int
    last_index: int
    applied_index: int
    voter: bool
    gossip_state: str
    #: The node's own row only (0 elsewhere): commit-log offsets [first, next) and bytes.
    first_offset: int = 0
    next_offset: int = 0
    log_bytes: int = 0
    #: The node's own row only: reloads (SIGHUP) since it started, by outcome; when the
    #: first of its certificates expires (Unix seconds, 0: unknown); the fingerprint of the
    #: gossip key it seals with ("" if none).
    reloads_ok: int = 0
    reloads_failed: int = 0
    certificates_expire: int = 0
    gossip_key: str = ""
    #: The node's own row only: free space of its data directory's disk, and the reserve
    #: below which it takes no new records (0: none).
    disk_free_bytes: int = 0
    disk_reserve_bytes: int = 0


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    """What one node answered to Admin Cluster."""

    address: str
    leader_id: str
    servers: tuple[NodeStatus, ...]

    def self_row(self, node_id: str) -> NodeStatus | None:
        return next((s for s in self.servers if s.id == node_id), None)


class _CallFailed(Exception):
    """One attempt on one server failed; the retry policies decide what that means."""

    def __init__(
        self,
        address: str,
        cause: BaseException,
        *,
        sent: bool,
        status: Status | None = None,
        message: str | None = None,
        leader_addr: str | None = None,
    ):
        self.address = address
        self.cause = cause
        #: Request headers went out: the server may have seen the message.
        self.sent = sent
        #: The status the server answered, None for a connection failure or timeout.
        self.status = status
        self.message = message
        self.leader_addr = leader_addr
        super().__init__(f"call to {address} failed: {status.name if status else repr(cause)}")

    @property
    def transient(self) -> bool:
        return self.status is None or self.status in _TRANSIENT

    def to_error(self, offset: int | None = None) -> DclError:
        if self.status is None:
            return Unavailable(f"{self.address}: {self.cause!r}")
        return from_status(self.status, self.message, offset=offset, leader_addr=self.leader_addr)


class _Peer:
    """One server: its channel and stubs."""

    def __init__(self, address: str, ssl_context: ssl.SSLContext):
        host, port = split_host_port(address)
        self.channel = Channel(host, port, ssl=ssl_context)
        self.log = log_grpc.LogStub(self.channel)
        self.batch = batch_grpc.BatchStub(self.channel)
        self.admin = admin_grpc.AdminStub(self.channel)


class DclClient:
    """Async DCL Store client; see the module docstring for routing and retry rules.

    ``tls`` is a client SSLContext or (cert, key, ca) paths. ``timeout`` bounds each attempt
    (not the whole call); ``retries`` is how many further attempts a call may make.
    """

    def __init__(
        self,
        seeds: Sequence[str],
        tls: ssl.SSLContext | tuple[StrPath, StrPath, StrPath],
        *,
        timeout: float = 5.0,
        retries: int = 5,
        backoff_base: float = 0.05,
        backoff_max: float = 1.0,
        max_chunk_bytes: int = 1 << 20,
        rng: random.Random | None = None,
    ):
        if not seeds:
            raise ValueError("at least one seed address is required")
        for seed in seeds:
            split_host_port(seed)
        self._seeds = list(seeds)
        self._ssl = tls if isinstance(tls, ssl.SSLContext) else client_context(*tls)
        self._timeout = timeout
        self._retries = retries
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._max_chunk_bytes = max_chunk_bytes
        self._rng = rng or random.Random()
        self._peers: dict[str, _Peer] = {}
        self._servers: list[ServerInfo] = []
        self._leader: str | None = None
        self._followers: list[str] = []
        self._next_reader = 0
        self._refresh_lock = asyncio.Lock()

    # -- lifecycle ------------------------------------------------------------------------

    async def connect(self) -> None:
        """Learn the cluster from the first seed that answers GetServers."""
        await self._refresh()

    async def close(self) -> None:
        for peer in self._peers.values():
            peer.channel.close()
        self._peers.clear()

    async def __aenter__(self) -> DclClient:
        try:
            await self.connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def leader(self) -> str | None:
        """The leader's address in the current view."""
        return self._leader

    # -- public API -----------------------------------------------------------------------

    async def produce(self, value: bytes) -> int:
        """Append one record on the leader; its offset. See the duplication rules."""
        request = log_pb2.ProduceRequest(record=log_pb2.Record(value=value))

        async def call(peer: _Peer, address: str) -> int:
            reply = await self._unary(address, peer.log.Produce, request)
            return int(reply.offset)

        return await self._produce(call)

    async def produce_batch(self, values: Sequence[bytes]) -> int:
        """Append values (the fast path); the first offset. See the chunking rules."""
        if not values:
            raise InvalidRequest("empty batch: at least one record is required")
        first: int | None = None
        written = 0
        for chunk in self._chunks(values):
            try:
                offset = await self._produce_chunk(chunk)
            except ProduceOutcomeUnknown as exc:
                exc.written, exc.first_offset = written, first
                raise
            except DclError as exc:
                if first is None:
                    raise
                raise BatchPartiallyWritten(first, written, exc) from exc
            if first is None:
                first = offset
            written += len(chunk)
        assert first is not None
        return first

    async def _produce_chunk(self, chunk: Sequence[bytes]) -> int:
        request = batch_pb2.ProduceBatchRequest(values=chunk)

        async def call(peer: _Peer, address: str) -> int:
            reply = await self._unary(address, peer.batch.ProduceBatch, request)
            return int(reply.first_offset)

        return await self._produce(call)

    async def consume(self, offset: int) -> bytes:
        """The record at offset; OffsetOutOfRange if the log does not hold it."""
        request = log_pb2.ConsumeRequest(offset=offset)

        async def call(peer: _Peer, address: str) -> bytes:
            reply = await self._unary(address, peer.log.Consume, request)
            return bytes(reply.record.value)

        return await self._read(call, offset)

    async def consume_batch(
        self, offset: int, max_records: int = 0, max_bytes: int = 0
    ) -> tuple[list[tuple[int, bytes]], int]:
        """Records from offset (0 limits mean the server's defaults) and the offset to read next.

        The second item is where the next call should continue (one past the last record
        returned), not the log's end that the wire response also carries. At the tail the
        list is empty and the offset unchanged; beyond it OffsetOutOfRange.
        """
        request = batch_pb2.ConsumeBatchRequest(
            offset=offset, max_records=max_records, max_bytes=max_bytes
        )

        async def call(peer: _Peer, address: str) -> tuple[list[tuple[int, bytes]], int]:
            reply = await self._unary(address, peer.batch.ConsumeBatch, request)
            records = [(int(r.offset), bytes(r.value)) for r in reply.records]
            return records, records[-1][0] + 1 if records else offset

        return await self._read(call, offset)

    async def start_offset(self) -> int:
        """The first offset the leader's log still holds: 0, unless retention dropped the
        records below (`--retention-bytes`, `--retention-ms`). Followers may hold slightly
        different ranges (each node applies retention to its own log)."""
        try:
            await self.end_offset(0)
        except OffsetOutOfRange as exc:
            if exc.lowest is None:
                raise
            return exc.lowest
        return 0

    async def end_offset(self, offset: int = 0) -> int:
        """The offset the leader's log assigns next: the end of the log as committed and
        applied now. Asked with a one-record read at offset, so it raises OffsetOutOfRange
        when offset is not readable (beyond the end, or truncated away). A reader that must
        see everything up to this point (not just what its follower applied) reads until
        it reaches this offset."""
        request = batch_pb2.ConsumeBatchRequest(offset=offset, max_records=1)

        async def call(peer: _Peer, address: str) -> int:
            reply = await self._unary(address, peer.batch.ConsumeBatch, request)
            return int(reply.next_offset)

        return await self._read(call, offset, leader=True)

    async def get_servers(self) -> list[ServerInfo]:
        """The cluster as a server reports it now (also refreshes this client's view)."""

        async def call(peer: _Peer, address: str) -> list[ServerInfo]:
            return await self._get_servers_from(address)

        servers = await self._read(call)
        self._apply_view(servers)
        return servers

    async def cluster_status(self, address: str) -> ClusterStatus:
        """Admin Cluster on the server at address (one attempt, no failover): the other
        servers' views differ, so the caller picks whom to ask. Needs the admin right."""
        try:
            reply = await self._unary(
                address, self._peer(address).admin.Cluster, admin_pb2.ClusterRequest()
            )
        except _CallFailed as failure:
            raise failure.to_error() from failure.cause
        return ClusterStatus(
            address,
            reply.leader_id,
            tuple(
                NodeStatus(s.id, s.rpc_addr, s.role, s.term, s.last_index, s.applied_index,
                           s.voter, s.gossip_state, s.first_offset, s.next_offset, s.log_bytes,
                           s.reloads_ok, s.reloads_failed, s.certificates_expire,
                           s.gossip_key, s.disk_free_bytes, s.disk_reserve_bytes)
                for s in reply.servers
            ),
        )

    async def stream(
        self, offset: int, *, max_records: int = 0, max_bytes: int = 0
    ) -> AsyncGenerator[tuple[int, bytes], None]:
        """(offset, value) from offset on, following the tail until the caller stops.

        Survives server failures by resuming from the next offset on another server
        (``retries`` consecutive failures without progress end it with Unavailable). Close
        it (``contextlib.aclosing``) to end the server-side stream promptly.
        """
        batches = self.stream_batches(offset, max_records=max_records, max_bytes=max_bytes)
        async with contextlib.aclosing(batches):
            async for batch in batches:
                for record in batch:
                    yield record

    async def stream_batches(
        self, offset: int, *, max_records: int = 0, max_bytes: int = 0
    ) -> AsyncGenerator[list[tuple[int, bytes]], None]:
        """``stream``, one non-empty list of (offset, value) per server message: a caller
        that writes output can flush once per list, i.e. whenever the stream caught up."""
        next_offset = offset
        failures = 0
        avoid: set[str] = set()
        while True:
            address = self._pick_reader(avoid)
            call = self._peer(address).batch.ConsumeBatchStream.open()
            try:
                try:
                    async with call:
                        # Not wait_for: on 3.11 it can lose a cancel that races the send.
                        async with asyncio.timeout(self._timeout):
                            await call.send_request()
                        await call.send_message(
                            batch_pb2.ConsumeBatchRequest(
                                offset=next_offset, max_records=max_records, max_bytes=max_bytes
                            ),
                            end=True,
                        )
                        async for response in call:
                            failures = 0
                            avoid.clear()
                            batch = [(int(r.offset), bytes(r.value)) for r in response.records]
                            if batch:
                                next_offset = batch[-1][0] + 1
                                yield batch
                    raise _CallFailed(address, EOFError("stream ended"), sent=True)
                except GRPCError as exc:
                    raise _CallFailed(
                        address, exc, sent=True, status=exc.status, message=exc.message
                    ) from exc
                except _CONNECTION_ERRORS as exc:
                    raise _CallFailed(address, exc, sent=True) from exc
            except _CallFailed as failure:
                if not failure.transient:
                    raise failure.to_error(next_offset) from failure.cause
                failures += 1
                avoid.add(address)
                if failures > self._retries:
                    raise failure.to_error(next_offset) from failure.cause
                log.info("stream interrupted addr=%s offset=%d: %s", address, next_offset, failure)
                await self._backoff(failures - 1)
                await self._refresh_quietly()

    # -- policies -------------------------------------------------------------------------

    async def _produce(self, call: Callable[[_Peer, str], Awaitable[_T]]) -> _T:
        """Run call on the leader, retrying only when nothing can have been appended."""
        last: DclError = Unavailable("no leader known")
        redirected = False
        for attempt in range(self._retries + 1):
            if attempt and not redirected:
                await self._backoff(attempt - 1)
            redirected = False
            if self._leader is None:
                await self._refresh_quietly()
            address = self._leader
            if address is None:
                last = Unavailable("no leader known")
                continue
            try:
                return await call(self._peer(address), address)
            except _CallFailed as failure:
                last = failure.to_error()
                if failure.status is None and not failure.sent:
                    log.info("produce not sent addr=%s: %r; retrying", address, failure.cause)
                    await self._refresh_quietly(avoid=address)
                    continue
                if failure.status is Status.FAILED_PRECONDITION:
                    redirected = self._redirect(failure)
                    if not redirected:
                        await self._refresh_quietly(avoid=address)
                    else:
                        await self._refresh_quietly(prefer=failure.leader_addr)
                    continue
                if isinstance(last, InsufficientStorage) and last.free_bytes >= 0:
                    # Nothing appended, and a leader out of room for its own disk hands
                    # leadership to a node with room within about a second: retried after
                    # the backoff, on the leader the refreshed view names (as Kafka
                    # producers retry a storage error). A refusal for followers' disks (no
                    # quorum has room) is raised at once: no handoff can help it.
                    log.info("produce refused for disk addr=%s: %s; retrying", address, last)
                    await self._refresh_quietly()
                    continue
                if failure.status in _DEFINITE_REJECTIONS:
                    raise last from failure.cause
                raise ProduceOutcomeUnknown(address, failure.cause) from failure.cause
        raise last

    async def _read(
        self,
        call: Callable[[_Peer, str], Awaitable[_T]],
        offset: int | None = None,
        *,
        leader: bool = False,
    ) -> _T:
        """Run an idempotent call on a reader (the leader if asked and known), retrying
        transient failures elsewhere."""
        last: _CallFailed | None = None
        avoid: set[str] = set()
        for attempt in range(self._retries + 1):
            if attempt:
                await self._backoff(attempt - 1)
                await self._refresh_quietly()
            address = self._pick_reader(avoid, leader=leader)
            try:
                return await call(self._peer(address), address)
            except _CallFailed as failure:
                last = failure
                if failure.status is Status.FAILED_PRECONDITION and self._redirect(failure):
                    continue
                if not failure.transient:
                    raise failure.to_error(offset) from failure.cause
                avoid.add(address)
                log.info("read failed addr=%s: %s; retrying", address, failure)
        assert last is not None
        raise last.to_error(offset) from last.cause

    def _redirect(self, failure: _CallFailed) -> bool:
        hint = failure.leader_addr
        if not hint or hint == failure.address:
            return False
        try:
            split_host_port(hint)
        except ValueError:
            log.warning("ignoring malformed leader hint %r from %s", hint, failure.address)
            return False
        log.info("redirected from=%s to leader=%s", failure.address, hint)
        self._leader = hint
        return True

    async def _backoff(self, attempt: int) -> None:
        ceiling = min(self._backoff_max, self._backoff_base * (2**attempt))
        await asyncio.sleep(self._rng.uniform(0, ceiling))

    # -- one attempt ----------------------------------------------------------------------

    async def _unary(
        self, address: str, method: UnaryUnaryMethod[_Req, _Resp], request: _Req
    ) -> _Resp:
        """One unary call; failures become _CallFailed saying whether the request left."""
        stream = method.open(timeout=self._timeout)
        sent = False
        try:
            async with stream:
                await stream.send_request()
                sent = True
                await stream.send_message(request, end=True)
                reply = await stream.recv_message()
        except GRPCError as exc:
            metadata = stream.trailing_metadata
            leader = metadata.get(LEADER_METADATA_KEY) if metadata is not None else None
            raise _CallFailed(
                address,
                exc,
                sent=True,
                status=exc.status,
                message=exc.message,
                leader_addr=str(leader) if leader else None,
            ) from exc
        except _CONNECTION_ERRORS as exc:  # asyncio.TimeoutError is an OSError on 3.11
            raise _CallFailed(address, exc, sent=sent) from exc
        if reply is None:
            raise _CallFailed(address, EOFError("no reply message"), sent=True)
        return reply

    async def _get_servers_from(self, address: str) -> list[ServerInfo]:
        reply = await self._unary(
            address, self._peer(address).log.GetServers, log_pb2.GetServersRequest()
        )
        return [ServerInfo(s.id, s.rpc_addr, s.is_leader) for s in reply.servers]

    # -- view -----------------------------------------------------------------------------

    def _peer(self, address: str) -> _Peer:
        peer = self._peers.get(address)
        if peer is None:
            peer = self._peers[address] = _Peer(address, self._ssl)
        return peer

    def _apply_view(self, servers: list[ServerInfo]) -> None:
        self._servers = servers
        leaders = [s.rpc_addr for s in servers if s.is_leader and s.rpc_addr]
        self._leader = leaders[0] if leaders else None
        self._followers = [s.rpc_addr for s in servers if not s.is_leader and s.rpc_addr]
        # Channels to servers that left the view stay open until close(): closing one here
        # would break calls in flight on it (and turn a produce into an unknown outcome).
        # A broken connection needs no action either: grpclib redials on the next call.

    def _pick_reader(self, avoid: set[str], *, leader: bool = False) -> str:
        if leader and self._leader and self._leader not in avoid:
            return self._leader
        if self._followers:
            candidates = self._followers
        elif self._leader:
            candidates = [self._leader]
        else:
            candidates = self._seeds
        usable = [a for a in candidates if a not in avoid] or candidates
        self._next_reader += 1
        return usable[self._next_reader % len(usable)]

    async def _refresh(self, prefer: str | None = None, avoid: str | None = None) -> None:
        """Ask known servers, then seeds, for GetServers; the first answer is the view."""
        async with self._refresh_lock:
            candidates: list[str] = []
            for address in [
                *([prefer] if prefer else []),
                *([self._leader] if self._leader else []),
                *self._followers,
                *self._seeds,
            ]:
                if address not in candidates and address != avoid:
                    candidates.append(address)
            if avoid is not None:
                candidates.append(avoid)  # last resort: it may be back
            errors: list[str] = []
            last_cause: BaseException | None = None
            for address in candidates:
                try:
                    servers = await self._get_servers_from(address)
                except _CallFailed as failure:
                    if not failure.transient:
                        raise failure.to_error() from failure.cause
                    errors.append(f"{address}: {failure.cause!r}")
                    last_cause = failure.cause
                    continue
                if servers:
                    self._apply_view(servers)
                    return
                errors.append(f"{address}: empty server list")
            # The last cause rides along so callers (the CLI) can tell a refused connection
            # from a TLS failure without parsing the message.
            raise Unavailable("no server answered GetServers: " + "; ".join(errors)) from last_cause

    async def _refresh_quietly(self, prefer: str | None = None, avoid: str | None = None) -> None:
        """Refresh if anything answers; keep the current view otherwise."""
        try:
            await self._refresh(prefer, avoid)
        except Unavailable as exc:
            log.info("view refresh failed: %s", exc)

    def _chunks(self, values: Sequence[bytes]) -> list[Sequence[bytes]]:
        chunks: list[Sequence[bytes]] = []
        start = size = 0
        for index, value in enumerate(values):
            cost = len(value) + VALUE_FRAMING_BYTES
            if index > start and size + cost > self._max_chunk_bytes:
                chunks.append(values[start:index])
                start, size = index, 0
            size += cost
        chunks.append(values[start:])
        return chunks
