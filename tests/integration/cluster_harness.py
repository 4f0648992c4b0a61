"""Real `dcl agent` processes on 127.0.0.1 free ports, and raw grpclib calls against them.

A test owns a `Cluster`: nodes start as child processes (node-0 bootstraps, the others join
through node-0's address: by default with Admin.Join on its RPC port, with `gossip=True` only
through its gossip port), are killed by PID, and are all stopped in `Cluster.close`, so a
failing test leaves nothing running. Every wait is a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.health.v1 import health_grpc, health_pb2

from dcl.addresses import join_host_port
from dcl.api.dcl.v1 import admin_grpc, admin_pb2, batch_grpc, batch_pb2
from dcl.api.log.v1 import log_grpc, log_pb2
from dcl.errors import OffsetOutOfRange
from dcl.server.certs import PkiFiles
from dcl.tls import client_context

__all__ = ["Cluster", "NodeProcess", "eventually", "free_port", "node_port"]

_T = TypeVar("_T")

#: Per-call deadline: long enough for a loaded 2-core machine, short enough to retry.
CALL_TIMEOUT = 5.0
#: Errors that mean "this node cannot answer right now", so a poll should try again.
TRANSIENT = (GRPCError, OSError, StreamTerminatedError, TimeoutError)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_NODE_PORTS_TAKEN: set[int] = set()


def node_port() -> int:
    """A port (free for TCP and UDP) below the kernel's ephemeral range (32768-60999), for a
    node to keep across restarts: while the node is down, an outgoing connection could
    otherwise take an ephemeral port as its source port and make the restart fail to bind.
    Never the same port twice in one test process."""
    rng = random.Random()
    while True:
        port = rng.randint(20000, 32000)
        if port in _NODE_PORTS_TAKEN:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                tcp.bind(("127.0.0.1", port))
                udp.bind(("127.0.0.1", port))
        except OSError:
            continue
        _NODE_PORTS_TAKEN.add(port)
        return port


async def eventually(
    check: Callable[[], Awaitable[_T | None]],
    *,
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
) -> _T:
    """Await check() until it returns a value other than None (or False); fail at timeout.

    Transient RPC errors count as "not yet"; the last one is reported on failure.
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = await check()
            if result is not None and result is not False:
                return result
        except TRANSIENT as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s (last error: {last!r})")
        await asyncio.sleep(interval)


@dataclass
class NodeProcess:
    """One `dcl agent` child process; its data dir and port survive restarts."""

    name: str
    port: int
    data_dir: Path
    pki: PkiFiles
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None
    #: Further `dcl agent` flags for every (re)start, e.g. --peer-dial-override (tests/chaos).
    extra_args: list[str] = field(default_factory=list)
    #: Gossip UDP+TCP port (--bind-addr); kept across restarts like the RPC port.
    gossip_port: int = field(default_factory=node_port)
    #: Loopback address every socket of the node binds to ("::1": IPv6 only).
    host: str = "127.0.0.1"
    #: RLIMIT_NOFILE (soft and hard) of the process; None: inherited.
    open_files: int | None = None
    #: A command put before the agent's argv at every (re)start, e.g. `unshare ... sh -c
    #: '...; exec "$@"' sh` to run it in a mount namespace of its own. It must end by
    #: exec-ing the agent in the same process, so `proc` (its PID, kill, stop) stays the
    #: agent's. Empty (the default): the agent is started directly.
    wrapper: list[str] = field(default_factory=list)

    @property
    def gossip_addr(self) -> str:
        return join_host_port(self.host, self.gossip_port)

    @property
    def rpc_addr(self) -> str:
        return join_host_port(self.host, self.port)

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"

    def start(self, *, bootstrap: bool, join: Sequence[str], snapshot_threshold: int,
              start_join: Sequence[str] = ()) -> None:
        """`join`: RPC addresses to ask for admission (Admin.Join); `start_join`: gossip
        addresses to join, after which the Raft leader admits the node by itself."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        pki = self.pki
        args = [
            sys.executable, "-m", "dcl.cli.main", "agent",
            "--node-name", self.name, "--data-dir", str(self.data_dir),
            "--rpc-port", str(self.port), "--bind-addr", self.gossip_addr,
            "--gossip-key-file", str(pki.gossip_key),
            "--acl-model-file", str(pki.acl_model), "--acl-policy-file", str(pki.acl_policy),
            "--server-tls-cert-file", str(pki.server_cert),
            "--server-tls-key-file", str(pki.server_key),
            "--server-tls-ca-file", str(pki.ca_cert),
            "--peer-tls-cert-file", str(pki.peer_cert), "--peer-tls-key-file", str(pki.peer_key),
            "--peer-tls-ca-file", str(pki.ca_cert), "--log-level", "INFO",
            "--snapshot-threshold", str(snapshot_threshold),
        ]
        args += self.extra_args
        if bootstrap:
            args.append("--bootstrap")
        for addr in join:
            args += ["--join-rpc-addrs", addr]
        for addr in start_join:
            args += ["--start-join-addrs", addr]
        if self._log is not None:
            self._log.close()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        limit = self.open_files
        self.proc = subprocess.Popen(
            self.wrapper + args, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=None if limit is None else (
                lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))))

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no leadership transfer, no flush; what a crash looks like."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self) -> None:
        """SIGTERM: the node transfers leadership (if it leads), drains and flushes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within timeout."""
        self.terminate()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ calls

    @contextlib.contextmanager
    def channel(self) -> Iterator[Channel]:
        """A fresh channel per call: tests may run calls from more than one event loop."""
        ctx = client_context(self.pki.root_client_cert, self.pki.root_client_key,
                             self.pki.ca_cert)
        channel = Channel(self.host, self.port, ssl=ctx)
        try:
            yield channel
        finally:
            channel.close()

    async def produce(self, value: bytes) -> int:
        with self.channel() as channel:
            stub = log_grpc.LogStub(channel)
            reply = await stub.Produce(
                log_pb2.ProduceRequest(record=log_pb2.Record(value=value)), timeout=CALL_TIMEOUT)
            assert reply is not None
            return reply.offset

    async def produce_batch(self, values: Sequence[bytes]) -> int:
        with self.channel() as channel:
            stub = batch_grpc.BatchStub(channel)
            reply = await stub.ProduceBatch(
                batch_pb2.ProduceBatchRequest(values=values), timeout=CALL_TIMEOUT)
            assert reply is not None and reply.count == len(values)
            return reply.first_offset

    async def produce_refusal(self, value: bytes) -> tuple[Status, str | None]:
        """Produce expecting a refusal: its status and `dcl-leader` trailing metadata."""
        with self.channel() as channel:
            async with log_grpc.LogStub(channel).Produce.open(timeout=CALL_TIMEOUT) as stream:
                await stream.send_message(
                    log_pb2.ProduceRequest(record=log_pb2.Record(value=value)), end=True)
                try:
                    await stream.recv_message()
                    await stream.recv_trailing_metadata()
                except GRPCError as exc:
                    leader = dict(stream.trailing_metadata or {}).get("dcl-leader")
                    return exc.status, None if leader is None else str(leader)
        raise AssertionError(f"{self.name} accepted a produce it should have refused")

    async def consume(self, offset: int) -> bytes | None:
        """The record's value, or None while the offset is not (yet) in this node's log."""
        with self.channel() as channel:
            stub = log_grpc.LogStub(channel)
            try:
                reply = await stub.Consume(log_pb2.ConsumeRequest(offset=offset),
                                           timeout=CALL_TIMEOUT)
            except GRPCError as exc:
                if exc.status is Status.OUT_OF_RANGE:
                    return None
                raise
            assert reply is not None and reply.record.offset == offset
            return reply.record.value

    async def consume_all(self) -> list[bytes]:
        """Every value from offset 0 to this node's tail, via ConsumeBatch."""
        with self.channel() as channel:
            stub = batch_grpc.BatchStub(channel)
            values: list[bytes] = []
            while True:
                reply = await stub.ConsumeBatch(
                    batch_pb2.ConsumeBatchRequest(offset=len(values)), timeout=CALL_TIMEOUT)
                assert reply is not None
                values += [r.value for r in reply.records]
                if not reply.records or len(values) >= reply.next_offset:
                    return values

    async def next_offset(self) -> int:
        with self.channel() as channel:
            stub = batch_grpc.BatchStub(channel)
            try:
                reply = await stub.ConsumeBatch(
                    batch_pb2.ConsumeBatchRequest(offset=0, max_records=1), timeout=CALL_TIMEOUT)
            except GRPCError as exc:  # retention cut offset 0: the answer names the range
                held = OffsetOutOfRange.from_message(0, exc.message or "")
                if exc.status is not Status.OUT_OF_RANGE or held.next_offset is None:
                    raise
                return held.next_offset
            assert reply is not None
            return reply.next_offset

    async def servers(self) -> list[log_pb2.Server]:
        with self.channel() as channel:
            stub = log_grpc.LogStub(channel)
            reply = await stub.GetServers(log_pb2.GetServersRequest(), timeout=CALL_TIMEOUT)
            assert reply is not None
            return list(reply.servers)

    async def cluster(self) -> admin_pb2.ClusterResponse:
        with self.channel() as channel:
            stub = admin_grpc.AdminStub(channel)
            reply = await stub.Cluster(admin_pb2.ClusterRequest(), timeout=CALL_TIMEOUT)
            assert reply is not None
            return reply

    async def leave(self, node_id: str) -> None:
        with self.channel() as channel:
            stub = admin_grpc.AdminStub(channel)
            await stub.Leave(admin_pb2.LeaveRequest(id=node_id), timeout=CALL_TIMEOUT * 2)

    async def health(self) -> int:
        with self.channel() as channel:
            stub = health_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
            assert reply is not None
            status: int = reply.status
            return status


class Cluster:
    """Three (or `size`) nodes of real processes; use as `async with Cluster(...) as c`."""

    def __init__(self, pki: PkiFiles, directory: Path, size: int = 3, *,
                 snapshot_threshold: int = 100_000, gossip: bool = False,
                 host: str = "127.0.0.1") -> None:
        """`gossip=True`: nodes find each other through gossip only (no Admin.Join); the
        Raft leader admits and removes them. Default: the Admin.Join path, gossip idle.
        `host`: the loopback address every node binds to and advertises."""
        self.snapshot_threshold = snapshot_threshold
        self.gossip = gossip
        self._directory = directory
        self._pki = pki
        self._host = host
        self.nodes = [self._node(i) for i in range(size)]

    def _node(self, i: int) -> NodeProcess:
        return NodeProcess(f"node-{i}", node_port(), self._directory / f"node-{i}", self._pki,
                           host=self._host)

    async def __aenter__(self) -> Cluster:
        try:
            for node in self.nodes:
                self.start(node)
            await self.wait_for_members(self.nodes, timeout=45)
        except BaseException:
            self.close()
            for node in self.nodes:
                sys.stderr.write(f"--- {node.name} log tail ---\n{node.log_tail()}\n")
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if exc[0] is not None:
            for node in self.nodes:
                sys.stderr.write(f"--- {node.name} log tail ---\n{node.log_tail()}\n")
        self.close()

    def start(self, node: NodeProcess) -> None:
        """(Re)start node; node-0 bootstraps on first start, everyone else joins via it."""
        seed = self.nodes[0]
        first_start = not node.data_dir.exists()
        bootstrap = node is seed and first_start
        others = [n for n in self.nodes if n is not node]
        if self.gossip:
            # A first start joins through the seed only: nodes that found each other before
            # the seed was up would form a gossip cluster of their own, which no retry heals.
            start_join = ([] if bootstrap else [seed.gossip_addr] if first_start
                          else [n.gossip_addr for n in others])
            node.start(bootstrap=bootstrap, join=[], start_join=start_join,
                       snapshot_threshold=self.snapshot_threshold)
            return
        node.start(
            bootstrap=bootstrap,
            join=[] if node is seed else [n.rpc_addr for n in others],
            snapshot_threshold=self.snapshot_threshold,
        )

    def add_node(self) -> NodeProcess:
        """A new node (next free name), started and joining like the others."""
        node = self._node(len(self.nodes))
        self.nodes.append(node)
        self.start(node)
        return node

    def close(self) -> None:
        """Stop every node this cluster started (by PID), in parallel, killing stragglers."""
        for node in self.nodes:
            with contextlib.suppress(ProcessLookupError):
                node.terminate()
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):  # not even SIGKILL: go on
                node.stop()

    async def wait_for_members(self, members: Sequence[NodeProcess], *, timeout: float
                               ) -> NodeProcess:
        """Every member's GetServers lists exactly `members`, with addresses, and agrees on
        one leader among them; returns the leader."""
        expected = {(n.name, n.rpc_addr) for n in members}

        async def agreed() -> NodeProcess | None:
            leaders = set()
            for node in members:
                self._check_alive(node)
                servers = await node.servers()
                if {(s.id, s.rpc_addr) for s in servers} != expected:
                    return None
                flagged = [s.id for s in servers if s.is_leader]
                if len(flagged) != 1:
                    return None
                leaders.add(flagged[0])
            if len(leaders) != 1:
                return None
            (leader,) = leaders
            return next(n for n in members if n.name == leader)

        return await eventually(agreed, timeout=timeout, what=f"membership {sorted(expected)}")

    async def leader_among(self, members: Sequence[NodeProcess], *, timeout: float
                           ) -> NodeProcess:
        """A member that every given member names as leader (membership may differ)."""

        async def agreed() -> NodeProcess | None:
            named = set()
            for node in members:
                self._check_alive(node)
                leaders = [s.id for s in await node.servers() if s.is_leader]
                if len(leaders) != 1:
                    return None
                named.add(leaders[0])
            if len(named) != 1:
                return None
            (leader,) = named
            return next((n for n in members if n.name == leader), None)

        return await eventually(agreed, timeout=timeout, what="one agreed leader")

    @staticmethod
    def _check_alive(node: NodeProcess) -> None:
        if not node.running:
            raise AssertionError(f"{node.name} exited early:\n{node.log_tail()}")

    def others(self, node: NodeProcess) -> list[NodeProcess]:
        return [n for n in self.nodes if n is not node]

