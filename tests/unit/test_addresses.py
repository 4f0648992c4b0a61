"""host:port parsing shared by flags, GetServers answers, leader hints and Raft peers; and
the connection cap of the listening sockets, over real sockets."""

from __future__ import annotations

import asyncio

import pytest

from dcl.addresses import ConnectionCap, join_host_port, split_host_port, tcp_listener


@pytest.mark.parametrize(("address", "expected"), [
    ("127.0.0.1:8400", ("127.0.0.1", 8400)),
    ("node-1.internal:8400", ("node-1.internal", 8400)),
    ("[::1]:8400", ("::1", 8400)),
    ("[fd00::7]:0", ("fd00::7", 0)),
    ("localhost:65535", ("localhost", 65535)),
])
def test_an_address_splits_into_a_dialable_host_and_port(
    address: str, expected: tuple[str, int]
) -> None:
    assert split_host_port(address) == expected
    assert join_host_port(*expected) == address


def test_an_ipv6_literal_without_brackets_is_read_port_last_and_written_back_bracketed(
) -> None:
    """Earlier versions advertised (and kept in Raft state) ::1:8400; it still dials."""
    assert split_host_port("::1:8400") == ("::1", 8400)
    assert split_host_port("fd00::7:0") == ("fd00::7", 0)
    assert join_host_port(*split_host_port("::1:8400")) == "[::1]:8400"


@pytest.mark.parametrize("address", [
    "", "8400", "127.0.0.1", "127.0.0.1:", ":8400", "127.0.0.1:http", "127.0.0.1:65536",
    "127.0.0.1:-1", "fe80::zz:8400", "node:1:8400", "[::1]", "[::1:8400", "::1]:8400",
    "[]:8400", "a[b]:1", "127.0.0.1:\u0668\u0664\u0660\u0660", "host:\u00b2", " host:80",
    "ho st:80", "host:80 ",
])
def test_anything_else_is_refused_with_the_address_and_the_ipv6_form(address: str) -> None:
    with pytest.raises(ValueError, match=r"not a host:port address: .*\[::1\]:8400"):
        split_host_port(address)


async def _capped_server(cap: ConnectionCap) -> tuple[asyncio.Server, int]:
    """A real listener with the cap that holds every connection it is given open."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        writer.write(b"hi")
        await reader.read()  # until the client goes
        writer.close()

    sock = tcp_listener("127.0.0.1", 0, 64, cap)
    server = await asyncio.start_server(hold, sock=sock)
    return server, sock.getsockname()[1]


async def _greeted(port: int, source: str = "127.0.0.1"
                   ) -> tuple[bool, asyncio.StreamWriter]:
    """Connect (from ``source``): whether the server took it (it greets) or closed it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        return await asyncio.wait_for(reader.read(2), 5) == b"hi", writer
    except ConnectionError:
        return False, writer


async def test_a_full_cap_closes_new_connections_at_accept_and_frees_as_they_close() -> None:
    cap = ConnectionCap(total=3)
    server, port = await _capped_server(cap)
    writers: list[asyncio.StreamWriter] = []
    try:
        outcomes = []
        for _ in range(5):
            ok, writer = await _greeted(port)
            outcomes.append(ok)
            writers.append(writer)
        assert outcomes == [True, True, True, False, False]
        assert cap.open == 3 and cap.refused == {"total": 2, "per_host": 0}
        writers[0].close()  # one leaves: after the next prune, one more gets in
        await asyncio.sleep(ConnectionCap.PRUNE_SECONDS + 0.2)
        ok, writer = await _greeted(port)
        writers.append(writer)
        assert ok and cap.open == 3
    finally:
        for writer in writers:
            writer.close()
        server.close()


async def test_a_per_host_cap_refuses_one_host_and_not_another() -> None:
    """Every 127.0.0.0/8 address is the loopback's: two hosts on one machine."""
    cap = ConnectionCap(total=10, per_host=2)
    server, port = await _capped_server(cap)
    writers: list[asyncio.StreamWriter] = []
    try:
        outcomes = []
        for source in ("127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.2"):
            ok, writer = await _greeted(port, source)
            outcomes.append(ok)
            writers.append(writer)
        assert outcomes == [True, True, False, True]
        assert cap.refused == {"total": 0, "per_host": 1}
    finally:
        for writer in writers:
            writer.close()
        server.close()


def test_a_cap_needs_room_for_one() -> None:
    with pytest.raises(ValueError):
        ConnectionCap(0)
    with pytest.raises(ValueError):
        ConnectionCap(1, per_host=-1)
