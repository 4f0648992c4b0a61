"""The Raft transport over a real server: mutual TLS, the peer ACL and the message limits.

A receiver refuses a message over its limit by ending the stream, and every Raft message in
that batch is lost until a heartbeat's retransmission. So a sender must never build a batch
the receiver refuses, however much is queued: that failure does not show as an error, only
as replication slowed to one message per heartbeat.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dcl.api.dcl.v1 import raft_pb2
from dcl.raft.types import AppendEntries, Entry, EntryType, Heartbeat, Message
from dcl.server.acl import Action, Authorizer
from dcl.server.certs import PkiFiles, generate_pki
from dcl.server.local import LocalBackend
from dcl.server.raft_transport import GrpcTransport, RaftService
from dcl.server.server import DclServer, build_server
from dcl.server.services import Limits
from dcl.tls import TlsFiles, client_context, server_context
from tests.integration.conftest import LOG_CONFIG, eventually

pytestmark = pytest.mark.timeout(30)


class Inbox:
    """The receiving side's driver: it only records what the Raft service steps into it."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    def receive(self, m: Message) -> None:
        self.messages.append(m)


def append(index: int, size: int) -> AppendEntries:
    data = bytes([index % 256]) * size
    return AppendEntries(1, "n0", "n1", index - 1, 1 if index > 1 else 0,
                         (Entry(1, index, EntryType.NORMAL, data),), 0)


@pytest.fixture
async def receiver(
    pki: PkiFiles, authorizer: Authorizer, tmp_path: Path
) -> AsyncIterator[tuple[DclServer, Inbox]]:
    """A node server wired as the agent wires it (Raft service, peer message limit)."""
    backend = LocalBackend.open(tmp_path / "log", LOG_CONFIG, server_id="n1")
    inbox = Inbox()
    server = build_server(
        backend,
        ssl_context=server_context(pki.server_cert, pki.server_key, pki.ca_cert),
        authorizer=authorizer,
        limits=Limits(),
        extra_handlers=[RaftService(inbox, lambda node, addr: None)],  # type: ignore[arg-type]
        extra_actions={"/dcl.v1.Raft/Send": Action.PEER},
        peer_message_types=[raft_pb2.RaftBatch],
    )
    await server.start()
    try:
        yield server, inbox
    finally:
        await server.close()
        await backend.close()


async def test_a_burst_far_over_the_message_limit_arrives_whole_and_in_order(
    pki: PkiFiles, receiver: tuple[DclServer, Inbox]
) -> None:
    server, inbox = receiver
    transport = GrpcTransport(
        client_context(pki.peer_cert, pki.peer_key, pki.ca_cert), "127.0.0.1:1",
        lambda node: server.address if node == "n1" else None)
    # 8 x 600 KiB queued at once: 4.7 MiB, over four times what one message may carry.
    burst: list[Message] = [append(i, 600 << 10) for i in range(1, 9)]
    burst.insert(3, Heartbeat(1, "n0", "n1", 0, 0))
    try:
        transport.send(burst)
        await eventually(lambda: len(inbox.messages) == len(burst), timeout=20)
    finally:
        await transport.close()
    assert inbox.messages == burst


async def test_one_entry_from_the_largest_client_request_fits_a_peer_message(
    pki: PkiFiles, receiver: tuple[DclServer, Inbox]
) -> None:
    """A ProduceBatch may be as large as a client message, and its records become one Raft
    entry; wrapped in Raft framing it is a little larger than a client message may be."""
    server, inbox = receiver
    transport = GrpcTransport(
        client_context(pki.peer_cert, pki.peer_key, pki.ca_cert), "127.0.0.1:1",
        lambda node: server.address if node == "n1" else None)
    big = append(1, Limits().max_record_bytes + (64 << 10))
    try:
        transport.send([big, Heartbeat(1, "n0", "n1", 0, 0)])
        await eventually(lambda: len(inbox.messages) == 2, timeout=20)
    finally:
        await transport.close()
    assert inbox.messages[0] == big


async def test_an_unauthorized_peer_stream_delivers_nothing(
    pki: PkiFiles, receiver: tuple[DclServer, Inbox]
) -> None:
    """The larger peer limit is only for callers holding the peer right."""
    server, inbox = receiver
    transport = GrpcTransport(
        client_context(pki.nobody_client_cert, pki.nobody_client_key, pki.ca_cert),
        "127.0.0.1:1", lambda node: server.address if node == "n1" else None)
    try:
        transport.send([append(1, 100)])
        await asyncio.sleep(0.5)
    finally:
        await transport.close()
    assert inbox.messages == []


async def test_a_refused_stream_is_noticed_and_replaced(
    pki: PkiFiles, receiver: tuple[DclServer, Inbox], caplog: pytest.LogCaptureFixture
) -> None:
    """Nodes configured with different record limits: a message over the receiver's limit is
    refused. The sender must see that and open a new stream, not write on into one nobody
    reads (which would lose every later message)."""
    server, inbox = receiver
    transport = GrpcTransport(
        client_context(pki.peer_cert, pki.peer_key, pki.ca_cert), "127.0.0.1:1",
        lambda node: server.address if node == "n1" else None)
    try:
        transport.send([append(1, 8 << 20)])
        # Like Raft, keep resending what matters until it is heard.
        for _ in range(100):
            transport.send([Heartbeat(1, "n0", "n1", 0, 0)])
            await asyncio.sleep(0.1)
            if inbox.messages:
                break
    finally:
        await transport.close()
    assert inbox.messages and isinstance(inbox.messages[0], Heartbeat)
    refusals = [r.getMessage() for r in caplog.records
                if r.name == "dcl.server.raft_transport" and r.levelname == "WARNING"]
    assert refusals and "RESOURCE_EXHAUSTED" in refusals[0], refusals


async def test_a_peer_that_moves_is_dialled_at_its_new_address(
    pki: PkiFiles, receiver: tuple[DclServer, Inbox]
) -> None:
    server, inbox = receiver
    address = {"n1": server.address}
    transport = GrpcTransport(
        client_context(pki.peer_cert, pki.peer_key, pki.ca_cert), "127.0.0.1:1", address.get)
    try:
        transport.send([append(1, 10)])
        await eventually(lambda: len(inbox.messages) == 1, timeout=10)
        # Same server under another name: the sender must leave the old stream and dial it.
        address["n1"] = server.address.replace("127.0.0.1", "localhost")
        transport.send([append(2, 10)])
        await eventually(lambda: len(inbox.messages) == 2, timeout=10)
        transport.send([append(3, 10)])
        await eventually(lambda: len(inbox.messages) == 3, timeout=10)
    finally:
        await transport.close()
    assert [m.prev_index + 1 for m in inbox.messages if isinstance(m, AppendEntries)] == [1, 2, 3]


async def test_a_peer_address_that_does_not_parse_is_retried_not_given_up(
    pki: PkiFiles, receiver: tuple[DclServer, Inbox]
) -> None:
    """A malformed address (Raft state from an older version, a bad gossip tag) used to end
    the peer's sending task for good: fixed later, the peer still heard nothing."""
    server, inbox = receiver
    address = {"n1": "n1.internal:port"}
    transport = GrpcTransport(
        client_context(pki.peer_cert, pki.peer_key, pki.ca_cert), "127.0.0.1:1", address.get)
    try:
        transport.send([append(1, 10)])
        await asyncio.sleep(0.3)  # a few failed turns (backoff from 50 ms)
        assert inbox.messages == []
        address["n1"] = server.address
        transport.send([append(1, 10)])
        await eventually(lambda: len(inbox.messages) >= 1, timeout=10)
    finally:
        await transport.close()


async def test_a_redial_checks_each_peer_again_against_the_cas_trusted_now(
    pki: PkiFiles, receiver: tuple[DclServer, Inbox], tmp_path: Path
) -> None:
    """What a reload does when a CA left the peer CA file: a stream opened while that CA was
    trusted goes on by itself (OpenSSL checks a peer once, at the handshake), so the
    transport is told to redial, and the new handshake is refused."""
    server, inbox = receiver
    other = generate_pki(tmp_path / "other")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.ca_cert.read_bytes() + other.ca_cert.read_bytes())
    dialer = client_context(pki.peer_cert, pki.peer_key, bundle)
    transport = GrpcTransport(dialer, "127.0.0.1:1", {"n1": server.address}.get)
    try:
        transport.send([append(1, 10)])
        await eventually(lambda: len(inbox.messages) == 1, timeout=10)
        # The receiver's CA (pki's) leaves the file: only other's is trusted from now on.
        dialer.use(dialer.renewed(TlsFiles(pki.peer_cert.read_bytes(),
                                           pki.peer_key.read_bytes(),
                                           other.ca_cert.read_bytes(), 0, 0)))
        transport.send([append(2, 10)])
        await eventually(lambda: len(inbox.messages) == 2, timeout=10)  # the old stream
        transport.redial()
        transport.send([append(3, 10)])
        await asyncio.sleep(0.5)
        assert len(inbox.messages) == 2
    finally:
        await transport.close()
