"""The metrics endpoint of a real in-process agent, scraped over real mutual TLS.

What a Prometheus operator checks: the numbers match what the node did (records produced,
calls refused, its role and offsets), only certificates the ACL lets scrape get them, and
nothing a client sends on the port (garbage, a stranger's certificate, a huge or missing
request) gets anything but an error, or stops the endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from prometheus_client.parser import text_string_to_metric_families

import dcl
from dcl.agent.agent import Agent
from dcl.api.dcl.v1 import admin_grpc, admin_pb2
from dcl.api.log.v1 import log_grpc, log_pb2
from dcl.metrics import Family, Registry, gauge
from dcl.server.acl import Authorizer
from dcl.server.certs import PkiFiles, issue_client_certificate
from dcl.server.metrics_http import MAX_CONNECTIONS, MAX_HEAD_BYTES, MetricsServer
from dcl.tls import client_context, server_context
from tests.integration.cluster_harness import Cluster, NodeProcess, eventually, node_port
from tests.integration.test_agent import config, log_stub, produce_when_ready

pytestmark = pytest.mark.timeout(60)

SCRAPE = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\n\r\n"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def scraper_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    return client_context(cert, key, ca, alpn=("http/1.1",))


async def request(port: int, ctx: ssl.SSLContext, raw: bytes = SCRAPE) -> Reply:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                   server_hostname="127.0.0.1")
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    if not data:
        # TLS 1.3: a refused client certificate shows only after the client's handshake.
        raise ConnectionError("closed without a reply")
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    if not raw.startswith(b"HEAD "):
        assert int(headers["Content-Length"]) == len(body)
    return Reply(int(status_line.split()[1]), headers, body)


def values(body: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) -> value, through Prometheus' own parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def one(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
        **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
async def agent(pki: PkiFiles, tmp_path: Path) -> AsyncIterator[Agent]:
    node = Agent(config(pki, tmp_path / "data", metrics_port=0))
    await node.start()
    try:
        yield node
    finally:
        await node.shutdown()


def metrics_port(agent: Agent) -> int:
    assert agent.metrics_server is not None
    return agent.metrics_server.port


async def test_a_scrape_shows_what_the_node_did(agent: Agent, pki: PkiFiles) -> None:
    port = metrics_port(agent)
    root = scraper_context(pki.root_client_cert, pki.root_client_key, pki.ca_cert)
    async with log_stub(pki, agent.server.port) as stub:
        await produce_when_ready(stub, b"first")
        for i in range(24):
            await stub.Produce(log_pb2.ProduceRequest(record=log_pb2.Record(value=b"%d" % i)))
    nobody = Channel("127.0.0.1", agent.server.port, ssl=client_context(
        pki.nobody_client_cert, pki.nobody_client_key, pki.ca_cert))
    try:
        with pytest.raises(GRPCError) as refused:
            await log_grpc.LogStub(nobody).Produce(
                log_pb2.ProduceRequest(record=log_pb2.Record(value=b"no")))
        assert refused.value.status is Status.PERMISSION_DENIED
    finally:
        nobody.close()

    reply = await request(port, root)
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = values(reply.body)
    produced = one(samples, "dcl_rpc_calls_total", method="/log.v1.Log/Produce", code="OK")
    assert produced == 25
    assert one(samples, "dcl_rpc_calls_total", method="/log.v1.Log/Produce",
               code="PERMISSION_DENIED") == 1
    produce_calls = sum(v for (name, labels), v in samples.items()
                        if name == "dcl_rpc_calls_total"
                        and ("method", "/log.v1.Log/Produce") in labels)
    timed = one(samples, "dcl_rpc_duration_seconds_count", method="/log.v1.Log/Produce")
    # Every call is timed, refused ones and those made before a leader was elected too.
    assert timed == produce_calls >= 26
    assert one(samples, "dcl_rpc_duration_seconds_bucket", method="/log.v1.Log/Produce",
               le="+Inf") == timed
    assert one(samples, "dcl_log_next_offset") == 25
    assert one(samples, "dcl_log_first_offset") == 0
    assert one(samples, "dcl_log_segments") == 1
    log_bytes = sum(p.stat().st_size for p in (agent.config.data_dir / "fsm").rglob("*.store"))
    assert one(samples, "dcl_log_bytes") == log_bytes
    assert one(samples, "dcl_raft_role", role="leader") == 1
    assert one(samples, "dcl_raft_role", role="follower") == 0
    assert one(samples, "dcl_raft_leader_known") == 1
    assert one(samples, "dcl_raft_voters") == 1
    status = agent.driver.core.status()
    assert one(samples, "dcl_raft_term") == status.term
    assert one(samples, "dcl_raft_applied_index") == status.applied_index
    assert one(samples, "dcl_raft_commit_index") == status.commit_index >= 25
    # A lone leader has no followers to lag.
    assert not [k for k in samples if k[0] == "dcl_raft_peer_lag_entries"]
    # Every entry was fsynced before it was acknowledged: at least one group commit per write
    # minus what group commit merged, and never none.
    assert one(samples, "dcl_raft_fsync_duration_seconds_count") >= 1
    assert one(samples, "dcl_node_info", node="solo", version=dcl.__version__) == 1
    assert one(samples, "process_resident_memory_bytes") > 0
    # HEAD: the same headers, no body.
    head = await request(port, root, SCRAPE.replace(b"GET", b"HEAD"))
    assert (head.status, head.body) == (200, b"")
    assert int(head.headers["Content-Length"]) > 1000


async def test_calls_are_counted_by_the_status_their_client_got(
    agent: Agent, pki: PkiFiles
) -> None:
    """A deadline, a client's cancel and an admin refusal each under its own code."""
    root = scraper_context(pki.root_client_cert, pki.root_client_key, pki.ca_cert)
    async with log_stub(pki, agent.server.port) as stub:
        await produce_when_ready(stub, b"first")
        channel = Channel("127.0.0.1", agent.server.port, ssl=client_context(
            pki.root_client_cert, pki.root_client_key, pki.ca_cert))
        try:
            admin = admin_grpc.AdminStub(channel)
            # A voter that never catches up: Join waits past the caller's deadline.
            with pytest.raises(TimeoutError):  # grpclib's client side of DEADLINE_EXCEEDED
                await admin.Join(admin_pb2.JoinRequest(
                    id="ghost", rpc_addr="127.0.0.1:1", voter=True), timeout=0.5)
            # A tail-following stream the client walks away from.
            async with stub.ConsumeStream.open() as stream:
                await stream.send_message(log_pb2.ConsumeRequest(offset=0), end=True)
                assert (await stream.recv_message()) is not None
                await stream.cancel()
        finally:
            channel.close()

    async def counted() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        samples = values((await request(metrics_port(agent), root)).body)
        key = ("dcl_rpc_calls_total", frozenset(
            {("method", "/log.v1.Log/ConsumeStream"), ("code", "CANCELLED")}))
        return samples if key in samples else None

    samples = await eventually(counted, timeout=5)
    assert one(samples, "dcl_rpc_calls_total", method="/dcl.v1.Admin/Join",
               code="DEADLINE_EXCEEDED") == 1
    assert one(samples, "dcl_rpc_calls_total", method="/log.v1.Log/ConsumeStream",
               code="CANCELLED") == 1
    assert one(samples, "dcl_rpc_duration_seconds_count", method="/dcl.v1.Admin/Join") == 1
    # Methods never called still show their OK count, so rate() works from the first call.
    assert one(samples, "dcl_rpc_calls_total", method="/dcl.v1.Batch/ConsumeBatch",
               code="OK") == 0


async def test_only_certificates_the_acl_lets_scrape_get_metrics(
    pki: PkiFiles, tmp_path: Path, foreign_pki: PkiFiles
) -> None:
    # A dedicated scraper identity with only the `metrics` right.
    issue_client_certificate(pki.directory, "scraper", force=True)
    policy = tmp_path / "policy.csv"
    policy.write_text(pki.acl_policy.read_text() + "p, scraper, *, metrics\n")
    node = Agent(config(pki, tmp_path / "data", metrics_port=0, acl_policy_file=policy))
    await node.start()
    try:
        port = metrics_port(node)
        scraper = scraper_context(pki.directory / "scraper-client.pem",
                                  pki.directory / "scraper-client-key.pem", pki.ca_cert)
        assert (await request(port, scraper)).status == 200
        nobody = scraper_context(pki.nobody_client_cert, pki.nobody_client_key, pki.ca_cert)
        refused = await request(port, nobody)
        assert refused.status == 403
        assert b"permission denied" in refused.body
        assert b"dcl_" not in refused.body
        # A certificate from another CA never completes the handshake.
        stranger = scraper_context(foreign_pki.root_client_cert, foreign_pki.root_client_key,
                                   pki.ca_cert)
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await request(port, stranger)
        # The scraper may read metrics but nothing else.
        async with log_stub(pki, node.server.port) as stub:
            await produce_when_ready(stub, b"x")
        channel = Channel("127.0.0.1", node.server.port, ssl=client_context(
            pki.directory / "scraper-client.pem", pki.directory / "scraper-client-key.pem",
            pki.ca_cert))
        try:
            with pytest.raises(GRPCError) as denied:
                await log_grpc.LogStub(channel).Consume(log_pb2.ConsumeRequest(offset=0))
            assert denied.value.status is Status.PERMISSION_DENIED
        finally:
            channel.close()
        assert (await request(port, scraper)).status == 200  # still serving
    finally:
        await node.shutdown()


@contextlib.asynccontextmanager
async def serving(pki: PkiFiles, authorizer: Authorizer, read_timeout: float,
                  samples: int = 1) -> AsyncIterator[MetricsServer]:
    """A bare endpoint over a registry of `samples` gauges."""
    registry = Registry()
    registry.register(lambda: [gauge("dcl_test_up", "Up.", 1)] + [
        gauge(f"dcl_test_g{i}", "Padding.", i) for i in range(1, samples)])
    server = MetricsServer(
        registry, authorizer=authorizer, read_timeout=read_timeout,
        ssl_context=server_context(pki.server_cert, pki.server_key, pki.ca_cert,
                                   alpn=("http/1.1",)))
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def endpoint(pki: PkiFiles, authorizer: Authorizer) -> AsyncIterator[MetricsServer]:
    async with serving(pki, authorizer, read_timeout=0.5) as server:
        yield server


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET /other HTTP/1.1\r\n\r\n", 404),
    (b"GET /metricsx HTTP/1.1\r\n\r\n", 404),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /metrics SPDY/3\r\n\r\n", 400),
    (b"\x00\xff\xfe binary \x01\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n", 431),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n", 408),  # the head never ends
    (b"GET /metrics?debug=1 HTTP/1.0\r\n\r\n", 200),
])
async def test_bad_requests_get_an_error_and_the_endpoint_keeps_serving(
    endpoint: MetricsServer, pki: PkiFiles, raw: bytes, status: int
) -> None:
    root = scraper_context(pki.root_client_cert, pki.root_client_key, pki.ca_cert)
    reply = await request(endpoint.port, root, raw)
    assert reply.status == status
    if status == 405:
        assert reply.headers["Allow"] == "GET, HEAD"
    good = await request(endpoint.port, root)
    assert (good.status, b"dcl_test_up 1" in good.body) == (200, True)


async def test_plaintext_and_silent_connections_are_closed_and_serving_goes_on(
    endpoint: MetricsServer, pki: PkiFiles
) -> None:
    # Plain HTTP on the TLS port: the handshake fails and the connection is closed.
    reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
    writer.write(SCRAPE)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    # A TCP connection that never starts TLS is dropped after the handshake timeout.
    reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    # One that drops mid-request costs nothing.
    root = scraper_context(pki.root_client_cert, pki.root_client_key, pki.ca_cert)
    _, writer = await asyncio.open_connection("127.0.0.1", endpoint.port, ssl=root,
                                              server_hostname="127.0.0.1")
    writer.write(b"GET /met")
    await writer.drain()
    writer.close()
    reply = await request(endpoint.port, root)
    assert reply.status == 200


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def serve_metrics(cluster: Cluster, pki: PkiFiles
                  ) -> Callable[[NodeProcess], Coroutine[None, None, Samples]]:
    """Give every node of a cluster not yet started a metrics port; returns a scrape of a
    node (as root), checked to answer 200."""
    ports = {}
    for node in cluster.nodes:
        ports[node.name] = node_port()
        node.extra_args += ["--metrics-port", str(ports[node.name])]

    async def scrape(node: NodeProcess) -> Samples:
        # The files as they are now: a test may rotate them under a running cluster.
        root = scraper_context(pki.root_client_cert, pki.root_client_key, pki.ca_cert)
        reply = await request(ports[node.name], root)
        assert reply.status == 200
        return values(reply.body)

    return scrape


async def test_a_leader_shows_each_followers_lag_and_a_crashed_one_falls_behind(
    pki: PkiFiles, tmp_path: Path
) -> None:
    """Three real processes with --metrics-port: what an under-replication alert reads."""
    cluster = Cluster(pki, tmp_path)
    scrape = serve_metrics(cluster, pki)
    async with cluster:
        leader = await cluster.wait_for_members(cluster.nodes, timeout=30)
        followers = cluster.others(leader)
        end = await leader.produce_batch([b"v%d" % i for i in range(200)]) + 200

        async def replicated() -> bool:
            on_leader = await scrape(leader)
            # None while a follower is still a learner (voter="false"): joining nodes are
            # promoted once caught up, which may come after GetServers lists them.
            lags = [on_leader.get(("dcl_raft_peer_lag_entries",
                                   frozenset({"peer": f.name, "voter": "true"}.items())))
                    for f in followers]
            held = [one(await scrape(f), "dcl_log_next_offset") for f in followers]
            return lags == [0, 0] and held == [end, end]

        await eventually(replicated, timeout=15)
        on_leader = await scrape(leader)
        assert one(on_leader, "dcl_raft_role", role="leader") == 1
        assert one(on_leader, "dcl_raft_voters") == 3
        last = one(on_leader, "dcl_raft_last_index")
        assert [one(on_leader, "dcl_raft_peer_match_index", peer=f.name, voter="true")
                for f in followers] == [last, last]
        assert [one(on_leader, "dcl_raft_peer_active", peer=f.name, voter="true")
                for f in followers] == [1, 1]
        for follower in followers:
            on_follower = await scrape(follower)
            assert one(on_follower, "dcl_raft_role", role="follower") == 1
            assert not [k for k in on_follower if k[0] == "dcl_raft_peer_lag_entries"]
            # Every follower fsyncs each append it acknowledges.
            assert one(on_follower, "dcl_raft_fsync_duration_seconds_count") >= 1

        crashed, alive = followers
        crashed.kill()
        for _ in range(5):
            await leader.produce_batch([b"w"] * 10)

        async def lagging() -> bool:
            on_leader = await scrape(leader)
            return (one(on_leader, "dcl_raft_peer_lag_entries", peer=crashed.name,
                        voter="true") >= 5
                    and one(on_leader, "dcl_raft_peer_active", peer=crashed.name,
                            voter="true") == 0
                    and one(on_leader, "dcl_raft_peer_lag_entries", peer=alive.name,
                            voter="true") == 0)

        await eventually(lagging, timeout=15)


async def test_past_the_connection_limit_new_connections_are_closed_unread(
    pki: PkiFiles, authorizer: Authorizer
) -> None:
    """Connections count from accept, so clients that never start TLS (no certificate
    needed) cannot hold more than the limit either."""
    root = scraper_context(pki.root_client_cert, pki.root_client_key, pki.ca_cert)
    async with serving(pki, authorizer, read_timeout=30) as server:
        held = [await asyncio.open_connection("127.0.0.1", server.port)
                for _ in range(MAX_CONNECTIONS)]
        await eventually_true(lambda: server.active_connections == MAX_CONNECTIONS)
        with pytest.raises((ConnectionError, ssl.SSLError)):
            await request(server.port, root)
        for _, writer in held:
            writer.close()
        await eventually_true(lambda: server.active_connections == 0)
        assert (await request(server.port, root)).status == 200


async def test_a_client_that_does_not_read_its_answer_is_dropped(
    pki: PkiFiles, authorizer: Authorizer
) -> None:
    root = scraper_context(pki.root_client_cert, pki.root_client_key, pki.ca_cert)
    # About 8 MB of answer: far more than the sockets buffer, so the write waits on the client.
    async with serving(pki, authorizer, read_timeout=1.0, samples=100_000) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=root,
                                                       server_hostname="127.0.0.1")
        writer.write(SCRAPE)
        await writer.drain()
        await eventually_true(lambda: server.active_connections == 1)
        await eventually_true(lambda: server.active_connections == 0, timeout=10)
        received = b""
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while chunk := await asyncio.wait_for(reader.read(1 << 20), 5):
                received += chunk
        writer.close()
        # Dropped part way: what reached the client is less than the answer.
        length = int(received.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
        assert len(received.partition(b"\r\n\r\n")[2]) < length
        reply = await request(server.port, root)
        assert reply.status == 200 and reply.body.count(b"\n") == 300_000


async def test_a_head_request_for_an_error_gets_no_body(
    endpoint: MetricsServer, pki: PkiFiles
) -> None:
    root = scraper_context(pki.root_client_cert, pki.root_client_key, pki.ca_cert)
    reply = await request(endpoint.port, root, b"HEAD /other HTTP/1.1\r\n\r\n")
    assert (reply.status, reply.body) == (404, b"")
    assert int(reply.headers["Content-Length"]) > 0


async def test_a_failing_collector_gets_a_500_and_the_next_scrape_works(
    pki: PkiFiles, authorizer: Authorizer, caplog: pytest.LogCaptureFixture
) -> None:
    failures = [RuntimeError("log closed")]

    def flaky() -> list[Family]:
        if failures:
            raise failures.pop()
        return [gauge("dcl_test_flaky", "F.", 1)]

    registry = Registry()
    registry.register(flaky)
    server = MetricsServer(registry, authorizer=authorizer, ssl_context=server_context(
        pki.server_cert, pki.server_key, pki.ca_cert, alpn=("http/1.1",)))
    await server.start()
    root = scraper_context(pki.root_client_cert, pki.root_client_key, pki.ca_cert)
    try:
        assert (await request(server.port, root)).status == 500
        assert "metrics scrape failed" in caplog.text
        assert b"dcl_test_flaky 1" in (await request(server.port, root)).body
    finally:
        await server.close()


async def test_closing_with_connections_in_flight_drops_them_quietly(
    pki: PkiFiles, authorizer: Authorizer, caplog: pytest.LogCaptureFixture
) -> None:
    root = scraper_context(pki.root_client_cert, pki.root_client_key, pki.ca_cert)
    async with serving(pki, authorizer, read_timeout=30) as server:
        silent = await asyncio.open_connection("127.0.0.1", server.port)  # no TLS
        reader, writer = await asyncio.open_connection(  # TLS, half a request
            "127.0.0.1", server.port, ssl=root, server_hostname="127.0.0.1")
        writer.write(b"GET /metr")
        await writer.drain()
        await eventually_true(lambda: server.active_connections == 2)
        await asyncio.wait_for(server.close(), 5)
        assert server.active_connections == 0
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        silent[1].close()
    await asyncio.sleep(0.1)  # let any late callback log
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def eventually_true(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async def check() -> bool:
        return condition()

    await eventually(check, timeout=timeout)
