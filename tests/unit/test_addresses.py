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


@pytest.mark.parametrize("address", [
    "", "8400", "127.0.0.1", "127.0.0.1:", ":8400", "127.0.0.1:http", "127.0.0.1:65536",
    "127.0.0.1:-1", "::1:8400", "[::1]", "[::1:8400", "::1]:8400", "[]:8400", "a[b]:1",
])
def test_anything_else_is_refused_with_the_address_and_the_ipv6_form(address: str) -> None:
    with pytest.raises(ValueError, match=r"not a host:port address: .*\[::1\]:8400"):
        split_host_port(address)
