"""host:port parsing shared by flags, GetServers answers, leader hints and Raft peers."""

from __future__ import annotations

import pytest

from dcl.addresses import join_host_port, split_host_port


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
