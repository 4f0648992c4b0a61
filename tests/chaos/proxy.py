"""A fault-injecting TCP proxy for one directed node-to-node link (A dials B through it).

The proxy is byte-level: mutual TLS runs end to end through it, so it can delay, hold or cut a
connection but never read or forge a message. One `LinkProxy` per directed link A->B carries the
connections A opens to B (A's Raft messages to B, and B's HTTP/2 replies on them); B's messages
to A travel on B's own link B->A. So blocking A->B alone is one-way loss.

Modes, switchable at any time from the harness's event loop:
  * pass: forward as soon as bytes arrive (after `delay`, if set).
  * hold (blackhole): stop reading both sides, so TCP back-pressure stalls the sender, and accept
    new connections without dialling on; on heal the held bytes flow again, as after a real
    partition shorter than TCP's retransmission timeout.
  * reject: close every connection now and every new one at once (a peer that answers RST).
  * drop_probability: per forwarded chunk, close the connection on a seeded coin (flaky link).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass, field

__all__ = ["LinkProxy", "LinkState"]

log = logging.getLogger("tests.chaos.proxy")

_CHUNK = 64 * 1024


@dataclass
class LinkState:
    """What the link does to bytes now; `LinkProxy.set` replaces it as a whole."""

    hold: bool = False
    reject: bool = False
    delay: float = 0.0
    jitter: float = 0.0
    drop_probability: float = 0.0

    @property
    def healthy(self) -> bool:
        return self == LinkState()


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def close(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class LinkProxy:
    """Listens on 127.0.0.1:`port` (0 = pick one) and forwards to `target_port`."""

    def __init__(self, name: str, target_port: int, *, seed: int, port: int = 0) -> None:
        self.name = name
        self.target_port = target_port
        self.port = port
        self.state = LinkState()
        self._rng = random.Random(seed)
        self._open = asyncio.Event()
        self._open.set()
        self._connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self.accepted = 0
        self.dropped = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._open.set()
        for conn in list(self._connections):
            conn.close()
        self._connections.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    def set(self, state: LinkState) -> None:
        self.state = state
        if state.hold:
            self._open.clear()
        else:
            self._open.set()
        if state.reject:
            self.close_connections()

    def heal(self) -> None:
        self.set(LinkState())

    def close_connections(self) -> None:
        for conn in list(self._connections):
            conn.close()
        self._connections.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.state.reject:
            writer.transport.abort()
            return
        conn = _Connection(writer)
        self._connections.add(conn)
        try:
            await self._open.wait()  # a held link accepts but does not dial on
            if self.state.reject or conn not in self._connections:
                return
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                return
            conn.upstream = up_writer
            loop = asyncio.get_running_loop()
            conn.tasks = [
                loop.create_task(self._pipe(conn, reader, up_writer)),
                loop.create_task(self._pipe(conn, up_reader, writer)),
            ]
            await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(conn)
            conn.close()

    async def _pipe(self, conn: _Connection, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        """Forward one direction in order; a delay shifts every chunk, never reorders them."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._open.wait()
                writer.write(data)
                await writer.drain()

        sender = loop.create_task(deliver())
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                await self._open.wait()
                state = self.state
                if state.drop_probability and self._rng.random() < state.drop_probability:
                    self.dropped += 1
                    break
                delay = state.delay + (self._rng.uniform(0, state.jitter) if state.jitter else 0)
                await queue.put((loop.time() + delay, data))
            await queue.put(None)
            await sender
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sender.cancel()
            conn.close()
