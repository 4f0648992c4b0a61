"""One DCL Store node: builds logger, log/raft, server and membership from a Config.

Setup is a table of steps in dependency order; if one fails, the steps already done are
undone in reverse, so a failed start releases its port and its directory locks. Shutdown is
the same table in reverse: leave gossip (so the leader removes us from Raft), transfer
leadership if leader, stop Raft, drain gRPC, flush and close the logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from grpclib.client import Channel
from grpclib.exceptions import GRPCError, StreamTerminatedError

from dcl.addresses import ConnectionCap, join_host_port, split_host_port
from dcl.agent.membership import RPC_ADDR_TAG, MembershipReconciler
from dcl.agent.metrics import NodeMetrics
from dcl.api.dcl.v1 import admin_grpc, admin_pb2, raft_pb2
from dcl.membership import (
    GossipConfig,
    GossipError,
    GossipKeyRequired,
    InvalidGossipKey,
    JoinFailed,
    Membership,
    SwimConfig,
    key_fingerprint,
    load_keyring,
    parse_addr,
)
from dcl.membership.model import STATE_NAMES
from dcl.raft.driver import RaftDriver
from dcl.raft.storage import DEFAULT_RETAIN_BYTES, RaftStorage
from dcl.raft.types import Config as RaftConfig
from dcl.raft.types import Role
from dcl.server.acl import AclError, Action, Authorizer
from dcl.server.metrics_http import MetricsServer
from dcl.server.raft_transport import AdminService, ConfigState, GrpcTransport, RaftService
from dcl.server.replicated import LogFsm, ReplicatedBackend, Retention, encode_address_cmd
from dcl.server.server import (
    HANDSHAKE_TIMEOUT_SECONDS,
    DclServer,
    build_server,
    default_max_connections,
)
from dcl.storage import LogConfig
from dcl.storage.space import DEFAULT_RESERVE_BYTES, DiskSpace
from dcl.tls import (
    CertificateError,
    LiveContext,
    TlsFiles,
    ca_certificates,
    certificate_validity,
    client_context,
    format_utc,
    issued_by_any,
    server_context,
)

__all__ = ["Agent", "AgentConfig", "ReloadFailed"]

log = logging.getLogger(__name__)

#: While not yet admitted to Raft, re-join the gossip seeds this often (heals split views).
_REJOIN_SECONDS = 5.0


def _check_keyring_overlap(in_use: Sequence[str], keys: Sequence[bytes]) -> None:
    """A keyring sharing no key with the one in use would cut this node off from every
    member that has not reloaded yet: refused (change keys with `dcl certs gossip-key`)."""
    if in_use and not set(in_use) & {key_fingerprint(key) for key in keys}:
        raise InvalidGossipKey(
            f"the gossip key file shares no key with the keys in use ({', '.join(in_use)}): "
            "members would stop hearing each other until every one reloaded; add the new "
            "key beside the old one first (dcl certs gossip-key add), or restart")


class ReloadFailed(Exception):
    """A reload found a file it cannot use; nothing was changed."""


async def _cancel(*tasks: asyncio.Task[None]) -> None:
    """Cancel background tasks and wait until they have finished."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass
class AgentConfig:
    """Everything one node needs; field names follow the reference agent's."""

    data_dir: Path
    node_name: str
    server_tls_cert_file: Path
    server_tls_key_file: Path
    server_tls_ca_file: Path
    peer_tls_cert_file: Path
    peer_tls_key_file: Path
    peer_tls_ca_file: Path
    acl_model_file: Path
    acl_policy_file: Path
    rpc_host: str = "127.0.0.1"
    rpc_port: int = 8400
    bootstrap: bool = False
    # Ours.
    segment_bytes: int = 64 << 20
    snapshot_threshold_entries: int = 100_000
    #: Raft log bytes held in memory after which a snapshot is taken whatever the count.
    snapshot_log_bytes: int = 1 << 30
    #: Raft log kept on disk below the snapshot (see `RaftStorage(retain_bytes=...)`).
    raft_retain_bytes: int = DEFAULT_RETAIN_BYTES
    #: Raft log bytes in memory past which a node takes no entries until a snapshot frees
    #: memory (`RaftDriver.log_memory_full`); 0: twice `snapshot_log_bytes`.
    raft_log_memory_bytes: int = 0
    #: Commit log a node keeps, by size and by age of its newest record (0: no limit); see
    #: `LogFsm.enforce_retention`. Checked every `checkpoint_seconds`.
    retention_bytes: int = 0
    retention_seconds: float = 0.0
    #: Free disk space kept for the node itself (see dcl.storage.space); 0: none.
    min_free_bytes: int = DEFAULT_RESERVE_BYTES
    tick_seconds: float = 0.05
    election_tick: int = 10
    #: While writes are steady, the leader may hold a new commit index this long for its
    #: next append to carry (0: it tells followers at once). Steady one-at-a-time Produce
    #: at 2 ms: follower CPU per write about -20%, but a follower's tail reader sees each
    #: record about 1 ms later (bench/tail.py, steady_after_ack_p50_ms 0.47-0.72 ->
    #: 1.42-1.72). Readers use followers by default, so this is off by default.
    commit_announce_seconds: float = 0.0
    log_level: str = "INFO"
    checkpoint_seconds: float = 2.0
    start_join_addrs: list[str] = field(default_factory=list)
    #: RPC addresses of cluster members to ask for admission (Admin.Join) at start.
    join_rpc_addrs: list[str] = field(default_factory=list)
    #: Gossip (SWIM) UDP+TCP address; `start_join_addrs` are other members' bind addresses.
    bind_addr: str = "127.0.0.1:8401"
    #: Shared AES-GCM key for gossip; required unless `insecure_gossip`.
    gossip_key_file: Path | None = None
    insecure_gossip: bool = False
    gossip: SwimConfig = field(default_factory=SwimConfig)
    #: How often the leader reconciles Raft membership with gossip even without events.
    reconcile_seconds: float = 1.0
    #: Port of the metrics endpoint (GET /metrics, mutual TLS, on `rpc_host`); None: off,
    #: 0: a free port (tests).
    metrics_port: int | None = None
    #: Connections the RPC port holds open at once, counted from accept (0: half of the
    #: process's open-file limit, at most 4096), and from one host (0: no such cap). See
    #: dcl.addresses.ConnectionCap: a flood of connections that send nothing would
    #: otherwise use up the descriptors the node needs for its own files.
    max_connections: int = 0
    max_connections_per_host: int = 0
    #: Seconds a new connection has to finish its TLS handshake.
    tls_handshake_timeout: float = HANDSHAKE_TIMEOUT_SECONDS
    #: Peer node id -> host:port to dial for Raft traffic instead of the peer's advertised
    #: address (a fault-injecting proxy in tests/chaos); clients still see the real address.
    peer_dial_overrides: dict[str, str] = field(default_factory=dict)

    @property
    def rpc_addr(self) -> str:
        return join_host_port(self.rpc_host, self.rpc_port)


class Agent:
    """A running node. `await start()` then `await shutdown()`."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._undo: list[Callable[[], Awaitable[None]]] = []
        #: Set when the node can no longer work (its Raft driver stopped on an error).
        self.failed = asyncio.Event()
        self.failure: BaseException | None = None
        self.driver: RaftDriver
        self.backend: ReplicatedBackend
        self.server: DclServer
        self.fsm: LogFsm
        self.disk: DiskSpace
        self._transport: GrpcTransport
        self.membership: Membership | None = None
        self.metrics: NodeMetrics | None = None
        self.metrics_server: MetricsServer | None = None
        self._reconciler: MembershipReconciler | None = None
        self._gossip_tasks: list[asyncio.Task[None]] = []
        self._gossip_left = False
        # What a reload (SIGHUP) replaces: contexts serving with the server certificate
        # (RPC port, metrics), dialing with the peer certificate, and the ACL.
        self._server_contexts: list[LiveContext] = []
        self._peer_contexts: list[LiveContext] = []
        self._authorizer: Authorizer | None = None
        #: The CA files' bytes as last loaded, by use: a reload closes what a CA taken out
        #: of one vouched for.
        self._ca_files: dict[str, bytes] = {}
        #: (not before, not after) of the certificates in use, Unix seconds, by use.
        self.certificate_validity: dict[str, tuple[float, float]] = {}
        self.reloads = {"ok": 0, "error": 0}

    async def start(self) -> None:
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("logger", self._setup_logger),
            ("log", self._setup_log),
            ("server", self._setup_server),
            ("membership", self._setup_membership),
            ("join", self._join_cluster),
        ]
        for name, step in steps:
            try:
                await step()
            except BaseException:
                log.error("agent setup failed at step=%s node=%s", name, self.config.node_name)
                await self._unwind()
                raise

    def reload(self) -> None:
        """Read the certificate, ACL and gossip key files again and use them from the next
        connection (certificates), call (ACL) or gossip frame (keys) on, without a restart:
        what SIGHUP does.

        All or nothing: every file is read and checked before anything changes, so a bad
        file (a key that does not match, an expired certificate, a policy casbin cannot
        parse) raises ReloadFailed naming it and the node goes on as it was.
        """
        cfg = self.config
        try:
            server = TlsFiles.read(cfg.server_tls_cert_file, cfg.server_tls_key_file,
                                   cfg.server_tls_ca_file)
            peer = TlsFiles.read(cfg.peer_tls_cert_file, cfg.peer_tls_key_file,
                                 cfg.peer_tls_ca_file, client_auth=True)
            acl = Authorizer(cfg.acl_model_file, cfg.acl_policy_file)
            gossip_keys = (load_keyring(cfg.gossip_key_file)
                           if cfg.gossip_key_file is not None and self.membership is not None
                           else None)
            if gossip_keys is not None and self.membership is not None:
                _check_keyring_overlap(self.membership.key_fingerprints, gossip_keys)
            # Per CA file: (CAs taken out, CAs it still lists).
            cas = {use: (ca_certificates(self._ca_files[use]), ca_certificates(files.ca))
                   for use, files in (("server", server), ("peer", peer))
                   if use in self._ca_files}
        except (CertificateError, AclError, InvalidGossipKey) as exc:
            self.reloads["error"] += 1
            raise ReloadFailed(str(exc)) from None
        try:
            # Fresh contexts from the checked bytes, all built before any is used: only a
            # lack of memory or descriptors fails here, and then nothing has changed.
            fresh = [(live, live.renewed(files))
                     for files, contexts in ((server, self._server_contexts),
                                             (peer, self._peer_contexts))
                     for live in contexts]
        except (OSError, ssl.SSLError) as exc:
            self.reloads["error"] += 1
            raise ReloadFailed(f"building contexts from the checked certificates failed: "
                               f"{exc}") from None
        # Then every swap, none of which can fail: contexts, gossip keys, ACL.
        for live, context in fresh:
            live.use(context)
        self._ca_files = {"server": server.ca, "peer": peer.ca}
        if gossip_keys is not None and self.membership is not None:
            self.membership.set_keys(gossip_keys)
        if self._authorizer is not None:
            self._authorizer.adopt(acl)
        try:
            self._drop_what_untrusted_cas_vouched_for(cas)
        except Exception:  # the reload itself took effect: say what did not
            log.exception("reload: closing connections of CAs taken out failed")
        self.certificate_validity = {"server": (server.not_before, server.not_after),
                                     "peer": (peer.not_before, peer.not_after)}
        self.reloads["ok"] += 1
        fingerprints = self.membership.key_fingerprints if self.membership is not None else ()
        log.info("reloaded certificates, ACL and gossip keys: server valid until %s, peer "
                 "until %s, gossip sealing with %s, opening with %s",
                 format_utc(server.not_after), format_utc(peer.not_after),
                 fingerprints[0] if fingerprints else "-", ", ".join(fingerprints) or "-")

    def _drop_what_untrusted_cas_vouched_for(
        self, cas: Mapping[str, tuple[frozenset[bytes], frozenset[bytes]]],
    ) -> None:
        """A CA taken out of a CA file vouched for connections that are still open: close
        those to our port whose certificate it signed and no CA still listed did (server
        CA file), and redial our streams to peers (peer CA file), so each handshake is
        checked against the CAs trusted now."""
        before, now = cas.get("server", (frozenset(), frozenset()))
        if removed := before - now:
            closed = self.server.close_connections(
                lambda der: issued_by_any(der, removed) and not issued_by_any(der, now))
            log.warning("reload: closed %d connections whose certificate only a CA taken "
                        "out of the CA file signed", closed)
        before, now = cas.get("peer", (frozenset(), frozenset()))
        if before - now:
            self._transport.redial()
            log.warning("reload: a CA was taken out of the peer CA file; peer streams "
                        "redialled")

    async def shutdown(self) -> None:
        await self._leave_gossip()
        if self.driver.core.role is Role.LEADER:
            await self._transfer_leadership()
        await self._unwind()

    async def _unwind(self) -> None:
        while self._undo:
            undo = self._undo.pop()
            try:
                await undo()
            except Exception:
                log.exception("error during shutdown")

    async def _transfer_leadership(self) -> None:
        core = self.driver.core
        progress = core.progress()
        # Prefer voters gossip does not report gone (a crashed voter may still look caught up
        # until the failure detector removes it), then the most caught-up one.
        gone = {n for n in core.voters if self._gossip_state(n) in ("failed", "left")}
        candidates = sorted(core.voters - {core.id},
                            key=lambda v: (v in gone, -(pr.match if (pr := progress.get(v))
                                                        else 0)))
        if not candidates:
            return
        with contextlib.suppress(Exception):
            self.driver.transfer_leadership(candidates[0])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 2.0
            while core.role is Role.LEADER and loop.time() < deadline:
                await asyncio.sleep(0.02)
        log.info("leadership transfer to=%s done=%s", candidates[0],
                 core.role is not Role.LEADER)

    # ------------------------------------------------------------------ steps

    async def _setup_logger(self) -> None:
        logging.basicConfig(
            level=self.config.log_level.upper(),
            format=f"%(asctime)s %(levelname)s node={self.config.node_name} %(name)s %(message)s",
        )

    async def _setup_log(self) -> None:
        cfg = self.config
        data = Path(cfg.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        self.disk = DiskSpace(data, cfg.min_free_bytes, node=cfg.node_name)
        self.disk.free_bytes()  # a disk already below its reserve is logged at start
        self.fsm = LogFsm(data / "fsm", LogConfig(max_store_bytes=cfg.segment_bytes),
                          retention=Retention(cfg.retention_bytes, cfg.retention_seconds))
        self._undo.append(self._close_fsm)
        storage = RaftStorage(data / "raft", max_segment_bytes=cfg.segment_bytes,
                              retain_bytes=cfg.raft_retain_bytes)
        self._storage = storage
        self._undo.append(self._close_storage)
        # Records the commit log lost on disk come back from our own Raft state first.
        self.fsm.recover(storage)
        peer_ctx = client_context(cfg.peer_tls_cert_file, cfg.peer_tls_key_file,
                                  cfg.peer_tls_ca_file)
        self._peer_contexts.append(peer_ctx)
        self._transport = GrpcTransport(peer_ctx, cfg.rpc_addr, self.fsm.addresses.get,
                                        dial_overrides=cfg.peer_dial_overrides)
        self._undo.append(self._transport.close)
        raft_config = RaftConfig(
            election_tick=cfg.election_tick, heartbeat_tick=1,
            max_bytes_per_msg=256 << 10, snapshot_chunk_size=256 << 10,
            defer_commit_announcement=cfg.commit_announce_seconds > 0,
        )
        self.driver = RaftDriver(
            cfg.node_name, storage, self.fsm, self._transport, config=raft_config,
            applied=self.fsm.applied_index, bootstrap=cfg.bootstrap,
            tick_seconds=cfg.tick_seconds,
            snapshot_threshold_entries=cfg.snapshot_threshold_entries,
            snapshot_max_log_bytes=cfg.snapshot_log_bytes,
            max_log_memory_bytes=cfg.raft_log_memory_bytes or None,
            commit_announce_delay=cfg.commit_announce_seconds,
            disk=self.disk,
        )
        self.backend = ReplicatedBackend(self.driver, self.fsm, cfg.rpc_addr)
        self.driver.on_role_change = self._on_role_change
        self.driver.on_failed = self._on_storage_failed
        self.driver.start()
        self._undo.append(self._stop_driver)
        checkpoints = asyncio.get_running_loop().create_task(self._checkpoint_loop())
        self._undo.append(lambda: _cancel(checkpoints))

    async def _setup_server(self) -> None:
        cfg = self.config
        ctx = server_context(cfg.server_tls_cert_file, cfg.server_tls_key_file,
                             cfg.server_tls_ca_file)
        self._server_contexts.append(ctx)
        self.certificate_validity = {
            use: certificate_validity(Path(path).read_bytes())
            for use, path in (("server", cfg.server_tls_cert_file),
                              ("peer", cfg.peer_tls_cert_file))}
        self._ca_files = {use: Path(path).read_bytes()
                          for use, path in (("server", cfg.server_tls_ca_file),
                                            ("peer", cfg.peer_tls_ca_file))}
        authorizer = self._authorizer = Authorizer(cfg.acl_model_file, cfg.acl_policy_file)
        self.admin = AdminService(self.backend, gossip_state=self._gossip_state,
                                  config_state=self._config_state)
        self.server = build_server(
            self.backend, ssl_context=ctx, authorizer=authorizer, host=cfg.rpc_host,
            port=cfg.rpc_port,
            extra_handlers=[RaftService(self.driver, self._learn_address), self.admin],
            extra_actions={"/dcl.v1.Raft/Send": Action.PEER},
            peer_message_types=[raft_pb2.RaftBatch],
            connection_cap=ConnectionCap(cfg.max_connections or default_max_connections(),
                                         cfg.max_connections_per_host),
            handshake_timeout=cfg.tls_handshake_timeout,
        )
        await self.server.start()
        cap = self.server.connection_cap
        log.info("rpc port takes at most %d connections (%s per host); TLS handshakes "
                 "within %.1f s", cap.total, cap.per_host or "no cap",
                 cfg.tls_handshake_timeout)
        self._undo.append(self.server.close)
        if cfg.metrics_port is not None:
            self.metrics = NodeMetrics(cfg.node_name, self.driver, self.backend, self.server,
                                       certificates=lambda: self.certificate_validity,
                                       reloads=self.reloads, gossip=lambda: self.membership)
            metrics_ctx = server_context(cfg.server_tls_cert_file, cfg.server_tls_key_file,
                                         cfg.server_tls_ca_file, alpn=("http/1.1",))
            self._server_contexts.append(metrics_ctx)
            self.metrics_server = MetricsServer(
                self.metrics.registry, ssl_context=metrics_ctx, authorizer=authorizer,
                host=cfg.rpc_host, port=cfg.metrics_port)
            await self.metrics_server.start()
            self._undo.append(self.metrics_server.close)

    async def _setup_membership(self) -> None:
        cfg = self.config
        if cfg.gossip_key_file is None and not cfg.insecure_gossip:
            raise GossipKeyRequired(
                "gossip needs a shared key: pass --gossip-key-file (dcl certs init writes "
                "gossip.key), or --insecure-gossip on a trusted network only")
        key = load_keyring(cfg.gossip_key_file) if cfg.gossip_key_file is not None else None
        reconciler = MembershipReconciler(
            cfg.node_name, self.driver, self.admin, self.fsm.addresses,
            lambda: self.membership.members() if self.membership is not None else [],
            interval=cfg.reconcile_seconds,
        )
        membership = Membership(
            GossipConfig(node_name=cfg.node_name, bind_addr=parse_addr(cfg.bind_addr),
                         tags={RPC_ADDR_TAG: cfg.rpc_addr}, key=key,
                         insecure=cfg.insecure_gossip and key is None, protocol=cfg.gossip),
            on_event=reconciler.on_event,
        )
        await membership.start()
        if membership.key_fingerprints:
            log.info("gossip keys: sealing with %s, opening with %s",
                     membership.key_fingerprints[0], ", ".join(membership.key_fingerprints))
        self.membership, self._reconciler = membership, reconciler
        self._undo.append(self._close_gossip)
        loop = asyncio.get_running_loop()
        self._gossip_tasks = [loop.create_task(reconciler.run(), name="membership-reconcile")]
        if cfg.start_join_addrs:
            self._gossip_tasks.append(loop.create_task(self._gossip_join_loop(),
                                                       name="gossip-join"))
        self._undo.append(self._stop_gossip_tasks)

    async def _gossip_join_loop(self) -> None:
        """Join through `start_join_addrs`, retrying until one answers (they may start later).

        Then, for as long as Raft has not admitted this node, join them again every few
        seconds: nodes that found each other before the seeds (or the leader) were up form a
        gossip cluster of their own, which SWIM alone never merges; a push-pull with a seed
        merges the two views, and the leader then admits us.
        """
        assert self.membership is not None
        delay, joined = 0.2, False
        while True:
            core = self.driver.core
            if joined and (core.id in core.voters or core.id in core.learners):
                await asyncio.sleep(_REJOIN_SECONDS)
                continue
            try:
                n = await self.membership.join(self.config.start_join_addrs, retries=3,
                                               timeout=10.0)
                if not joined:
                    log.info("gossip joined contacted=%d", n)
                joined, delay = True, _REJOIN_SECONDS
            except JoinFailed as exc:
                log.warning("gossip join failed, retrying: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _REJOIN_SECONDS)

    async def _stop_gossip_tasks(self) -> None:
        tasks, self._gossip_tasks = self._gossip_tasks, []
        await _cancel(*tasks)

    async def _leave_gossip(self) -> None:
        """Announce a graceful leave (others see LEFT and the leader removes us from Raft);
        stop reconciling first so a leaving leader starts no new membership change."""
        await self._stop_gossip_tasks()
        if self.membership is None or self._gossip_left:
            return
        self._gossip_left = True
        try:
            await self.membership.leave(timeout=2.0)
        except Exception:
            log.exception("gossip leave failed")

    async def _close_gossip(self) -> None:
        await self._leave_gossip()
        if self.membership is not None:
            await self.membership.stop()

    async def _join_cluster(self) -> None:
        """Ask the cluster (any of `join_rpc_addrs`; redirected to the leader) to add us.

        Runs in the background: the node already serves and catches up as a learner.
        """
        if not self.config.join_rpc_addrs or self.config.bootstrap:
            return
        task = asyncio.get_running_loop().create_task(self._join_loop())
        self._undo.append(lambda: _cancel(task))

    async def _join_loop(self) -> None:
        cfg = self.config
        ctx = client_context(cfg.peer_tls_cert_file, cfg.peer_tls_key_file, cfg.peer_tls_ca_file)
        self._peer_contexts.append(ctx)
        targets = list(cfg.join_rpc_addrs)
        delay = 0.1
        for attempt in range(600):
            addr = targets[attempt % len(targets)]
            channel = Channel(*split_host_port(addr), ssl=ctx)
            try:
                async with asyncio.timeout(60):
                    async with admin_grpc.AdminStub(channel).Join.open() as stream:
                        await stream.send_message(admin_pb2.JoinRequest(
                            id=cfg.node_name, rpc_addr=cfg.rpc_addr, voter=True), end=True)
                        try:
                            await stream.recv_message()
                            await stream.recv_trailing_metadata()
                        except GRPCError as exc:
                            leader = str(dict(stream.trailing_metadata or {}).get(
                                "dcl-leader", ""))
                            if leader and leader not in targets[:1]:
                                targets.insert(0, leader)
                            log.debug("join via %s failed: %s", addr, exc.message)
                            raise
                log.info("joined cluster via=%s", addr)
                return
            except (GRPCError, OSError, TimeoutError, StreamTerminatedError) as exc:
                log.debug("join via %s failed: %r", addr, exc)
            finally:
                channel.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        log.error("giving up joining the cluster")

    # ------------------------------------------------------------------ hooks

    def _config_state(self) -> ConfigState:
        """What this node's reloads left in use, for `dcl status` (Admin Cluster)."""
        expiries = [after for _, after in self.certificate_validity.values()]
        keys = self.membership.key_fingerprints if self.membership is not None else ()
        return ConfigState(self.reloads["ok"], self.reloads["error"],
                           int(min(expiries)) if expiries else 0, keys[0] if keys else "")

    def _gossip_state(self, node_id: str) -> str:
        """A server's state as our gossip sees it: alive, suspect, failed, left, or ""."""
        if self.membership is None:
            return ""
        try:
            member = next((m for m in self.membership.members() if m.name == node_id), None)
        except GossipError:  # not started or already stopped
            return ""
        return STATE_NAMES[member.state] if member is not None else ""

    def _learn_address(self, node_id: str, addr: str) -> None:
        # A peer's self-reported address fills gaps only; the replicated book is authoritative.
        self.fsm.addresses.setdefault(node_id, addr)

    def _on_storage_failed(self, exc: BaseException) -> None:
        """Raft stopped, or a checkpoint failed (a disk error): this node cannot take part
        any more. Say so, so the process exits and a supervisor restarts it, rather than
        lingering as a zombie."""
        self.failure = exc
        self.failed.set()

    def _on_role_change(self, role: Role) -> None:
        if role is Role.LEADER and self._reconciler is not None:
            self._reconciler.wake()  # events may have been missed while not leader
        if role is Role.LEADER and self.fsm.addresses.get(self.config.node_name) != (
            self.config.rpc_addr
        ):
            asyncio.get_running_loop().create_task(self._announce_address())

    async def _announce_address(self) -> None:
        """Record our address in the replicated book, so followers can redirect clients."""
        for _ in range(100):
            if self.driver.core.role is not Role.LEADER:
                return
            try:
                await self.driver.propose(
                    encode_address_cmd(self.config.node_name, self.config.rpc_addr))
                return
            except Exception:  # ProposalDropped until the no-op commits; retry shortly
                await asyncio.sleep(0.05)

    async def _checkpoint_loop(self) -> None:
        """Bound how much of the Raft log a restart must re-apply to the commit log; then
        apply retention (on the loop, which owns the log; it writes one small file durably
        and unlinks, the blocks are freed in the background).

        A failed checkpoint (an fsync or write error on the commit log's disk) fails the
        node: it could not vouch for its commit log any more, and without checkpoints the
        Raft log is never compacted. A restart cuts the commit log back to the last good
        checkpoint and applies the rest again from the Raft log."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.checkpoint_seconds)
            try:
                await loop.run_in_executor(None, self.fsm.checkpoint)
                self.fsm.enforce_retention()
            except Exception as exc:
                log.exception("commit log checkpoint or retention failed node=%s",
                              self.config.node_name)
                self._on_storage_failed(exc)
                return

    # ------------------------------------------------------------------ undo

    async def _stop_driver(self) -> None:
        self.backend.close()
        await self.driver.stop()

    async def _close_storage(self) -> None:
        self._storage.close()

    async def _close_fsm(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.fsm.checkpoint)
        except Exception as exc:  # the commit log's disk failed: exit with an error
            if self.failure is None:
                self._on_storage_failed(exc)
            raise
        finally:
            self.fsm.close()
