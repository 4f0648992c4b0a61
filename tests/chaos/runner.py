"""One chaos run: cluster + link proxies + workload + nemesis, then heal, converge, read every
node's final log, check, and summarise.

Node A reaches node B's Raft service through the proxy of link A->B (`dcl agent
--peer-dial-override B=127.0.0.1:<proxy port>`); clients reach every node directly, so a client
can still talk to a node on the minority side of a partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from dcl.api.dcl.v1 import batch_grpc, batch_pb2
from dcl.api.log.v1 import log_grpc, log_pb2
from dcl.client import DclClient
from dcl.errors import OffsetOutOfRange
from dcl.server.certs import generate_pki
from dcl.tls import client_context
from tests.chaos.checker import NodeLog, Report, check
from tests.chaos.history import OK, History
from tests.chaos.nemesis import FAULT_KINDS, Nemesis
from tests.chaos.proxy import LinkProxy
from tests.chaos.workload import Workload, WorkloadConfig
from tests.integration.cluster_harness import Cluster, NodeProcess

__all__ = ["ChaosConfig", "ChaosResult", "run_chaos"]

log = logging.getLogger("tests.chaos")

CONVERGE_TIMEOUT = 90.0
_RPC_ERRORS = (GRPCError, OSError, StreamTerminatedError, TimeoutError)


@dataclass(frozen=True)
class ChaosConfig:
    duration: float
    seed: int
    workdir: Path
    nodes: int = 3
    kinds: tuple[str, ...] = FAULT_KINDS
    #: Keep injecting past `duration` until every kind in `kinds` was injected once.
    cover: bool = False
    #: Small segments, so the commit log has closed segments to damage within seconds.
    segment_bytes: int = 32 << 10
    #: Low, so snapshots, log compaction and InstallSnapshot to lagging nodes happen often.
    snapshot_threshold: int = 1000
    #: Small for the same reason: the threshold alone also waits for as many new bytes as
    #: the last snapshot held, which the workload's small values reach only rarely.
    snapshot_log_bytes: int = 256 << 10
    #: `--retention-bytes` for every node (0: keep everything); the checker then reads each
    #: node's log from its first offset.
    retention_bytes: int = 0
    #: `--raft-retain-bytes` (None: the agent's default); 0 makes every lagging node catch up
    #: by snapshot, never from retained Raft entries.
    raft_retain_bytes: int | None = None
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)


@dataclass
class ChaosResult:
    config: ChaosConfig
    report: Report
    injected: dict[str, int]
    skipped: dict[str, int]
    unrecovered_nodes: list[str]
    elapsed: float
    history_path: Path
    #: Connections accepted / closed on a drop coin, summed over the link proxies.
    proxy_stats: dict[str, int] = field(default_factory=dict)
    #: Nodes that exited without being killed: (name, exit code, log tail).
    crashes: list[tuple[str, int | None, str]] = field(default_factory=list)
    #: Internal failures the nodes logged (a dead Raft driver leaves a live but useless node).
    node_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.report.violations or self.unrecovered_nodes or self.crashes
                    or self.node_errors)

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.config.seed, "duration_s": self.config.duration,
            "nodes": self.config.nodes, "elapsed_s": round(self.elapsed, 1),
            "ok": self.ok, "unrecovered_nodes": self.unrecovered_nodes,
            "crashes": [f"{name} exit {code}" for name, code, _tail in self.crashes],
            "node_errors": self.node_errors,
            "faults_injected": self.injected, "faults_skipped": self.skipped,
            "history": str(self.history_path), "proxy_links": self.proxy_stats,
            **self.report.to_json(),
        }


async def run_chaos(config: ChaosConfig) -> ChaosResult:
    started = time.monotonic()
    workdir = config.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    pki = generate_pki(workdir / "pki")
    history = History(workdir / "history.jsonl")
    cluster = Cluster(pki, workdir / "nodes", config.nodes,
                      snapshot_threshold=config.snapshot_threshold)
    proxies: dict[tuple[str, str], LinkProxy] = {}
    for i, a in enumerate(cluster.nodes):
        for j, b in enumerate(cluster.nodes):
            if a is not b:
                proxy = LinkProxy(f"{a.name}->{b.name}", b.port,
                                  seed=config.seed * 1000 + i * 10 + j)
                await proxy.start()
                proxies[(a.name, b.name)] = proxy
                a.extra_args += ["--peer-dial-override", f"{b.name}=127.0.0.1:{proxy.port}"]
        a.extra_args += ["--segment-bytes", str(config.segment_bytes),
                         "--snapshot-log-bytes", str(config.snapshot_log_bytes),
                         "--retention-bytes", str(config.retention_bytes)]
        if config.raft_retain_bytes is not None:
            a.extra_args += ["--raft-retain-bytes", str(config.raft_retain_bytes)]
    nemesis = Nemesis(cluster, proxies, history, config.seed, config.kinds)
    ssl_context = client_context(pki.root_client_cert, pki.root_client_key, pki.ca_cert)
    workload = Workload(history, [(n.name, n.rpc_addr) for n in cluster.nodes], ssl_context,
                        config.workload, config.seed)
    unrecovered: list[str] = []
    try:
        async with cluster:
            workload.start()
            try:
                await nemesis.run(config.duration, cover=config.cover)
            finally:
                await nemesis.heal_all()
                # Clients keep going a little while the healed cluster settles.
                await asyncio.sleep(3.0)
                await workload.stop()
            unrecovered = await _restart_stragglers(cluster)
            live = [n for n in cluster.nodes if n.name not in unrecovered]
            logs = await _converge_and_read(cluster, live, history, ssl_context)
            for name in unrecovered:
                logs[name] = NodeLog([], [f"{name} did not come back after the faults"],
                                     member=False)
    finally:
        history.close()
        for proxy in proxies.values():
            await proxy.close()
    (workdir / "final_logs.json").write_text(json.dumps(
        {name: {"values": log.values, "errors": log.errors, "first": log.first}
         for name, log in logs.items()}))
    report = check(history.records, logs)
    proxy_stats = {"links": len(proxies),
                   "connections": sum(p.accepted for p in proxies.values()),
                   "dropped": sum(p.dropped for p in proxies.values())}
    return ChaosResult(config, report, dict(nemesis.injected), dict(nemesis.skipped),
                       unrecovered, time.monotonic() - started, history.path, proxy_stats,
                       nemesis.crashes, _node_errors(cluster.nodes))


#: Log lines that mean a node failed inside while its process lived on.
NODE_ERROR_MARKERS = ("raft driver failed", "unexpected error in handler",
                      "Task exception was never retrieved")


def _node_errors(nodes: list[NodeProcess]) -> list[str]:
    """Each marker line in the nodes' logs, with the exception line that ends its traceback."""
    found: list[str] = []
    for node in nodes:
        try:
            lines = node.log_path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for i, line in enumerate(lines):
            if any(marker in line for marker in NODE_ERROR_MARKERS):
                cause = next((candidate for candidate in lines[i + 1:i + 60]
                              if candidate and not candidate.startswith((" ", "Traceback"))),
                             "")
                found.append(f"{node.name}: {line.strip()[:160]} | {cause.strip()[:200]}")
    return found


async def _restart_stragglers(cluster: Cluster) -> list[str]:
    """Nodes that are not running after the heal get one more start; those that exit again
    within a few seconds are reported (e.g. they refuse to open a damaged data dir)."""
    failed: list[str] = []
    for node in cluster.nodes:
        if node.running:
            continue
        log.warning("%s is down after heal; restarting:\n%s", node.name, node.log_tail(15))
        cluster.start(node)
    await asyncio.sleep(3.0)
    for node in cluster.nodes:
        if not node.running:
            log.error("%s cannot start:\n%s", node.name, node.log_tail(30))
            failed.append(node.name)
    return failed


async def _converge_and_read(cluster: Cluster, live: list[NodeProcess], history: History,
                             ssl_context: Any) -> dict[str, NodeLog]:
    """After every fault healed: one write through the leader (commits everything before it in
    the leader's term), then wait until every live node has applied the same log, then read."""
    leader = await cluster.leader_among(live, timeout=CONVERGE_TIMEOUT)
    log.info("converging: leader %s", leader.name)
    client = DclClient([n.rpc_addr for n in live], ssl_context, timeout=5.0, retries=20)
    workload_like = Workload(history, [(n.name, n.rpc_addr) for n in live], ssl_context,
                             WorkloadConfig(), 0)
    try:
        deadline = time.monotonic() + CONVERGE_TIMEOUT
        attempt = 0
        while await workload_like.produce(client, "final", [f"final-barrier-{attempt}"],
                                          False) != OK:
            attempt += 1
            if time.monotonic() > deadline:
                raise AssertionError("no barrier write succeeded after healing")
            await asyncio.sleep(0.5)
    finally:
        await client.close()

    async def same_tail() -> int | None:
        tails = {await n.next_offset() for n in live}
        return tails.pop() if len(tails) == 1 else None

    deadline = time.monotonic() + CONVERGE_TIMEOUT
    tail: int | None = None
    while time.monotonic() < deadline:
        with contextlib.suppress(*_RPC_ERRORS):
            tail = await same_tail()
            if tail is not None:
                break
        await asyncio.sleep(0.2)
    if tail is None:
        log.error("nodes did not converge within %.0fs", CONVERGE_TIMEOUT)
    logs: dict[str, NodeLog] = {}
    for node in live:
        for attempt in range(5):
            try:
                logs[node.name] = await _read_log(node, tail)
                break
            except _RPC_ERRORS as exc:
                if attempt == 4:
                    logs[node.name] = NodeLog([], [f"final log unreadable: {exc!r}"])
                await asyncio.sleep(1.0)
    return logs


async def _read_log(node: NodeProcess, tail: int | None) -> NodeLog:
    """Every record from offset 0 (or the node's first, if retention cut below it) to the
    node's tail. A range the node refuses (DATA_LOSS) is read record by record and the
    refused offsets become None."""
    values: list[str | None] = []
    errors: list[str] = []
    first = 0
    with node.channel() as channel:
        batch = batch_grpc.BatchStub(channel)
        single = log_grpc.LogStub(channel)
        end = tail
        while end is None or len(values) < end:
            offset = len(values)
            try:
                reply = await batch.ConsumeBatch(
                    batch_pb2.ConsumeBatchRequest(offset=offset), timeout=10.0)
                assert reply is not None
            except GRPCError as exc:
                if exc.status is Status.OUT_OF_RANGE and not values:
                    held = OffsetOutOfRange.from_message(offset, exc.message or "")
                    if held.lowest is not None and held.lowest > 0:
                        first = held.lowest  # retention: read on from the node's first
                        values = [None] * first
                        continue
                if exc.status is not Status.DATA_LOSS:
                    raise
                try:
                    one = await single.Consume(log_pb2.ConsumeRequest(offset=offset),
                                               timeout=10.0)
                    assert one is not None
                    records = [one.record]
                except GRPCError as exc2:
                    if exc2.status is Status.OUT_OF_RANGE:
                        break
                    if exc2.status is not Status.DATA_LOSS:
                        raise
                    values.append(None)
                    continue
            else:
                records = list(reply.records)
                end = reply.next_offset
                if not records:
                    break
            for record in records:
                if record.offset != len(values):
                    errors.append(f"record at position {len(values)} says offset "
                                  f"{record.offset}")
                values.append(record.value.decode(errors="replace"))
    return NodeLog(values, errors, first=first)
