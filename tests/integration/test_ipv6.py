"""A cluster on IPv6 loopback only: `--bind-addr [::1]:PORT` for every node, real processes.

Every socket (RPC, Raft, gossip) binds to ::1, every advertised address is written in
brackets, and the certificates `dcl certs init` writes name ::1, so mutual TLS verifies the
server by its IP. Before, the RPC host kept its brackets and no node could start.
"""

from __future__ import annotations

import functools
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from grpclib.const import Status

from dcl.server.certs import PkiFiles
from tests.integration.cluster_harness import Cluster, eventually

pytestmark = pytest.mark.timeout(120)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def run_dcl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dcl.cli.main", *args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
async def test_a_cluster_bound_to_ipv6_loopback_replicates_redirects_and_fails_over(
    pki: PkiFiles, tmp_path: Path
) -> None:
    async with Cluster(pki, tmp_path, gossip=True, host="::1") as cluster:
        # Cluster waited until every node's GetServers listed all three as [::1]:port.
        leader = await cluster.wait_for_members(cluster.nodes, timeout=30)
        assert all(n.rpc_addr.startswith("[::1]:") for n in cluster.nodes)
        followers = cluster.others(leader)
        offset = await leader.produce(b"over ipv6")
        for follower in followers:
            assert await eventually(functools.partial(follower.consume, offset), timeout=10,
                                    what=f"record on {follower.name}") == b"over ipv6"
        # A follower's refusal names the leader as clients must dial it.
        assert await followers[0].produce_refusal(b"x") == (
            Status.FAILED_PRECONDITION, leader.rpc_addr)

        # The CLI, given only a follower's address, finds the leader through the hint.
        tls = ["--ca-file", str(pki.ca_cert), "--cert-file", str(pki.root_client_cert),
               "--key-file", str(pki.root_client_key), "--addr", followers[0].rpc_addr]
        produced = run_dcl("produce", "from the cli", *tls)
        assert produced.returncode == 0, produced.stderr
        assert produced.stdout.strip() == str(offset + 1)  # one value: just its offset
        consumed = run_dcl("consume", "--from", "0", "--count", "2", *tls)
        assert consumed.returncode == 0, consumed.stderr
        assert consumed.stdout.splitlines() == ["over ipv6", "from the cli"]

        # Raft over ::1 elects a new leader after a crash, and nothing acked is lost.
        leader.kill()
        survivors = [n for n in cluster.nodes if n is not leader]
        new_leader = await cluster.leader_among(survivors, timeout=30)
        assert await new_leader.consume_all() == [b"over ipv6", b"from the cli"]
        after = await eventually(lambda: new_leader.produce(b"after failover"), timeout=15,
                                 what="a produce on the new leader")
        assert after == offset + 2
