"""Asyncio driver for the SWIM core: one UDP socket and one TCP listener on the same port.

The driver only moves bytes: it seals/opens frames (AES-GCM, see `crypto`), encodes/decodes
them (`wire`), feeds the core, sends what the core queued and hands events to the handler.
Anything a peer sends that fails authentication or decoding is dropped and counted in
`stats`; it never reaches the core and never stops a loop.

Events: the optional `on_event` callback (sync function or coroutine function) receives each
`MemberEvent`, in order, from one dispatcher task, so a slow handler delays later events but
never the protocol. Handler exceptions are logged and do not stop the dispatcher.

Lifecycle: `start()` binds; `join(addrs)` push-pulls with start addresses; `leave()` announces
a graceful leave and waits (bounded) for it to spread; `stop()` closes everything at once
without notice, which is exactly what an abrupt crash looks like to the other members.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from dcl.addresses import ConnectionCap, split_host_port, tcp_listener
from dcl.membership import wire
from dcl.membership.crypto import AAD_TCP, AAD_UDP, PacketSealer
from dcl.membership.errors import (
    AuthenticationFailed,
    GossipConfigError,
    GossipKeyRequired,
    JoinFailed,
    MalformedPacket,
)
from dcl.membership.model import Addr, Member, MemberEvent, Packet, PushPull
from dcl.membership.swim import Swim, SwimConfig

log = logging.getLogger("dcl.membership")

EventHandler = Callable[[MemberEvent], Awaitable[None] | None]

_LEN = struct.Struct(">I")
MAX_PUSH_PULL_FRAME = 8 * 1024 * 1024
_BIND_ATTEMPTS = 20


#: Push-pull (TCP) connections a node serves at once; more are closed at accept.
GOSSIP_TCP_CONNECTIONS = 128


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """Everything one gossip node needs.

    `bind_addr` is an IP literal; port 0 picks a free port shared by UDP and TCP.
    `advertise_addr` is what other members use to reach us (defaults to the bound address,
    so set it when binding 0.0.0.0). `key` (16/24/32 bytes, or a keyring of such keys whose
    first seals and all open; see `crypto.load_keyring`) is required unless `insecure=True`.
    """

    node_name: str
    bind_addr: Addr
    tags: Mapping[str, str] = field(default_factory=dict)
    key: bytes | Sequence[bytes] | None = None
    insecure: bool = False
    advertise_addr: Addr | None = None
    protocol: SwimConfig = field(default_factory=SwimConfig)
    # Anti-entropy: a full-state TCP exchange with one random member this often, which heals
    # anything gossip lost (e.g. updates that ran out of retransmits during a partition).
    push_pull_interval: float = 15.0
    # Each push-pull round also retries one member declared DEAD within this window, so two
    # sides of a healed partition find each other again (Serf's reconnect, default 24 h).
    reconnect_timeout: float = 3600.0
    tcp_timeout: float = 2.0


@dataclass(slots=True)
class GossipStats:
    """Counters for operators and tests; monotonically increasing."""

    packets_received: int = 0
    packets_sent: int = 0
    auth_failures: int = 0
    malformed_packets: int = 0
    push_pulls_served: int = 0
    push_pulls_made: int = 0
    push_pull_errors: int = 0
    handler_errors: int = 0


def parse_addr(addr: str | Addr) -> Addr:
    if isinstance(addr, tuple):
        return addr
    try:
        return split_host_port(addr)
    except ValueError as exc:
        raise GossipConfigError(str(exc)) from None


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: Membership) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._owner._on_datagram(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        # ICMP port-unreachable from a crashed peer surfaces here; the probe timeout
        # already accounts for the lost datagram.
        log.debug("udp error=%s", exc)


class Membership:
    """One gossip node. All methods must be called from the event loop that ran `start`."""

    def __init__(
        self,
        config: GossipConfig,
        on_event: EventHandler | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.stats = GossipStats()
        self._on_event = on_event
        self._rng = rng or random.Random()
        self._sealer: PacketSealer | None = None
        self._swim: Swim | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._event_queue: asyncio.Queue[MemberEvent] = asyncio.Queue()
        self._addr: Addr | None = None
        #: The push-pull port's connection cap (shed counts for metrics).
        self.tcp_cap = ConnectionCap(GOSSIP_TCP_CONNECTIONS)

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        c = self.config
        if c.key is None and not c.insecure:
            raise GossipKeyRequired(
                "gossip needs a shared key (key or key file); pass insecure=True "
                "(--insecure-gossip) only on a trusted network"
            )
        if self._udp is not None or self._swim is not None:
            raise GossipConfigError("gossip already started (a Membership starts once)")
        self._sealer = PacketSealer(c.key)
        loop = asyncio.get_running_loop()
        await self._bind(loop)
        assert self._addr is not None
        try:
            self._swim = Swim(c.node_name, c.advertise_addr or self._addr, c.tags, c.protocol,
                              self._rng, loop.time())
        except BaseException:
            await self.stop()  # do not keep the ports bound on a refused start
            raise
        self._tasks = [
            asyncio.create_task(self._timer_loop(), name=f"gossip-timer-{c.node_name}"),
            asyncio.create_task(self._push_pull_loop(), name=f"gossip-pp-{c.node_name}"),
            asyncio.create_task(self._dispatch_loop(), name=f"gossip-events-{c.node_name}"),
        ]
        log.info("gossip started node=%s addr=%s:%d secure=%s", c.node_name, *self._addr,
                 self._sealer.secure)

    async def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        host, port = self.config.bind_addr
        last: OSError | None = None
        # Port 0: TCP picks a free port and UDP must get the same number, which another
        # process may hold; retry with a fresh port a bounded number of times.
        for _ in range(_BIND_ATTEMPTS if port == 0 else 1):
            # Capped: push-pulls are few and short (tcp_timeout), and a flood of
            # connections that send nothing must not use up the node's descriptors (when
            # full, the oldest connection is cut to make room).
            sock = tcp_listener(host, port, 128, self.tcp_cap)
            try:
                tcp = await asyncio.start_server(self._serve_push_pull, sock=sock)
            except BaseException:
                sock.close()
                raise
            bound = tcp.sockets[0].getsockname()
            try:
                udp, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpProtocol(self), local_addr=(host, bound[1]),
                    family=socket.AF_INET6 if ":" in host else socket.AF_INET)
            except OSError as exc:
                last = exc
                tcp.close()
                await tcp.wait_closed()
                continue
            self._tcp, self._udp = tcp, udp
            self._addr = (str(bound[0]), int(bound[1]))
            return
        raise OSError(f"cannot bind gossip UDP+TCP on {host}:{port}: {last}")

    async def stop(self) -> None:
        """Close sockets and tasks without telling anyone (peers will declare us failed)."""
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=self.config.tcp_timeout)
            if pending:
                log.warning("gossip tasks did not stop node=%s tasks=%d",
                            self.config.node_name, len(pending))
        self._tasks = []
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            # Handlers of in-flight push-pulls are bounded by tcp_timeout.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.tcp_timeout):
                    await self._tcp.wait_closed()
            self._tcp = None

    async def leave(self, timeout: float = 3.0) -> None:
        """Announce a graceful leave and wait until it was retransmitted enough (or timeout).

        Call `stop()` afterwards. Others record the member as LEFT and fire LEAVE, not FAILED.
        """
        swim = self._core()
        swim.leave()
        self._flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not swim.leave_announced() and loop.time() < deadline:
            await asyncio.sleep(swim.config.gossip_interval / 2)

    # ----------------------------------------------------------------- public API

    @property
    def addr(self) -> Addr:
        """The bound (host, port) of both the UDP and the TCP socket."""
        if self._addr is None:
            raise GossipConfigError("gossip not started")
        return self._addr

    @property
    def local_member(self) -> Member:
        return self._core().local_member

    def members(self) -> list[Member]:
        """Every known member, the local one and DEAD/LEFT tombstones included."""
        return self._core().members()

    def alive_members(self) -> list[Member]:
        """Members currently ALIVE or SUSPECT, the local one included (unless it left)."""
        swim = self._core()
        local = [swim.local_member] if not swim.leaving else []
        return sorted(local + swim.live_peers(), key=lambda m: m.name)

    def set_keys(self, keys: Sequence[bytes]) -> None:
        """Seal with the first of ``keys`` and open with any of them from the next frame on:
        how the gossip key changes on a running node (SIGHUP). Only a started node that
        already has keys takes them; an insecure one stays insecure."""
        if self._sealer is None or not self._sealer.secure:
            raise GossipConfigError("only a started gossip node with a key takes new keys")
        self._sealer = PacketSealer(keys)

    @property
    def key_fingerprints(self) -> tuple[str, ...]:
        """Fingerprints (`crypto.key_fingerprint`) of the keys in use, the sealing one first;
        empty when insecure or not started."""
        return self._sealer.fingerprints if self._sealer is not None else ()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Replace the local tags; peers fire an UPDATE event once the change reaches them."""
        self._core().set_tags(tags)
        self._flush()

    async def join(
        self, addrs: Sequence[str | Addr], *, retries: int = 3, timeout: float = 10.0
    ) -> int:
        """Push-pull with each start address; returns how many answered.

        Tries every address up to `retries` times (with a short backoff between rounds),
        stopping at the first round where at least one answered. Raises `JoinFailed` if none
        did within `timeout`.
        """
        targets = [parse_addr(a) for a in addrs]
        own = self.addr
        targets = [a for a in targets if a != own]
        if not targets:
            return 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        errors: list[str] = []
        for attempt in range(max(1, retries)):
            contacted = 0
            for a in targets:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(min(remaining, self.config.tcp_timeout)):
                        await self._push_pull(a, join=True)
                    contacted += 1
                except (OSError, TimeoutError, AuthenticationFailed, MalformedPacket) as exc:
                    errors.append(f"{a[0]}:{a[1]}: {exc!r}")
            if contacted:
                return contacted
            backoff = min(0.2 * 2**attempt, deadline - loop.time())
            if backoff <= 0:
                break
            await asyncio.sleep(backoff)
        raise JoinFailed(f"no start address answered: {'; '.join(errors[-len(targets):])}")

    # ----------------------------------------------------------------- internals

    def _core(self) -> Swim:
        if self._swim is None:
            raise GossipConfigError("gossip not started")
        return self._swim

    def _flush(self) -> None:
        swim = self._swim
        sealer = self._sealer
        if swim is None or sealer is None:
            return
        udp = self._udp
        for addr, packet in swim.take_outbox():
            if udp is None or udp.is_closing():
                break
            udp.sendto(sealer.seal(wire.encode_packet(packet), AAD_UDP), addr)
            self.stats.packets_sent += 1
        for event in swim.take_events():
            log.info("member event=%s name=%s addr=%s:%d incarnation=%d", event.kind.value,
                     event.member.name, *event.member.addr, event.member.incarnation)
            self._event_queue.put_nowait(event)

    def _on_datagram(self, data: bytes, addr: Addr) -> None:
        swim, sealer = self._swim, self._sealer
        if swim is None or sealer is None:
            return
        self.stats.packets_received += 1
        try:
            packet: Packet = wire.decode_packet(sealer.open(data, AAD_UDP))
        except AuthenticationFailed:
            self.stats.auth_failures += 1
            return
        except MalformedPacket:
            self.stats.malformed_packets += 1
            return
        swim.receive(asyncio.get_running_loop().time(), packet, addr)
        self._flush()

    async def _timer_loop(self) -> None:
        swim = self._core()
        loop = asyncio.get_running_loop()
        while True:
            swim.tick(loop.time())
            self._flush()
            # No wake-up on input is needed: the next gossip tick bounds the deadline to
            # `gossip_interval`, and input never creates a deadline nearer than that matters.
            await asyncio.sleep(max(0.0, swim.next_deadline() - loop.time()))

    async def _push_pull_loop(self) -> None:
        swim = self._core()
        interval = self.config.push_pull_interval
        while True:
            # Jitter so a cluster started at once does not exchange full state in waves.
            await asyncio.sleep(interval * (0.5 + self._rng.random()))
            now = asyncio.get_running_loop().time()
            for target in (swim.push_pull_target(),
                           swim.reconnect_target(now, self.config.reconnect_timeout)):
                if target is None:
                    continue
                try:
                    async with asyncio.timeout(self.config.tcp_timeout):
                        await self._push_pull(target.addr, join=False)
                except (OSError, TimeoutError, AuthenticationFailed, MalformedPacket) as exc:
                    self.stats.push_pull_errors += 1
                    log.debug("push-pull failed peer=%s error=%r", target.name, exc)

    async def _dispatch_loop(self) -> None:
        while True:
            event = await self._event_queue.get()
            if self._on_event is None:
                continue
            try:
                result = self._on_event(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # a buggy handler must not silence later events
                self.stats.handler_errors += 1
                log.exception("gossip event handler failed event=%s", event.kind.value)

    async def _read_frame(self, reader: asyncio.StreamReader) -> bytes:
        (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
        if size > MAX_PUSH_PULL_FRAME:
            raise MalformedPacket(f"push-pull frame of {size} bytes")
        return await reader.readexactly(size)

    def _frame(self, pp: PushPull) -> bytes:
        assert self._sealer is not None
        sealed = self._sealer.seal(wire.encode_push_pull(pp), AAD_TCP)
        return _LEN.pack(len(sealed)) + sealed

    def _local_push_pull(self, join: bool) -> PushPull:
        swim = self._core()
        return PushPull(swim.name, join, swim.local_state())

    async def _push_pull(self, addr: Addr, *, join: bool) -> None:
        reader, writer = await asyncio.open_connection(addr[0], addr[1])
        try:
            writer.write(self._frame(self._local_push_pull(join)))
            await writer.drain()
            assert self._sealer is not None
            remote = wire.decode_push_pull(self._sealer.open(await self._read_frame(reader),
                                                             AAD_TCP))
        except asyncio.IncompleteReadError as exc:
            raise MalformedPacket("push-pull reply truncated") from exc
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        self._core().merge_remote_state(asyncio.get_running_loop().time(), remote.members)
        self.stats.push_pulls_made += 1
        self._flush()

    async def _serve_push_pull(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            async with asyncio.timeout(self.config.tcp_timeout):
                frame = await self._read_frame(reader)
                assert self._sealer is not None
                remote = wire.decode_push_pull(self._sealer.open(frame, AAD_TCP))
                # Merge before replying, so the reply already carries any refutation their
                # view of us provoked: one exchange then heals both sides.
                self._core().merge_remote_state(asyncio.get_running_loop().time(),
                                                remote.members)
                writer.write(self._frame(self._local_push_pull(remote.join)))
                self.stats.push_pulls_served += 1
                self._flush()
                await writer.drain()
        except AuthenticationFailed:
            self.stats.auth_failures += 1
        except (MalformedPacket, asyncio.IncompleteReadError):
            self.stats.malformed_packets += 1
        except (OSError, TimeoutError) as exc:
            self.stats.push_pull_errors += 1
            log.debug("push-pull serve failed error=%r", exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
