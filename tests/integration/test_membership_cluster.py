"""Self-organising clusters: real `dcl agent` processes that find each other through gossip.

node-0 bootstraps; every other node only knows node-0's (or a peer's) gossip address, never
an RPC address: the Raft leader admits members gossip reports alive (learner first, voter
once caught up) and removes members gossip reports failed or left.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcl.server.certs import PkiFiles
from tests.integration.cluster_harness import TRANSIENT, Cluster, NodeProcess, eventually

pytestmark = pytest.mark.timeout(120)

SETTLE = 30.0


async def raft_members(node: NodeProcess) -> dict[str, bool]:
    """The Raft configuration as `node`'s Admin Cluster view reports it: id -> voter."""
    return {s.id: s.voter for s in (await node.cluster()).servers}


async def wait_for_log(node: NodeProcess, expected: dict[int, bytes]) -> None:
    need = max(expected) + 1

    async def present() -> bool:
        values = await node.consume_all()
        if len(values) < need:
            return False
        assert {o: values[o] for o in expected} == expected, f"{node.name} diverged"
        return True

    await eventually(present, timeout=SETTLE, what=f"{node.name} holds offsets 0..{need - 1}")


async def test_three_agents_joined_through_gossip_replicate_and_bound_reads(
    pki: PkiFiles, tmp_path: Path
) -> None:
    async with Cluster(pki, tmp_path, gossip=True) as cluster:
        leader = await cluster.wait_for_members(cluster.nodes, timeout=SETTLE)
        await eventually(lambda: _all_voters(leader, {n.name for n in cluster.nodes}),
                         timeout=SETTLE, what="every node a voter")
        offset = await leader.produce(b"hello, gossip")
        follower = cluster.others(leader)[0]

        async def readable() -> bytes | None:
            return await follower.consume(offset)

        assert await eventually(readable, timeout=5, what="record on follower") == (
            b"hello, gossip")
        # One past the end: OUT_OF_RANGE (the harness maps it to None).
        assert await follower.consume(offset + 1) is None
        views = [(await n.cluster()).servers for n in cluster.nodes]
        for servers in views:
            assert {s.gossip_state for s in servers} == {"alive"}


async def _all_voters(node: NodeProcess, names: set[str]) -> bool:
    members = await raft_members(node)
    return set(members) == names and all(members.values())


async def test_cluster_heals_itself_on_join_crash_and_graceful_leave(
    pki: PkiFiles, tmp_path: Path
) -> None:
    async with Cluster(pki, tmp_path, gossip=True) as cluster:
        leader = await cluster.wait_for_members(cluster.nodes, timeout=SETTLE)
        acked: dict[int, bytes] = {}
        for i in range(20):
            first = await leader.produce_batch([b"early-%d-a" % i, b"early-%d-b" % i])
            acked |= {first: b"early-%d-a" % i, first + 1: b"early-%d-b" % i}

        # A fourth node, told only a gossip address, is admitted and receives the whole log.
        fourth = cluster.add_node()
        await cluster.wait_for_members(cluster.nodes, timeout=SETTLE)
        await eventually(lambda: _all_voters(leader, {n.name for n in cluster.nodes}),
                         timeout=SETTLE, what="node-3 promoted to voter")
        await wait_for_log(fourth, acked)

        # SIGKILL a follower: gossip declares it failed and the leader removes it.
        victim = next(n for n in cluster.others(leader) if n is not fourth)
        victim.kill()
        killed_at = time.monotonic()
        survivors = cluster.others(victim)

        async def removed() -> bool:
            return victim.name not in await raft_members(leader)

        await eventually(removed, timeout=SETTLE, what=f"{victim.name} removed after SIGKILL")
        removal_seconds = time.monotonic() - killed_at
        sys.stderr.write(f"SIGKILL -> removed from Raft in {removal_seconds:.2f}s\n")
        await cluster.wait_for_members(survivors, timeout=SETTLE)
        offset = await leader.produce(b"after-crash")
        acked[offset] = b"after-crash"

        # Restarted on its old data, it refutes its death in gossip and is admitted again.
        cluster.start(victim)
        await cluster.wait_for_members(cluster.nodes, timeout=SETTLE)
        await eventually(lambda: _all_voters(leader, {n.name for n in cluster.nodes}),
                         timeout=SETTLE, what=f"{victim.name} a voter again")
        await wait_for_log(victim, acked)

        # SIGTERM the leader: leadership moves first, it leaves gossip and Raft cleanly.
        producing = asyncio.create_task(_produce_until_refused(leader, acked))
        await asyncio.sleep(0.2)
        leader.terminate()
        assert leader.proc is not None
        rc = await asyncio.to_thread(leader.proc.wait, 15)
        assert rc == 0, f"graceful shutdown failed:\n{leader.log_tail()}"
        await asyncio.wait_for(producing, timeout=SETTLE)
        log_text = leader.log_path.read_text()
        assert "Traceback" not in log_text, leader.log_tail(60)
        assert "leadership transfer to=" in log_text and "done=True" in log_text, (
            leader.log_tail(60))
        remaining = cluster.others(leader)
        new_leader = await cluster.wait_for_members(remaining, timeout=SETTLE)
        assert new_leader is not leader
        for node in remaining:
            async def dropped(node: NodeProcess = node) -> bool:
                return leader.name not in await raft_members(node)

            await eventually(dropped, timeout=SETTLE, what=f"{node.name} dropped the old leader")
        # Everyone saw a graceful leave, never a failure.
        for node in remaining:
            text = node.log_path.read_text()
            assert f"event=leave name={leader.name}" in text, node.log_tail(60)
            assert f"event=failed name={leader.name}" not in text, node.log_tail(60)
        for i in range(5):
            offset = await new_leader.produce(b"after-leave-%d" % i)
            acked[offset] = b"after-leave-%d" % i
        for node in remaining:
            await wait_for_log(node, acked)


async def _produce_until_refused(node: NodeProcess, acked: dict[int, bytes]) -> None:
    """Produce to `node` until it stops accepting; every acknowledged offset is recorded."""
    for n in range(100_000):
        value = b"during-leave-%d" % n
        try:
            offset = await node.produce(value)
        except TRANSIENT:
            return
        assert offset not in acked, f"offset {offset} acknowledged twice"
        acked[offset] = value


def test_agent_refuses_to_start_gossip_without_a_key(pki: PkiFiles, tmp_path: Path) -> None:
    args = [
        sys.executable, "-m", "dcl.cli.main", "agent", "--node-name", "n0",
        "--data-dir", str(tmp_path / "n0"), "--bootstrap",
        "--acl-model-file", str(pki.acl_model), "--acl-policy-file", str(pki.acl_policy),
        "--server-tls-cert-file", str(pki.server_cert),
        "--server-tls-key-file", str(pki.server_key), "--server-tls-ca-file", str(pki.ca_cert),
        "--peer-tls-cert-file", str(pki.peer_cert), "--peer-tls-key-file", str(pki.peer_key),
        "--peer-tls-ca-file", str(pki.ca_cert),
    ]
    done = subprocess.run(args, capture_output=True, timeout=30, env=_env_without_dcl())
    assert done.returncode != 0
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "--insecure-gossip" in lines[0], done.stderr.decode()
    assert not (tmp_path / "n0").exists(), "nothing may start before the check"


def _env_without_dcl() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("DCL_")}


async def test_nodes_that_gossiped_before_the_seed_was_up_are_still_admitted(
    pki: PkiFiles, tmp_path: Path
) -> None:
    """node-1 and node-2 start first and find each other (their own gossip cluster); node-0
    bootstraps later. Without re-joining the seeds the two gossip views would never merge and
    the leader would never admit them."""
    cluster = Cluster(pki, tmp_path, gossip=True)
    seed, a, b = cluster.nodes
    try:
        everyone = [n.gossip_addr for n in cluster.nodes]
        for node in (a, b):
            node.start(bootstrap=False, join=[], start_join=everyone,
                       snapshot_threshold=cluster.snapshot_threshold)
        await asyncio.sleep(3.0)  # long enough for a and b to gossip-join each other
        seed.start(bootstrap=True, join=[], start_join=[],
                   snapshot_threshold=cluster.snapshot_threshold)
        leader = await cluster.wait_for_members(cluster.nodes, timeout=SETTLE)
        await eventually(lambda: _all_voters(leader, {n.name for n in cluster.nodes}),
                         timeout=SETTLE, what="every node a voter")
        offset = await leader.produce(b"merged")
        for node in cluster.nodes:
            await wait_for_log(node, {offset: b"merged"})
    finally:
        cluster.close()
