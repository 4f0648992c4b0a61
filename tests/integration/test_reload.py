"""SIGHUP on real `dcl agent` processes: certificates renewed with `dcl certs renew` and a
new ACL policy take effect without a restart, and a bad file changes nothing.

What an operator rotating certificates before they expire, or granting a new client,
checks: new connections see the new certificate, the new client gets in, the cluster
keeps replicating throughout, a broken file is reported (log line, metric) and ignored.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from dcl.api.log.v1 import log_grpc, log_pb2
from dcl.server.certs import PkiFiles, generate_pki
from dcl.tls import client_context
from tests.integration.cluster_harness import Cluster, NodeProcess, eventually
from tests.integration.test_metrics_endpoint import one, serve_metrics

pytestmark = pytest.mark.timeout(120)


def serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


async def served_serial(node: NodeProcess, pki: PkiFiles) -> int:
    """The serial of the certificate a new connection to node's RPC port is shown."""
    ctx = client_context(pki.root_client_cert, pki.root_client_key, pki.ca_cert)
    _, writer = await asyncio.open_connection("127.0.0.1", node.port, ssl=ctx,
                                              server_hostname="127.0.0.1")
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    return x509.load_der_x509_certificate(der).serial_number


async def produce_as_nobody(node: NodeProcess, pki: PkiFiles) -> int | Status:
    """The offset, or the status refusing it."""
    channel = Channel("127.0.0.1", node.port, ssl=client_context(
        pki.nobody_client_cert, pki.nobody_client_key, pki.ca_cert))
    try:
        reply = await log_grpc.LogStub(channel).Produce(
            log_pb2.ProduceRequest(record=log_pb2.Record(value=b"from nobody")), timeout=5)
        assert reply is not None
        return int(reply.offset)
    except GRPCError as exc:
        return exc.status
    finally:
        channel.close()


def hang_up(nodes: list[NodeProcess]) -> None:
    for node in nodes:
        assert node.proc is not None
        node.proc.send_signal(signal.SIGHUP)


async def test_sighup_loads_renewed_certificates_and_a_new_policy_and_refuses_a_bad_one(
    tmp_path: Path,
) -> None:
    pki = generate_pki(tmp_path / "pki")  # this test rewrites its files
    cluster = Cluster(pki, tmp_path / "nodes")
    scrape = serve_metrics(cluster, pki)
    async with cluster:
        leader = await cluster.wait_for_members(cluster.nodes, timeout=30)
        assert await produce_as_nobody(leader, pki) is Status.PERMISSION_DENIED
        old_serial = serial(pki.server_cert.read_bytes())
        assert {await served_serial(n, pki) for n in cluster.nodes} == {old_serial}
        assert one(await scrape(leader), "dcl_config_reloads_total", result="ok") == 0

        # Grant nobody produce and renew the node certificates, then SIGHUP every node.
        with pki.acl_policy.open("a") as f:
            f.write("p, nobody, *, produce\n")
        renewed = subprocess.run([sys.executable, "-m", "dcl.cli.main", "certs", "renew",
                                  str(pki.directory)], capture_output=True, text=True,
                                 timeout=60)
        assert renewed.returncode == 0, renewed.stderr
        new_serial = serial(pki.server_cert.read_bytes())
        assert new_serial != old_serial
        hang_up(cluster.nodes)

        async def granted() -> int | None:
            outcome = await produce_as_nobody(leader, pki)
            return outcome if isinstance(outcome, int) else None

        offset = await eventually(granted, timeout=10, what="nobody may produce")
        for node in cluster.nodes:
            async def reloaded(node: NodeProcess = node) -> bool:  # its own SIGHUP, in time
                return one(await scrape(node), "dcl_config_reloads_total", result="ok") == 1

            await eventually(reloaded, timeout=10, what=f"{node.name} reloaded")
            assert await served_serial(node, pki) == new_serial
            samples = await scrape(node)
            expires = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
            assert one(samples, "dcl_tls_certificate_expiration_timestamp_seconds",
                       certificate="server") == expires.not_valid_after_utc.timestamp()
        # Replication went on through it, over the peers' (new) connections.
        follower = cluster.others(leader)[0]
        follower.kill()
        cluster.start(follower)
        await eventually(lambda: follower.consume(offset), timeout=30,
                         what="the restarted follower has nobody's record")

        # A typo in the policy: refused, logged, counted; the node goes on as it was.
        good = pki.acl_policy.read_text()
        pki.acl_policy.write_text(good + "p, nobody, *\n")
        hang_up([leader])

        async def refused() -> float | None:
            samples = await scrape(leader)
            errors = one(samples, "dcl_config_reloads_total", result="error")
            return errors if errors == 1 else None

        await eventually(refused, timeout=10, what="the bad reload counted")
        assert "reload failed, the node goes on as it was" in leader.log_path.read_text()
        assert "a 'p' line takes 3 non-empty fields" in leader.log_path.read_text()
        assert isinstance(await produce_as_nobody(leader, pki), int)  # the grant still holds
        assert await served_serial(leader, pki) == new_serial
        assert leader.running
