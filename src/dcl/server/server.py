"""DclServer: a grpclib server with mutual TLS, per-call authorization and error mapping.

Every call passes through one wrapper, installed by a ``RecvRequest`` event hook: it checks
the caller's certificate CN against the ACL once (never per record) and turns any exception
the handler raises into a status via dcl.server.errors. Each RPC method must map to an ACL
action; a handler whose method has none is refused at construction, so adding a service can
never silently open an unauthenticated door.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import ssl
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast

import grpclib.server
from google.protobuf.message import DecodeError
from grpclib.const import Cardinality, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.health.check import ServiceCheck
from grpclib.health.service import OVERALL, Health
from grpclib.protocol import H2Protocol
from grpclib.server import Server, Stream

from dcl.addresses import ConnectionCap, join_host_port, tcp_listener
from dcl.errors import Unavailable
from dcl.metrics import Counter, Histogram, HistogramChild
from dcl.server.acl import Action, Authorizer
from dcl.server.backend import Backend
from dcl.server.errors import grpc_status, send_error
from dcl.server.framing import CorkedTransport
from dcl.server.services import BatchService, Limits, LogService
from dcl.tls import peer_common_name

if TYPE_CHECKING:
    from grpclib._typing import IProtoMessage, IServable, IServerMethodFunc

__all__ = ["METHOD_ACTIONS", "SERVICE_ACTIONS", "DclServer", "MessageLimitCodec", "build_server"]

log = logging.getLogger(__name__)

#: Authenticated only: any certificate the CA signed may call these (health probes).
AUTHENTICATED: None = None

#: What a method needs: one action, any one of several, or only a valid certificate.
ActionRule = Action | tuple[Action, ...] | None

METHOD_ACTIONS: Mapping[str, ActionRule] = {
    "/log.v1.Log/Produce": Action.PRODUCE,
    "/log.v1.Log/ProduceStream": Action.PRODUCE,
    "/log.v1.Log/Consume": Action.CONSUME,
    "/log.v1.Log/ConsumeStream": Action.CONSUME,
    # Discovery: every client needs it to find the leader, so either right suffices.
    "/log.v1.Log/GetServers": (Action.PRODUCE, Action.CONSUME),
    "/dcl.v1.Batch/ProduceBatch": Action.PRODUCE,
    "/dcl.v1.Batch/ConsumeBatch": Action.CONSUME,
    "/dcl.v1.Batch/ConsumeBatchStream": Action.CONSUME,
}

#: Whole-service defaults, for services whose every method needs the same right.
SERVICE_ACTIONS: Mapping[str, ActionRule] = {
    "/dcl.v1.Admin/": Action.ADMIN,
    "/dcl.v1.Raft/": Action.PEER,
    "/grpc.health.v1.Health/": AUTHENTICATED,
}

#: A client's cancel this close to the call's deadline (at most this long, and at most this
#: share of the call's whole timeout) is counted as DEADLINE_EXCEEDED in dcl_rpc_calls_total:
#: it is the client's own deadline, which ran ahead of ours.
DEADLINE_SLACK_SECONDS = 0.25
DEADLINE_SLACK_SHARE = 0.2

#: How long DclServer.close waits for the calls it cancelled to end.
CLOSE_TIMEOUT_SECONDS = 5.0

#: Seconds a new connection has to finish its TLS handshake (asyncio's default is 60: a
#: connection that sends nothing would hold its socket that long).
HANDSHAKE_TIMEOUT_SECONDS = 10.0

#: The most connections the RPC port takes by default: each one asyncio is starting TLS
#: on holds a 256 KiB buffer (about 300 KiB in all, measured), so 4096 silent ones hold
#: about 1.2 GiB.
MAX_CONNECTIONS_DEFAULT_CEILING = 4096

#: Connections the kernel queues for accept (asyncio's create_server listens again with its
#: own, 100 by default: a burst past it waits a SYN retry, 1 s).
LISTEN_BACKLOG = 1024

#: Room for protobuf framing around a maximum-size record.
MESSAGE_OVERHEAD_BYTES = 64 * 1024

#: How much larger than a client message a peer's message may be (see build_server). Senders
#: keep their batches below this (dcl.server.raft_transport.BATCH_BYTES), so a batch that
#: carries the largest possible entry still fits.
PEER_MESSAGE_HEADROOM_BYTES = 2 << 20


class MessageLimitCodec(ProtoCodec):
    """ProtoCodec that refuses oversized and malformed messages with a proper status.

    grpclib 0.4 has no max-message-size setting. The limit is enforced twice: from the gRPC
    header before any body is read (`_bounded_recv_message`), and here on what was read.
    `type_limits` gives some message types their own limit (peers' Raft batches).
    """

    def __init__(
        self, max_message_bytes: int, type_limits: Mapping[type, int] | None = None
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.type_limits = dict(type_limits or {})

    def limit_for(self, message_type: type) -> int:
        return self.type_limits.get(message_type, self.max_message_bytes)

    def decode(self, data: bytes, message_type: type[IProtoMessage]) -> IProtoMessage:
        limit = self.limit_for(message_type)
        if len(data) > limit:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"message of {len(data)} bytes exceeds the limit of {limit}",
            )
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, f"malformed message: {exc}") from None


_grpclib_recv_message = grpclib.server.recv_message  # type: ignore[attr-defined]


async def _bounded_recv_message(
    stream: Any, codec: Any, message_type: type[IProtoMessage]
) -> IProtoMessage | None:
    """grpclib's server-side message read, refusing an oversized message from its header.

    grpclib reads (and acknowledges, so the peer may keep sending) a message's whole declared
    length before decoding it, so a caller declaring a gigabyte would make the server buffer a
    gigabyte. With a MessageLimitCodec the 5-byte gRPC header is checked first and the call
    fails with RESOURCE_EXHAUSTED before any of the body is read.
    """
    if not isinstance(codec, MessageLimitCodec):
        return await _grpclib_recv_message(stream, codec, message_type)
    limit = codec.limit_for(message_type)
    header = await stream.recv_data(5)
    if not header:
        return None
    if len(header) < 5:
        raise GRPCError(Status.INVALID_ARGUMENT, "truncated gRPC message header")
    if header[0]:
        raise GRPCError(Status.UNIMPLEMENTED, "compressed messages are not supported")
    length = int.from_bytes(header[1:5], "big")
    if length > limit:
        raise GRPCError(
            Status.RESOURCE_EXHAUSTED, f"message of {length} bytes exceeds the limit of {limit}"
        )
    body = await stream.recv_data(length)
    if len(body) != length:
        raise GRPCError(Status.INVALID_ARGUMENT, "truncated gRPC message")
    return codec.decode(body, message_type)


# Installed for every grpclib server in the process; it only changes behaviour for servers
# whose codec carries a limit (DclServer's), and grpclib is pinned to a minor range.
grpclib.server.recv_message = _bounded_recv_message  # type: ignore[attr-defined,assignment]


def default_max_connections() -> int:
    """Connections a server takes when not told: half the process's open-file limit, at
    most MAX_CONNECTIONS_DEFAULT_CEILING. The other half stays for the node's own files
    (segments, snapshots), its peer dials and gossip."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS_DEFAULT_CEILING
    return max(16, min(MAX_CONNECTIONS_DEFAULT_CEILING, soft // 2))


def _action_for(method: str, actions: Mapping[str, ActionRule]) -> ActionRule:
    if method in actions:
        return actions[method]
    for prefix, action in actions.items():
        if prefix.endswith("/") and method.startswith(prefix):
            return action
    raise ValueError(f"no ACL action for RPC method {method}; add it to the method actions")


class _CorkedH2Protocol(H2Protocol):
    def __init__(self, base: H2Protocol, connections: set[asyncio.Transport],
                 cap: ConnectionCap | None) -> None:
        super().__init__(base.handler, base.config, base.h2_config)
        self._connections = connections
        self._cap = cap
        self._transport: asyncio.Transport | None = None
        self._corked: CorkedTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called once TLS is up: from now on the cap does not cut this one to make room.
        sock = transport.get_extra_info("socket")
        if self._cap is not None and sock is not None:
            self._cap.established(sock.fileno())
        self._transport = cast(asyncio.Transport, transport)
        self._connections.add(self._transport)
        self._corked = CorkedTransport(self._transport)
        super().connection_made(cast(asyncio.BaseTransport, self._corked))  # duck-typed

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._corked is not None:
            self._corked.pause()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._corked is not None:
            self._corked.resume()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._transport is not None:
            self._connections.discard(self._transport)
        if self._corked is not None:
            self._corked.lost()
        super().connection_lost(exc)


class _CorkedServer(Server):
    """grpclib's Server with every connection's writes coalesced per loop turn
    (dcl.server.framing.CorkedTransport): fewer TLS records and syscalls per call; and
    the open connections known (`connections`), so a reload can close some."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: set[asyncio.Transport] = set()
        #: The listening socket's cap, told when a connection's handshake is done.
        self.cap: ConnectionCap | None = None

    def _protocol_factory(self) -> H2Protocol:
        return _CorkedH2Protocol(super()._protocol_factory(), self.connections, self.cap)

    async def serve(self, sock: socket.socket, ssl_context: ssl.SSLContext,
                    handshake_timeout: float) -> None:
        """grpclib's `start` on our socket, with a TLS handshake timeout (grpclib passes
        none, and asyncio's default lets a silent connection hold its socket for 60 s).
        Sets the two attributes grpclib's start sets; grpclib is pinned to a minor range."""
        if self._server is not None:
            raise RuntimeError("server is already started")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol_factory, sock=sock, ssl=ssl_context, backlog=LISTEN_BACKLOG,
            ssl_handshake_timeout=handshake_timeout)
        self._server_closed_fut = loop.create_future()


class DclServer:
    """A started-on-demand grpclib server on host:port (port 0 picks a free port)."""

    def __init__(
        self,
        handlers: Collection[IServable],
        *,
        ssl_context: ssl.SSLContext,
        authorizer: Authorizer,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_bytes: int = (4 << 20) + MESSAGE_OVERHEAD_BYTES,
        method_actions: Mapping[str, ActionRule] | None = None,
        type_limits: Mapping[type, int] | None = None,
        connection_cap: ConnectionCap | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_SECONDS,
    ):
        """``connection_cap``: how many connections may be open at once, in all and from
        one host (see dcl.addresses.ConnectionCap); ``handshake_timeout``: seconds a new
        connection has to finish its TLS handshake."""
        actions = {**METHOD_ACTIONS, **SERVICE_ACTIONS, **(method_actions or {})}
        self._authorizer = authorizer
        self._calls: dict[asyncio.Task[Any], str] = {}  # running call -> its method
        self._closing = False
        self._guarded: dict[str, IServerMethodFunc] = {}
        self.calls_total = Counter(
            "dcl_rpc_calls_total", "RPC calls finished, by method and gRPC status code.",
            ("method", "code"))
        self.call_seconds = Histogram(
            "dcl_rpc_duration_seconds",
            "Time from a unary call's arrival to its answer, by method (streams: see the count).",
            ("method",))
        for handler in handlers:
            for method, spec in handler.__mapping__().items():
                self.calls_total.inc((method, "OK"), 0)  # a rate() from the first call on
                timer = (self.call_seconds.labels(method)
                         if spec.cardinality is Cardinality.UNARY_UNARY else None)
                self._guarded[method] = self._guard(
                    spec.func, _action_for(method, actions), method, timer)
        self._ssl_context = ssl_context
        self._host = host
        self.connection_cap = connection_cap or ConnectionCap(default_max_connections())
        self._handshake_timeout = handshake_timeout
        #: Seconds close() waits for cancelled calls to end.
        self.close_timeout = CLOSE_TIMEOUT_SECONDS
        #: After close(): methods of calls that were still running when it gave up on them
        #: (a process should then exit without waiting for them: asyncio.run would).
        self.left_running: list[str] = []
        self._requested_port = port
        self._port: int | None = None
        self.grpc = _CorkedServer(
            handlers, codec=MessageLimitCodec(max_message_bytes, type_limits)
        )
        self.grpc.cap = self.connection_cap
        listen(self.grpc, RecvRequest, self._on_request)

    async def _on_request(self, event: RecvRequest) -> None:
        event.method_func = self._guarded[event.method_name]

    def _guard(self, func: IServerMethodFunc, action: ActionRule, method: str,
               timer: HistogramChild | None) -> IServerMethodFunc:
        """Wrap a handler: authorize once, map errors, end cleanly on shutdown; count the
        call by its status and time it if unary (`timer`: a histogram child, or None)."""
        authorizer, calls, counted = self._authorizer, self._calls, self.calls_total
        clock = time.perf_counter

        async def guarded(stream: Stream[Any, Any]) -> None:
            task = asyncio.current_task()
            assert task is not None  # grpclib runs every call in its own task
            calls[task] = method
            started = clock()
            code = "OK"
            try:
                if action is not None:
                    authorizer.authorize(peer_common_name(stream), action)
                await func(stream)
            except GRPCError as exc:
                code = exc.status.name
                raise  # already a status: grpclib sends it
            except StreamTerminatedError:
                code = "CANCELLED"
                raise  # the client is gone
            except asyncio.CancelledError:
                # grpclib cancels the handler for a client's cancel and for an expired
                # deadline alike; the client sees DEADLINE_EXCEEDED for the latter. Its
                # clock started first, by the time the request took to reach us, so its
                # reset often comes just before our deadline (0.5-9 ms seen on a loaded
                # machine): a cancel that close to the deadline is the deadline.
                deadline = stream.deadline
                code = "CANCELLED"
                if deadline is not None:
                    left = deadline.time_remaining()
                    if left <= min(DEADLINE_SLACK_SECONDS,
                                   DEADLINE_SLACK_SHARE * (clock() - started + left)):
                        code = "DEADLINE_EXCEEDED"
                if not self._closing:
                    raise  # client cancel or deadline: grpclib answers for it
                code = "UNAVAILABLE"
                # Our own shutdown: tell the client so it can fail over, instead of hanging.
                if not await send_error(stream, Unavailable("server is shutting down")):
                    # The client reset the stream meanwhile (grpclib cancelled us for it):
                    # finish as a cancel, or grpclib logs its "Failed to handle
                    # cancellation" ERROR with a traceback.
                    raise
            except Exception as exc:
                code = grpc_status(exc)[0].name
                await send_error(stream, exc)
            finally:
                calls.pop(task, None)
                counted.inc((method, code))
                if timer is not None:
                    timer.observe(clock() - started)

        return guarded

    def close_connections(self, certificate_refused: Callable[[bytes], bool]) -> int:
        """Close every open connection whose client certificate (DER) is refused; returns
        how many. After a reload took a CA out of the CA file, so that its certificates,
        refused from then on, do not keep a connection opened before: its calls end, and
        the client's next connection is refused at the handshake."""
        closed = 0
        for transport in list(self.grpc.connections):
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            if der is not None and certificate_refused(der):
                # abort, not close: a TLS close waits (up to 30 s) for a client that may
                # never answer, and grpclib's calls on it run until then.
                transport.abort()
                closed += 1
        return closed

    async def start(self) -> None:
        # Bind ourselves so the chosen port is known without reaching into grpclib internals.
        sock = tcp_listener(self._host, self._requested_port, LISTEN_BACKLOG,
                            self.connection_cap)
        try:
            await self.grpc.serve(sock, self._ssl_context, self._handshake_timeout)
        except BaseException:
            sock.close()
            raise
        self._port = int(sock.getsockname()[1])
        log.info("rpc server listening addr=%s", self.address)

    @property
    def active_calls(self) -> int:
        """Calls currently inside a handler (tail-following streams included)."""
        return len(self._calls)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` as clients should dial it (IPv6 hosts in brackets)."""
        return join_host_port(self._host, self.port)

    async def close(self) -> None:
        """End running calls with UNAVAILABLE (tail-following streams included), stop serving.

        Connections themselves are left for clients to close: grpclib 0.4 exposes no handle
        on them. New calls that race with shutdown are cancelled by grpclib.

        Bounded by `close_timeout`: a handler that does not end when cancelled (a bug, or a
        library that swallowed the cancel) is logged, named in `left_running` and left
        behind, so a node's shutdown cannot hang on it.
        """
        if self._port is None:
            return
        self._closing = True
        calls = dict(self._calls)
        for task in calls:
            task.cancel()
        try:
            async with asyncio.timeout(self.close_timeout):
                if calls:  # first: each answers UNAVAILABLE on its still-open stream
                    await asyncio.wait(list(calls))
                self.grpc.close()
                await self.grpc.wait_closed()
        except TimeoutError:
            self.grpc.close()  # again if it was grpclib's wait that ran out: harmless
            self.left_running = (sorted(m for t, m in self._calls.items() if not t.done())
                                 or ["(grpclib's)"])
            log.warning("rpc server closed with calls still running %.1f s after they were "
                        "cancelled: %s", self.close_timeout, ", ".join(self.left_running))
        self._port = None

    async def __aenter__(self) -> DclServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def build_server(
    backend: Backend,
    *,
    ssl_context: ssl.SSLContext,
    authorizer: Authorizer,
    host: str = "127.0.0.1",
    port: int = 0,
    limits: Limits | None = None,
    extra_handlers: Iterable[IServable] = (),
    extra_actions: Mapping[str, ActionRule] | None = None,
    peer_message_types: Iterable[type] = (),
    health_check_ttl: float = 0.5,
    connection_cap: ConnectionCap | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT_SECONDS,
) -> DclServer:
    """The standard node server: log.v1.Log, dcl.v1.Batch and grpc.health.v1 over backend.

    Health is SERVING while the backend has a leader (i.e. writes can succeed). Pass the
    Raft/Admin services as ``extra_handlers``; their methods need entries in METHOD_ACTIONS,
    SERVICE_ACTIONS or ``extra_actions``. ``peer_message_types`` (Raft batches) may be
    PEER_MESSAGE_HEADROOM_BYTES larger than a client message: one of them wraps an entry made
    from a maximum-size client request together with Raft framing and other messages.
    """
    limits = limits or Limits()
    client_limit = limits.max_record_bytes + MESSAGE_OVERHEAD_BYTES
    log_service = LogService(backend, limits)

    async def leader_known() -> bool:
        return backend.has_leader

    check = ServiceCheck(leader_known, check_ttl=health_check_ttl, check_timeout=1.0)
    health = Health({OVERALL: [check], log_service: [check]})
    return DclServer(
        [log_service, BatchService(backend, limits), health, *extra_handlers],
        ssl_context=ssl_context,
        authorizer=authorizer,
        host=host,
        port=port,
        max_message_bytes=client_limit,
        method_actions=extra_actions,
        type_limits={t: client_limit + PEER_MESSAGE_HEADROOM_BYTES for t in peer_message_types},
        connection_cap=connection_cap,
        handshake_timeout=handshake_timeout,
    )
