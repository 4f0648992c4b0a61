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


async def _capped_server(cap: ConnectionCap, establish: bool
                         ) -> tuple[asyncio.Server, int]:
    """A real listener with the cap that holds every connection it is given open; with
    ``establish``, each is marked established (as a finished TLS handshake is)."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if establish:
            cap.established(writer.get_extra_info("socket").fileno())
        writer.write(b"hi")
        await reader.read()  # until the client goes, or the cap cuts it
        writer.close()

    sock = tcp_listener("127.0.0.1", 0, 64, cap)
    server = await asyncio.start_server(hold, sock=sock)
    return server, sock.getsockname()[1]


async def _connect(port: int, source: str = "127.0.0.1"
                   ) -> tuple[bool, asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect (from ``source``): whether the server took it (it greets) or closed it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        return await asyncio.wait_for(reader.read(2), 5) == b"hi", reader, writer
    except ConnectionError:
        return False, reader, writer


async def _cut(reader: asyncio.StreamReader) -> bool:
    """Whether the server ended a connection it had greeted."""
    try:
        return await asyncio.wait_for(reader.read(1), 5) == b""
    except ConnectionError:
        return True


async def test_a_full_cap_of_unfinished_handshakes_cuts_the_oldest_for_a_new_one() -> None:
    """Silent connections (never established) cannot lock a new client out: each new one
    displaces the oldest, which is shut down."""
    cap = ConnectionCap(total=3)
    server, port = await _capped_server(cap, establish=False)
    opened: list[tuple[bool, asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(5):
            opened.append(await _connect(port))
        assert [ok for ok, _, _ in opened] == [True] * 5
        assert [await _cut(reader) for _, reader, _ in opened[:2]] == [True, True]
        assert cap.open == 3 and cap.shed == {"evicted": 2, "total": 0, "per_host": 0}
    finally:
        for _, _, writer in opened:
            writer.close()
        server.close()


async def test_a_full_cap_of_established_connections_refuses_and_frees_on_close() -> None:
    cap = ConnectionCap(total=3)
    server, port = await _capped_server(cap, establish=True)
    opened: list[tuple[bool, asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(5):
            opened.append(await _connect(port))
        assert [ok for ok, _, _ in opened] == [True, True, True, False, False]
        assert cap.open == 3 and cap.shed == {"evicted": 0, "total": 2, "per_host": 0}
        opened[0][2].close()  # one leaves: its place is free as soon as the server sees it

        async def freed() -> bool:
            await asyncio.sleep(0.01)
            return cap.open == 2

        for _ in range(300):
            if await freed():
                break
        opened.append(await _connect(port))
        assert opened[-1][0] and cap.open == 3
    finally:
        for _, _, writer in opened:
            writer.close()
        server.close()


async def test_a_per_host_cap_refuses_one_host_and_not_another() -> None:
    """Every 127.0.0.0/8 address is the loopback's (Linux): two hosts on one machine."""
    cap = ConnectionCap(total=10, per_host=2)
    server, port = await _capped_server(cap, establish=True)
    opened: list[tuple[bool, asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for source in ("127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.2"):
            opened.append(await _connect(port, source))
        assert [ok for ok, _, _ in opened] == [True, True, False, True]
        assert cap.shed == {"evicted": 0, "total": 0, "per_host": 1}
    finally:
        for _, _, writer in opened:
            writer.close()
        server.close()


def test_a_cap_needs_room_for_one() -> None:
    with pytest.raises(ValueError):
        ConnectionCap(0)
    with pytest.raises(ValueError):
        ConnectionCap(1, per_host=-1)
