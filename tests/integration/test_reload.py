"""SIGHUP on real `dcl agent` processes: certificates renewed with `dcl certs renew`, a
new ACL policy, a new CA (`dcl certs rotate-ca`) and a new gossip key (`dcl certs
gossip-key`) take effect without a restart, and a bad file changes nothing.

What an operator rotating certificates before they expire, replacing a CA or a gossip key,
or granting a new client, checks: new connections see the new certificate, the new client
gets in, the old CA's certificates and the old gossip key are shut out at the end, the
cluster keeps replicating throughout, a broken file is reported (log line, metric) and
ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from dcl.agent.agent import Agent, ReloadFailed
from dcl.api.log.v1 import log_grpc, log_pb2
from dcl.membership import GossipConfig, JoinFailed, Membership, key_fingerprint, load_keyring
from dcl.server.certs import PkiFiles, generate_pki
from dcl.tls import client_context
from tests.integration.cluster_harness import Cluster, NodeProcess, eventually
from tests.integration.test_agent import config
from tests.integration.test_metrics_endpoint import Samples, one, serve_metrics

Scrape = Callable[[NodeProcess], Coroutine[None, None, Samples]]

pytestmark = pytest.mark.timeout(120)


def serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


async def served_certificate(node: NodeProcess, pki: PkiFiles) -> x509.Certificate:
    """The certificate a new connection to node's RPC port is shown."""
    ctx = client_context(pki.root_client_cert, pki.root_client_key, pki.ca_cert)
    _, writer = await asyncio.open_connection("127.0.0.1", node.port, ssl=ctx,
                                              server_hostname="127.0.0.1")
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    return x509.load_der_x509_certificate(der)


async def served_serial(node: NodeProcess, pki: PkiFiles) -> int:
    return (await served_certificate(node, pki)).serial_number


async def shown_issuer(node: NodeProcess, pki: PkiFiles) -> str:
    return (await served_certificate(node, pki)).issuer.rfc4514_string()


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


def dcl(*args: str) -> str:
    ran = subprocess.run([sys.executable, "-m", "dcl.cli.main", *args], capture_output=True,
                         text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    return ran.stdout


def status_config(cluster: Cluster, pki: PkiFiles) -> dict[str, dict[str, Any]]:
    """`dcl status --config` as an operator runs it between steps: node -> its row."""
    out = dcl("status", "--config", "--output", "json",
              *(a for node in cluster.nodes for a in ("--addr", node.rpc_addr)),
              "--ca-file", str(pki.ca_cert), "--cert-file", str(pki.root_client_cert),
              "--key-file", str(pki.root_client_key))
    return {row["node"]: row for row in json.loads(out)}


@contextlib.asynccontextmanager
async def connection(node: NodeProcess, cert: Path, key: Path, ca: Path
                     ) -> AsyncIterator[asyncio.StreamReader | None]:
    """A TLS connection to node's RPC port with this client certificate: its reader once
    accepted (the server sent its HTTP/2 settings), None if refused (an alert, as TLS 1.3
    tells the client after its own side of the handshake, or the end of the stream)."""
    ctx = client_context(cert, key, ca)
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port, ssl=ctx,
                                                   server_hostname="127.0.0.1")
    try:
        try:
            accepted = bool(await asyncio.wait_for(reader.read(9), 10))
        except (ssl.SSLError, ConnectionError):
            accepted = False
        yield reader if accepted else None
    finally:
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            writer.close()


async def accepts(node: NodeProcess, cert: Path, key: Path, ca: Path) -> bool:
    async with connection(node, cert, key, ca) as reader:
        return reader is not None


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 10) -> bool:
    """Whether the other end closes this connection within timeout (reading what comes)."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except (ssl.SSLError, ConnectionError):
        pass
    return True


async def reload_every_node(cluster: Cluster, scrape: Scrape, count: int) -> None:
    """SIGHUP every node; returns once each has counted ``count`` good reloads, and none
    failed."""
    hang_up(cluster.nodes)
    for node in cluster.nodes:
        async def reloaded(node: NodeProcess = node) -> bool:
            samples = await scrape(node)
            assert one(samples, "dcl_config_reloads_total", result="error") == 0
            return one(samples, "dcl_config_reloads_total", result="ok") == count

        await eventually(reloaded, timeout=10, what=f"{node.name} reloaded")


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
        # What an operator without a scraper checks: every node took it.
        expire_at = int(min(x509.load_pem_x509_certificate(path.read_bytes())
                            .not_valid_after_utc.timestamp()
                            for path in (pki.server_cert, pki.peer_cert)))
        for row in status_config(cluster, pki).values():
            assert (row["reloads_ok"], row["reloads_failed"]) == (1, 0), row
            assert row["certificates_expire"] == expire_at, row
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
        assert status_config(cluster, pki)[leader.name]["reloads_failed"] == 1
        assert await served_serial(leader, pki) == new_serial
        assert leader.running


async def test_a_ca_rotation_under_a_running_cluster_ends_with_only_the_new_ca_trusted(
    tmp_path: Path,
) -> None:
    """`dcl certs rotate-ca begin`, renew, reissue the clients, `finish`, a SIGHUP to every
    node after each step: the cluster takes writes and replicates throughout; at the end a
    client certificate from the old CA is refused, the connections it opened before are
    closed, and a node restarted then rejoins with the new certificates only."""
    pki = generate_pki(tmp_path / "pki")
    old = tmp_path / "old"  # a client that keeps its old-CA certificate
    old.mkdir()
    for path in (pki.root_client_cert, pki.root_client_key, pki.ca_cert):
        shutil.copy(path, old / path.name)
    old_cert, old_key = old / pki.root_client_cert.name, old / pki.root_client_key.name
    cluster = Cluster(pki, tmp_path / "nodes")
    scrape = serve_metrics(cluster, pki)
    async with cluster:
        leader = await cluster.wait_for_members(cluster.nodes, timeout=30)
        written = [await leader.produce(b"before")]
        old_issuer = await shown_issuer(leader, pki)
        reloads = 0

        async def step() -> None:
            nonlocal reloads
            reloads += 1
            await reload_every_node(cluster, scrape, reloads)
            written.append(await leader.produce(b"after reload %d" % reloads))

        dcl("certs", "rotate-ca", "begin", str(pki.directory))
        await step()
        dcl("certs", "renew", str(pki.directory))
        for name in ("root", "nobody"):
            dcl("certs", "client", str(pki.directory), name, "--force")
        await step()
        new_issuers = {await shown_issuer(node, pki) for node in cluster.nodes}
        assert len(new_issuers) == 1 and old_issuer not in new_issuers
        async with contextlib.AsyncExitStack() as held:
            # Both CAs are still trusted: the old client gets in (the checks below can fail),
            # and keeps a connection open to each node.
            readers = [await held.enter_async_context(
                connection(node, old_cert, old_key, pki.ca_cert)) for node in cluster.nodes]
            assert all(reader is not None for reader in readers)
            kept = await held.enter_async_context(connection(
                leader, pki.root_client_cert, pki.root_client_key, pki.ca_cert))
            assert kept is not None

            dcl("certs", "rotate-ca", "finish", str(pki.directory))
            await step()
            # The reload closed the connections the old CA's certificate had opened, and
            # only those.
            for reader in readers:
                assert reader is not None and await closed_by_peer(reader)
            assert not await closed_by_peer(kept, timeout=2)
        for node in cluster.nodes:
            assert not await accepts(node, old_cert, old_key, pki.ca_cert)
            assert await accepts(node, pki.root_client_cert, pki.root_client_key, pki.ca_cert)
        # A restarted follower dials and is dialed with new-CA certificates only.
        follower = cluster.others(leader)[0]
        follower.kill()
        cluster.start(follower)
        written.append(await leader.produce(b"after the restart"))
        for offset, value in zip(written, [b"before", b"after reload 1", b"after reload 2",
                                           b"after reload 3", b"after the restart"],
                                 strict=True):
            for node in cluster.nodes:
                async def has(node: NodeProcess = node, offset: int = offset,
                              value: bytes = value) -> bool:
                    return await node.consume(offset) == value

                await eventually(has, timeout=30, what=f"{node.name} holds offset {offset}")
        assert all(node.running for node in cluster.nodes)


async def test_a_gossip_key_rotation_under_a_running_cluster_never_loses_a_frame(
    tmp_path: Path,
) -> None:
    """`dcl certs gossip-key add`, `use`, `remove`, a SIGHUP to every node after each: no
    gossip frame fails to open at any step (so no member is ever suspected for it), every
    node reports the keys it holds, and at the end a stranger with the old key cannot
    join."""
    pki = generate_pki(tmp_path / "pki")
    (old_key,) = load_keyring(pki.gossip_key)
    old = key_fingerprint(old_key)
    cluster = Cluster(pki, tmp_path / "nodes", gossip=True)
    scrape = serve_metrics(cluster, pki)
    async with cluster:
        leader = await cluster.wait_for_members(cluster.nodes, timeout=30)

        def keys(samples: Samples) -> dict[str, str]:
            return {dict(labels)["fingerprint"]: dict(labels)["role"]
                    for (name, labels), value in samples.items()
                    if name == "dcl_gossip_key_info" and value == 1}

        async def rotate(count: int, *args: str) -> dict[str, str]:
            """One step, then a SIGHUP to one node at a time: while some nodes have taken
            the step and others not, gossip goes on (a probe every 0.5 s, gossip every
            0.2 s per node) and every frame opens."""
            dcl("certs", "gossip-key", *args)
            for node in cluster.nodes:
                hang_up([node])

                async def reloaded(node: NodeProcess = node) -> bool:
                    samples = await scrape(node)
                    return one(samples, "dcl_config_reloads_total", result="ok") == count

                await eventually(reloaded, timeout=10, what=f"{node.name} reloaded")
                await asyncio.sleep(1.0)
                for other in cluster.nodes:
                    samples = await scrape(other)
                    assert one(samples, "dcl_gossip_auth_failures_total") == 0, other.name
            held = [keys(await scrape(node)) for node in cluster.nodes]
            assert all(h == held[0] for h in held), held
            return held[0]

        assert keys(await scrape(leader)) == {old: "primary"}
        added = await rotate(1, "add", str(pki.gossip_key))
        (new,) = {key_fingerprint(k) for k in load_keyring(pki.gossip_key)} - {old}
        assert added == {old: "primary", new: "secondary"}
        assert await rotate(2, "use", str(pki.gossip_key), new) == {new: "primary",
                                                                     old: "secondary"}
        assert await rotate(3, "remove", str(pki.gossip_key), old) == {new: "primary"}
        # Every member alive, the Raft configuration untouched.
        for node in cluster.nodes:
            samples = await scrape(node)
            assert one(samples, "dcl_gossip_members", state="alive") == 3
            assert one(samples, "dcl_gossip_members", state="failed") == 0
            assert one(samples, "dcl_raft_voters") == 3
        assert isinstance(await leader.produce(b"after the rotation"), int)

        stranger = Membership(GossipConfig(node_name="stranger",
                                           bind_addr=("127.0.0.1", 0), key=old_key))
        await stranger.start()
        try:
            with pytest.raises(JoinFailed):
                await stranger.join([leader.gossip_addr], retries=1, timeout=3)
        finally:
            await stranger.stop()
        assert one(await scrape(leader), "dcl_gossip_auth_failures_total") > 0


async def test_a_reload_with_a_bad_gossip_key_file_changes_nothing(tmp_path: Path) -> None:
    """The key file is checked with everything else: one that does not parse, or that shares
    no key with the keys in use (members would stop hearing each other), leaves the keys,
    the ACL and the certificates as they were (all or nothing), naming what is wrong."""
    pki = generate_pki(tmp_path / "pki")
    agent = Agent(config(pki, tmp_path / "data"))
    await agent.start()
    try:
        assert agent.membership is not None
        (old,) = agent.membership.key_fingerprints
        assert agent._authorizer is not None
        assert not agent._authorizer.allowed("nobody", "produce")
        good_keys = pki.gossip_key.read_text()
        with pki.acl_policy.open("a") as f:
            f.write("p, nobody, *, produce\n")
        pki.gossip_key.write_text(good_keys + "not-a-key\n")
        with pytest.raises(ReloadFailed, match="line 2"):
            agent.reload()
        assert agent.membership.key_fingerprints == (old,)
        assert not agent._authorizer.allowed("nobody", "produce")  # the policy waited too
        assert agent.reloads == {"ok": 0, "error": 1}

        contexts = [live._current for live in agent._server_contexts]
        pki.gossip_key.write_text(bytes(range(32)).hex() + "\n")  # no key in common
        with pytest.raises(ReloadFailed, match="shares no key with the keys in use"):
            agent.reload()
        assert agent.membership.key_fingerprints == (old,)
        assert [live._current for live in agent._server_contexts] == contexts
        assert agent.reloads == {"ok": 0, "error": 2}

        pki.gossip_key.write_text(good_keys + bytes(range(32)).hex() + "\n")
        agent.reload()
        assert [live._current for live in agent._server_contexts] != contexts
        assert list(agent.membership.key_fingerprints) == [old,
                                                           key_fingerprint(bytes(range(32)))]
        assert agent._authorizer.allowed("nobody", "produce")
    finally:
        await agent.shutdown()
