"""Raft messages over gRPC on the client API's port, and the Admin service.

Sending: one long-lived `dcl.v1.Raft/Send` client stream per peer, fed from a bounded queue
by a task that drains what is queued into RaftBatches of about `BATCH_BYTES` each, so a burst
of messages costs one HTTP/2 frame sequence, not one RPC each. The bound matters: the
receiver refuses a message over its limit and ends the stream, and every message in that
batch would be lost to a heartbeat's round of retransmission, again and again. Delivery is
best effort: when the stream breaks the queued messages are dropped (Raft retransmits) and
the task reconnects with backoff. Receiving: the Raft service steps each message into the
local driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from grpclib.client import Channel
from grpclib.client import Stream as ClientStream
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from dcl.addresses import split_host_port
from dcl.api.dcl.v1 import admin_pb2, raft_grpc, raft_pb2
from dcl.api.dcl.v1.admin_grpc import AdminBase
from dcl.batching import runs_within
from dcl.errors import DclError, InvalidRequest, NotLeader, Unavailable
from dcl.raft.driver import RaftDriver
from dcl.raft.types import ConfChange, ConfChangeType, Message, ProposalDropped, Role
from dcl.raft.wire import decode_message, encode_message_into, payload_bytes
from dcl.server.replicated import ReplicatedBackend, encode_address_cmd

__all__ = ["BATCH_BYTES", "AdminService", "ConfigState", "GrpcTransport", "RaftService"]

log = logging.getLogger(__name__)

_QUEUE_LIMIT = 8192

_REFUSALS = frozenset({Status.PERMISSION_DENIED, Status.UNAUTHENTICATED,
                       Status.RESOURCE_EXHAUSTED, Status.INVALID_ARGUMENT, Status.UNIMPLEMENTED})

#: Payload bytes per RaftBatch: a message larger than this goes alone. Receivers accept
#: dcl.server.server.PEER_MESSAGE_HEADROOM_BYTES more than a client message, which covers
#: this plus one entry built from the largest client request.
BATCH_BYTES = 1 << 20


class _Peer:
    def __init__(self, peer_id: str, transport: GrpcTransport) -> None:
        self.id = peer_id
        self._transport = transport
        self.queue: list[Message] = []
        self.ready = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"raft-peer-{peer_id}")

    def push(self, messages: Sequence[Message]) -> None:
        self.queue.extend(messages)
        if len(self.queue) > _QUEUE_LIMIT:  # peer is down: keep the newest, Raft resends
            del self.queue[: len(self.queue) - _QUEUE_LIMIT]
        self.ready.set()

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            addr = self._transport.dial_address(self.id)
            if not addr:
                self.queue.clear()
                self.ready.clear()
                await self.ready.wait()
                continue
            channel: Channel | None = None
            generation = self._transport.generation  # before the handshake it vouches for
            try:
                # Inside the try: an address that does not parse (from an older version's
                # Raft state, say) must not end this task, or the peer never hears from us.
                channel = Channel(*split_host_port(addr), ssl=self._transport.ssl_context)
                stub = raft_grpc.RaftStub(channel)
                async with stub.Send.open() as stream:
                    await stream.send_request()
                    backoff = 0.05
                    await self._send_until_moved(stream, addr, generation)
                    # The peer moved (or a redial): end this call without waiting for an
                    # answer the receiver only gives once the stream ends, and dial again.
                    await stream.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A refusal (ACL, message limit) is a set-up fault and worth an operator's
                # eye; a peer that is down or restarting is routine.
                refused = isinstance(exc, GRPCError) and exc.status in _REFUSALS
                log.log(logging.WARNING if refused else logging.DEBUG,
                        "raft stream to %s (%s) failed: %r", self.id, addr, exc)
                self.queue.clear()  # Raft retransmits what mattered
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            finally:
                if channel is not None:
                    channel.close()

    async def _send_until_moved(
        self, stream: ClientStream[raft_pb2.RaftBatch, raft_pb2.RaftSendSummary], addr: str,
        generation: int,
    ) -> None:
        """Send what is queued, batch by batch, until the peer's address changes or
        `GrpcTransport.redial` is called (what is queued then stays for the next stream)."""
        while True:
            if not self.queue:
                self.ready.clear()
                await self.ready.wait()
            if (self._transport.dial_address(self.id) != addr
                    or self._transport.generation != generation):
                return
            queued, self.queue = self.queue, []
            src_addr = self._transport.local_addr
            sent = 0
            for run in runs_within(queued, payload_bytes, BATCH_BYTES):
                if self._transport.generation != generation:  # redialled mid-way
                    self.queue[:0] = queued[sent:]
                    return
                out = raft_pb2.RaftBatch()
                for m in run:
                    encode_message_into(out.messages.add(), m, src_addr)
                await stream.send_message(out)
                sent += len(run)


class GrpcTransport:
    """dcl.raft.driver.Transport over per-peer gRPC streams."""

    def __init__(self, ssl_context: ssl.SSLContext, local_addr: str,
                 address_of: Callable[[str], str | None],
                 dial_overrides: Mapping[str, str] | None = None) -> None:
        self.ssl_context = ssl_context
        self.local_addr = local_addr
        self.address_of = address_of
        #: peer id -> host:port dialled instead of the peer's advertised address (a proxy in
        #: front of the link, as the chaos harness uses); the advertised address is unchanged.
        self.dial_overrides = dict(dial_overrides or {})
        self._peers: dict[str, _Peer] = {}
        #: Bumped by `redial`: a stream opened under an older one ends.
        self.generation = 0

    def dial_address(self, peer_id: str) -> str | None:
        return self.dial_overrides.get(peer_id) or self.address_of(peer_id)

    def send(self, messages: Sequence[Message]) -> None:
        by_peer: dict[str, list[Message]] = {}
        for m in messages:
            by_peer.setdefault(m.dst, []).append(m)
        for dst, msgs in by_peer.items():
            peer = self._peers.get(dst)
            if peer is None:
                peer = self._peers[dst] = _Peer(dst, self)
            peer.push(msgs)

    def redial(self) -> None:
        """Open every peer's stream anew, with the TLS context as it is now: after a reload
        took a CA out of the CA file, a peer connection it vouched for must not outlive it
        (the new handshake is checked against the CAs trusted now)."""
        self.generation += 1
        for peer in self._peers.values():
            peer.ready.set()

    async def close(self) -> None:
        for peer in self._peers.values():
            peer.task.cancel()
        for peer in self._peers.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await peer.task
        self._peers.clear()


class RaftService(raft_grpc.RaftBase):
    """Receives peers' message batches and steps them into the local driver."""

    def __init__(self, driver: RaftDriver, learn_address: Callable[[str, str], None]) -> None:
        self._driver = driver
        self._learn = learn_address

    async def Send(
        self, stream: Stream[raft_pb2.RaftBatch, raft_pb2.RaftSendSummary]
    ) -> None:
        received = 0
        async for batch in stream:
            for pm in batch.messages:
                try:
                    m = decode_message(pm)
                except DclError as exc:
                    log.warning("dropping malformed raft message: %s", exc)
                    continue
                if pm.src_addr:
                    self._learn(m.src, pm.src_addr)
                self._driver.receive(m)
                received += 1
        await stream.send_message(raft_pb2.RaftSendSummary(received=received))


@dataclass(frozen=True, slots=True)
class ConfigState:
    """What a node's configuration reloads (SIGHUP) left in use, for `dcl status`."""

    reloads_ok: int
    reloads_failed: int
    #: When the first of its server and peer certificates expires (Unix seconds, 0: unknown).
    certificates_expire: int
    #: Fingerprint of the gossip key it seals with ("" with insecure gossip).
    gossip_key: str


class AdminService(AdminBase):
    """Join / Leave / Cluster. Membership changes run on the leader only."""

    def __init__(
        self,
        backend: ReplicatedBackend,
        *,
        catch_up_timeout: float = 30.0,
        gossip_state: Callable[[str], str] | None = None,
        config_state: Callable[[], ConfigState] | None = None,
    ) -> None:
        """``gossip_state(node_id)`` names a server's membership state as this node's gossip
        sees it, for the Cluster answer (``dcl status``); None leaves the field empty.
        ``config_state()`` gives this node's own row its reload fields."""
        self._backend = backend
        self._driver = backend.driver
        self._catch_up_timeout = catch_up_timeout
        self._gossip_state = gossip_state
        self._config_state = config_state

    def _require_leader(self) -> None:
        core = self._driver.core
        if core.role is not Role.LEADER:
            leader = core.leader_id
            raise NotLeader(leader, self._backend.fsm.addresses.get(leader) if leader else None)

    async def _conf_change(self, cc: ConfChange) -> None:
        """Propose a conf change, waiting while another one is pending (one at a time)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._catch_up_timeout
        while True:
            self._require_leader()
            try:
                await self._driver.propose_conf_change(cc)
                return
            except ProposalDropped:
                if loop.time() > deadline:
                    raise Unavailable("membership change still blocked") from None
                await asyncio.sleep(0.05)

    async def join(self, node_id: str, rpc_addr: str, voter: bool) -> None:
        if not node_id or not rpc_addr:
            raise InvalidRequest("join needs an id and an rpc_addr")
        try:
            split_host_port(rpc_addr)
        except ValueError as exc:
            raise InvalidRequest(f"join: {exc}") from None
        self._require_leader()
        core = self._driver.core
        if self._backend.fsm.addresses.get(node_id) != rpc_addr:
            await self._driver.propose(encode_address_cmd(node_id, rpc_addr))
        if node_id not in core.voters and node_id not in core.learners:
            await self._conf_change(ConfChange(ConfChangeType.ADD_LEARNER, node_id))
        if voter and node_id not in core.voters:
            await self._wait_caught_up(node_id)
            await self._conf_change(ConfChange(ConfChangeType.PROMOTE_LEARNER, node_id))

    async def _wait_caught_up(self, node_id: str) -> None:
        """A learner becomes a voter only once it holds the log up to the commit index, so
        promoting it never stalls commits behind a slow catch-up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._catch_up_timeout
        while True:
            self._require_leader()
            pr = self._driver.core.progress().get(node_id)
            if pr is not None and pr.match >= self._driver.core.commit_index:
                return
            if loop.time() > deadline:
                raise Unavailable(f"{node_id} did not catch up in time")
            await asyncio.sleep(0.02)

    async def leave(self, node_id: str) -> None:
        self._require_leader()
        core = self._driver.core
        if node_id in core.voters or node_id in core.learners:
            await self._conf_change(ConfChange(ConfChangeType.REMOVE_NODE, node_id))

    async def Join(self, stream: Stream[admin_pb2.JoinRequest, admin_pb2.JoinResponse]) -> None:
        req = await stream.recv_message()
        assert req is not None
        await self.join(req.id, req.rpc_addr, req.voter)  # errors: the server's guard maps them
        await stream.send_message(admin_pb2.JoinResponse())

    async def Leave(
        self, stream: Stream[admin_pb2.LeaveRequest, admin_pb2.LeaveResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        await self.leave(req.id)
        await stream.send_message(admin_pb2.LeaveResponse())

    async def Cluster(
        self, stream: Stream[admin_pb2.ClusterRequest, admin_pb2.ClusterResponse]
    ) -> None:
        await stream.recv_message()
        core = self._driver.core
        st = core.status()
        servers = []
        backend = self._backend
        config = self._config_state() if self._config_state is not None else None
        for sid in sorted(st.voters | st.learners | {st.id}):
            own: dict[str, int] = {}
            if sid == st.id:
                role, last, applied = st.role.value, st.last_index, st.applied_index
                own = {"first_offset": backend.lowest_offset,
                       "next_offset": backend.next_offset, "log_bytes": backend.log_bytes}
                disk = self._driver.disk
                if disk is not None:
                    own |= {"disk_free_bytes": disk.free_bytes(),
                            "disk_reserve_bytes": disk.reserve_bytes}
                if config is not None:
                    own |= {"reloads_ok": config.reloads_ok,
                            "reloads_failed": config.reloads_failed,
                            "certificates_expire": config.certificates_expire}
            else:
                pr = st.progress.get(sid)
                role = ("leader" if sid == st.leader_id else
                        "learner" if sid in st.learners else "follower")
                last, applied = (pr.match if pr else 0), 0
            servers.append(admin_pb2.ServerStatus(
                id=sid, rpc_addr=self._backend.fsm.addresses.get(sid, ""), role=role,
                term=st.term, last_index=last, applied_index=applied, voter=sid in st.voters,
                gossip_state=self._gossip_state(sid) if self._gossip_state else "",
                gossip_key=config.gossip_key if config and sid == st.id else "", **own))
        await stream.send_message(
            admin_pb2.ClusterResponse(servers=servers, leader_id=st.leader_id or ""))
