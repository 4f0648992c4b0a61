"""The metrics endpoint: ``GET /metrics`` over HTTP/1.1 with mutual TLS, for Prometheus.

Its own port (as NATS' monitoring port and etcd's ``--listen-metrics-urls``): Prometheus
scrapes HTTP/1.1, and the RPC port speaks only HTTP/2. The TLS rules are the RPC port's: a
client certificate signed by the cluster CA, or no handshake at all; and the certificate's CN
needs the ACL action ``metrics`` (or ``admin``). Prometheus presents one with its scrape
config's ``tls_config`` (``cert_file``, ``key_file``, ``ca_file``).

One request per connection, answered and closed: a scrape every few seconds gains nothing
from keep-alive. No client can hold more than `MAX_CONNECTIONS` sockets, nor any for long:
the count starts at accept (TLS is started after it, so half-done handshakes count too) and
past it new connections are closed unread; a connection must finish its handshake and send a
whole request head (at most `MAX_HEAD_BYTES`) within `READ_TIMEOUT_SECONDS` each, and read
its answer within as long, or it is dropped (a late head gets a 408).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from http import HTTPStatus
from typing import cast

from dcl.addresses import join_host_port, tcp_listener
from dcl.errors import PermissionDenied
from dcl.metrics import CONTENT_TYPE, Registry
from dcl.server.acl import Action, Authorizer
from dcl.tls import common_name

__all__ = ["MAX_CONNECTIONS", "MAX_HEAD_BYTES", "READ_TIMEOUT_SECONDS", "MetricsServer"]

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 8192
READ_TIMEOUT_SECONDS = 5.0
#: Connections served at once; more are closed unread (a scraper needs one at a time).
MAX_CONNECTIONS = 32
#: Who may scrape: the dedicated right, or an administrator.
SCRAPE_ACTIONS = (Action.METRICS, Action.ADMIN)


class MetricsServer:
    """Serves `registry.render()` at /metrics on host:port (port 0: a free one)."""

    def __init__(
        self,
        registry: Registry,
        *,
        ssl_context: ssl.SSLContext,
        authorizer: Authorizer,
        host: str = "127.0.0.1",
        port: int = 0,
        read_timeout: float = READ_TIMEOUT_SECONDS,
    ):
        self._registry = registry
        self._ssl_context = ssl_context
        self._authorizer = authorizer
        self._host = host
        self._requested_port = port
        self._read_timeout = read_timeout
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self) -> None:
        sock = tcp_listener(self._host, self._requested_port, 64)
        try:
            # Plain TCP here, TLS per connection (`_serve`): see the module docstring.
            self._server = await asyncio.get_running_loop().create_server(
                lambda: _ReadAfterTls(asyncio.StreamReader(limit=MAX_HEAD_BYTES),
                                      self._connection), sock=sock)
        except BaseException:
            sock.close()
            raise
        self._port = int(sock.getsockname()[1])
        log.info("metrics endpoint listening addr=%s", self.address)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("metrics server not started")
        return self._port

    @property
    def active_connections(self) -> int:
        return len(self._connections)

    @property
    def address(self) -> str:
        return join_host_port(self._host, self.port)

    async def close(self) -> None:
        """Stop listening and drop every connection, answered or not."""
        if self._server is None:
            return
        self._closing = True
        self._server.close()
        while self._connections:  # again if a cancel was lost (3.11's wait_for can lose one)
            for task in self._connections:
                task.cancel()
            await asyncio.wait(list(self._connections), timeout=1.0)
        await self._server.wait_closed()
        self._server = None
        self._port = None

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._closing or len(self._connections) >= MAX_CONNECTIONS:
            writer.transport.abort()  # a flood, or shutting down: refuse unread
            return
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._connections.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancel that comes as
        # the awaited step completes, and close() would wait on the connection for nothing.
        try:
            async with asyncio.timeout(self._read_timeout):
                await writer.start_tls(self._ssl_context)
            answer = await self._answer(reader, writer)
            lines = [f"HTTP/1.1 {answer.status.value} {answer.status.phrase}",
                     f"Content-Type: {answer.content_type}",
                     f"Content-Length: {len(answer.body)}", "Connection: close",
                     *answer.extra_headers]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            if not answer.head_only:
                writer.write(answer.body)
            # A client that does not read its answer must not hold the connection forever.
            async with asyncio.timeout(self._read_timeout):
                await writer.drain()
            writer.close()
            async with asyncio.timeout(1.0):
                await writer.wait_closed()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError):
            writer.transport.abort()  # the client went away, broke TLS or stalled
        except asyncio.CancelledError:
            # close(): end quietly. This is the task's outermost work, and Python 3.11's
            # start_server logs a connection task that ends cancelled as an ERROR.
            writer.transport.abort()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> _Answer:
        try:
            async with asyncio.timeout(self._read_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            return _error(HTTPStatus.REQUEST_TIMEOUT, "no complete request head in time")
        except asyncio.LimitOverrunError:
            return _error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                          f"request head over {MAX_HEAD_BYTES} bytes")
        request_line = head.split(b"\r\n", 1)[0]
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _error(HTTPStatus.BAD_REQUEST, "malformed request line")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        head_only = method == b"HEAD"
        if method not in (b"GET", b"HEAD"):
            return _error(HTTPStatus.METHOD_NOT_ALLOWED, "use GET", ("Allow: GET, HEAD",))
        if target != b"/metrics":
            return _error(HTTPStatus.NOT_FOUND, "metrics are at /metrics", head_only=head_only)
        subject = common_name(writer.get_extra_info("peercert"))
        try:
            self._authorizer.authorize(subject, SCRAPE_ACTIONS)
        except PermissionDenied as exc:
            return _error(HTTPStatus.FORBIDDEN, f"permission denied: {exc}", head_only=head_only)
        try:
            text = self._registry.render()
        except Exception:
            # A collector failed (e.g. the log closed under a scrape at shutdown): say so,
            # rather than drop the connection unanswered.
            log.exception("metrics scrape failed")
            return _error(HTTPStatus.INTERNAL_SERVER_ERROR, "metrics could not be collected",
                          head_only=head_only)
        return _Answer(HTTPStatus.OK, text, CONTENT_TYPE, head_only=head_only)


class _ReadAfterTls(asyncio.StreamReaderProtocol):
    """Reads nothing until `StreamWriter.start_tls` (which resumes reading): the client's
    handshake bytes, read as plain data before it, would be lost to TLS."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        cast(asyncio.Transport, transport).pause_reading()


@dataclass(frozen=True, slots=True)
class _Answer:
    status: HTTPStatus
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    extra_headers: tuple[str, ...] = ()
    #: HEAD: the headers GET would send (Content-Length included), without the body.
    head_only: bool = False


def _error(status: HTTPStatus, message: str, extra_headers: tuple[str, ...] = (),
           head_only: bool = False) -> _Answer:
    return _Answer(status, f"{message}\n".encode(), extra_headers=extra_headers,
                   head_only=head_only)
