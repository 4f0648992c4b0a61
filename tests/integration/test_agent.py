"""One in-process agent on real files, real TLS sockets and free ports, under storage faults.

A damaged commit log must not stop a node from taking writes (snapshots are skipped, the Raft
log keeps the entries); a Raft storage that fails under the driver must end the process with
an error rather than leave a node that accepts connections but can never commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import typer
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from dcl.agent.agent import Agent, AgentConfig
from dcl.api.log.v1 import log_grpc, log_pb2
from dcl.cli.agent import run_agent
from dcl.server.certs import PkiFiles
from dcl.server.replicated import LogFsm
from dcl.tls import client_context
from tests.integration.cluster_harness import node_port

pytestmark = pytest.mark.timeout(60)


def config(pki: PkiFiles, data_dir: Path, **overrides: object) -> AgentConfig:
    values: dict[str, object] = dict(
        data_dir=data_dir, node_name="solo", bootstrap=True, rpc_port=node_port(),
        bind_addr=f"127.0.0.1:{node_port()}", gossip_key_file=pki.gossip_key,
        server_tls_cert_file=pki.server_cert, server_tls_key_file=pki.server_key,
        server_tls_ca_file=pki.ca_cert, peer_tls_cert_file=pki.peer_cert,
        peer_tls_key_file=pki.peer_key, peer_tls_ca_file=pki.ca_cert,
        acl_model_file=pki.acl_model, acl_policy_file=pki.acl_policy, log_level="WARNING",
    )
    values.update(overrides)
    return AgentConfig(**values)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def log_stub(pki: PkiFiles, port: int) -> AsyncIterator[log_grpc.LogStub]:
    ctx = client_context(pki.root_client_cert, pki.root_client_key, pki.ca_cert)
    channel = Channel("127.0.0.1", port, ssl=ctx)
    try:
        yield log_grpc.LogStub(channel)
    finally:
        channel.close()


async def produce_when_ready(stub: log_grpc.LogStub, value: bytes, timeout: float = 10) -> int:
    """Produce, retrying while the new node has no leader yet."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            request = log_pb2.ProduceRequest(record=log_pb2.Record(value=value))
            return (await stub.Produce(request, timeout=5)).offset
        except GRPCError as exc:
            if exc.status is not Status.FAILED_PRECONDITION or loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_a_damaged_commit_log_skips_snapshots_but_keeps_taking_writes(
    pki: PkiFiles, tmp_path: Path
) -> None:
    cfg = config(pki, tmp_path / "node", segment_bytes=4096, snapshot_threshold_entries=20)
    agent = Agent(cfg)
    await agent.start()
    try:
        async with log_stub(pki, cfg.rpc_port) as stub:
            for i in range(30):  # past one snapshot, and several closed 4 KiB segments
                await produce_when_ready(stub, b"before-%03d" % i + b"x" * 200)
            first_snapshot = agent.driver.core.first_index
            assert first_snapshot > 1, "expected a snapshot before the damage"
            stores = sorted((cfg.data_dir / "fsm" / "commitlog").glob("*.store"))
            assert len(stores) >= 2  # the first is closed
            with open(stores[0], "r+b") as f:  # zero a block inside a closed segment
                f.seek(100)
                f.write(b"\0" * 64)

            for i in range(60):  # crosses the next snapshot points: each is skipped
                await produce_when_ready(stub, b"after-%03d" % i)
            assert not agent.failed.is_set()
            assert agent.driver.core.first_index == first_snapshot, "compacted over damage"
            with pytest.raises(GRPCError) as info:  # the damage is reported, not served
                await stub.Consume(log_pb2.ConsumeRequest(offset=0))
            assert info.value.status is Status.DATA_LOSS
            last = (await stub.Consume(log_pb2.ConsumeRequest(offset=89))).record
            assert (last.value, last.offset) == (b"after-059", 89)
    finally:
        await agent.shutdown()


async def test_a_failing_raft_storage_ends_the_agent_with_an_error(
    pki: PkiFiles, tmp_path: Path
) -> None:
    cfg = config(pki, tmp_path / "node")
    agents: list[Agent] = []
    original = Agent.__init__

    def remember(self: Agent, c: AgentConfig) -> None:
        original(self, c)
        agents.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Agent, "__init__", remember)
        running = asyncio.ensure_future(run_agent(cfg))
        async with log_stub(pki, cfg.rpc_port) as stub:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while True:  # until the node serves
                try:
                    await produce_when_ready(stub, b"ok")
                    break
                except (OSError, GRPCError):
                    assert loop.time() < deadline
                    await asyncio.sleep(0.05)
            agents[0]._storage.close()  # the disk goes away under the driver
            with pytest.raises(GRPCError):
                await stub.Produce(log_pb2.ProduceRequest(record=log_pb2.Record(value=b"x")),
                                   timeout=5)
        with pytest.raises(typer.Exit) as exit_info:
            await asyncio.wait_for(running, timeout=20)
    assert exit_info.value.exit_code != 0
    assert agents[0].failure is not None


def _io_error() -> None:
    """A checkpoint on a failing disk."""
    raise OSError(errno.EIO, "Input/output error")


@pytest.mark.parametrize("when", ["while serving", "at shutdown"])
async def test_a_failing_commit_log_checkpoint_fails_the_agent(
    pki: PkiFiles, tmp_path: Path, when: str
) -> None:
    """The commit log's disk fails under a checkpoint (EIO from its fsync). While serving,
    the node must not go on without checkpoints (it could not vouch for its log, and its
    Raft log would never be compacted again); at a stop, it must not exit as if all were
    well. Either way it reports the failure (the process exits with an error), and the
    commit log is still closed, not left locked."""
    cfg = config(pki, tmp_path / "node", checkpoint_seconds=0.05 if when == "while serving" else 60)
    agent = Agent(cfg)
    await agent.start()
    try:
        async with log_stub(pki, cfg.rpc_port) as stub:
            await produce_when_ready(stub, b"ok")
            agent.fsm.checkpoint = _io_error  # type: ignore[method-assign]
            if when == "while serving":
                await asyncio.wait_for(agent.failed.wait(), timeout=10)
    finally:
        await agent.shutdown()
    assert isinstance(agent.failure, OSError) and agent.failure.errno == errno.EIO
    LogFsm(cfg.data_dir / "fsm").close()
