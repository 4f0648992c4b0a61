"""Fixtures for real grpclib servers over real mutual TLS on 127.0.0.1 free ports."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from grpclib.client import Channel
from grpclib.events import RecvRequest, listen

from dcl.server.acl import Authorizer
from dcl.server.certs import PkiFiles, generate_pki
from dcl.server.local import LocalBackend
from dcl.server.server import DclServer, build_server
from dcl.server.services import Limits
from dcl.storage import LogConfig
from dcl.tls import client_context, server_context

#: Small segments, so tests cross segment boundaries.
LOG_CONFIG = LogConfig(max_store_bytes=4 << 20, max_index_bytes=12 * 1024)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiFiles:
    return generate_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> PkiFiles:
    """A second, unrelated CA: its certificates must be refused by our servers."""
    return generate_pki(tmp_path_factory.mktemp("foreign-pki"))


@pytest.fixture(scope="session")
def authorizer(pki: PkiFiles) -> Authorizer:
    return Authorizer(pki.acl_model, pki.acl_policy)


@dataclass
class Node:
    """One running single-node server and what tests need to reach it."""

    server: DclServer
    backend: LocalBackend
    pki: PkiFiles
    directory: Path
    requests_seen: list[str] = field(default_factory=list)
    _channels: list[Channel] = field(default_factory=list)

    def channel(self, identity: str = "root", pki: PkiFiles | None = None) -> Channel:
        """A grpclib channel authenticating as identity (root, nobody or peer)."""
        files = pki or self.pki
        cert, key = {
            "root": (files.root_client_cert, files.root_client_key),
            "nobody": (files.nobody_client_cert, files.nobody_client_key),
            "peer": (files.peer_cert, files.peer_key),
        }[identity]
        ctx = client_context(cert, key, files.ca_cert)
        channel = Channel("127.0.0.1", self.server.port, ssl=ctx)
        self._channels.append(channel)
        return channel

    def close_channels(self) -> None:
        for channel in self._channels:
            channel.close()


@asynccontextmanager
async def running_node(
    pki: PkiFiles, authorizer: Authorizer, directory: Path, limits: Limits | None = None
) -> AsyncIterator[Node]:
    backend = LocalBackend.open(directory, LOG_CONFIG, server_id="node-0")
    server = build_server(
        backend,
        ssl_context=server_context(pki.server_cert, pki.server_key, pki.ca_cert),
        authorizer=authorizer,
        limits=limits,
    )
    node = Node(server, backend, pki, directory)

    async def record(event: RecvRequest) -> None:
        node.requests_seen.append(event.method_name)

    listen(server.grpc, RecvRequest, record)
    await server.start()
    backend.rpc_addr = server.address
    try:
        yield node
    finally:
        node.close_channels()
        await server.close()
        await backend.close()


NodeFactory = Callable[..., AbstractAsyncContextManager[Node]]


@pytest.fixture
def node_factory(pki: PkiFiles, authorizer: Authorizer, tmp_path: Path) -> NodeFactory:
    def make(directory: Path | None = None, limits: Limits | None = None) -> Any:
        return running_node(pki, authorizer, directory or tmp_path / "log", limits)

    return make


@pytest.fixture
async def node(node_factory: NodeFactory) -> AsyncIterator[Node]:
    async with node_factory() as running:
        yield running


async def eventually(
    condition: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01
) -> None:
    """Poll condition until true or fail after timeout (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(interval)
