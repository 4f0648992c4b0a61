"""AES-GCM sealing: only frames sealed under the same key and channel open."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from dcl.membership.crypto import AAD_TCP, AAD_UDP, PacketSealer, load_key_file, parse_key
from dcl.membership.errors import AuthenticationFailed, InvalidGossipKey

KEY = bytes(range(32))


@pytest.mark.parametrize("size", [16, 24, 32])
def test_key_parses_from_hex_and_base64(size: int) -> None:
    key = bytes(range(size))
    assert parse_key(key.hex()) == key
    assert parse_key(base64.b64encode(key).decode() + "\n") == key


@pytest.mark.parametrize("text", ["", "abcd", "g" * 31, "not base64!", bytes(20).hex()])
def test_bad_keys_are_rejected(text: str) -> None:
    with pytest.raises(InvalidGossipKey):
        parse_key(text)


def test_key_file_is_read_and_missing_file_is_a_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "gossip.key"
    path.write_text(KEY.hex() + "\n")
    assert load_key_file(path) == KEY
    with pytest.raises(InvalidGossipKey):
        load_key_file(tmp_path / "missing")


def test_seal_open_round_trip_and_nonces_differ() -> None:
    s = PacketSealer(KEY)
    a, b = s.seal(b"hello", AAD_UDP), s.seal(b"hello", AAD_UDP)
    assert a != b
    assert s.open(a, AAD_UDP) == b"hello"


def test_wrong_key_tamper_channel_and_plaintext_fail_authentication() -> None:
    s = PacketSealer(KEY)
    frame = s.seal(b"hello", AAD_UDP)
    tampered = frame[:-1] + bytes((frame[-1] ^ 1,))
    cases = [
        (PacketSealer(bytes(32)), frame, AAD_UDP),
        (s, tampered, AAD_UDP),
        (s, frame, AAD_TCP),
        (s, PacketSealer(None).seal(b"hello", AAD_UDP), AAD_UDP),
        (PacketSealer(None), frame, AAD_UDP),
        (s, b"", AAD_UDP),
        (s, b"\x01short", AAD_UDP),
    ]
    for sealer, data, aad in cases:
        with pytest.raises(AuthenticationFailed):
            sealer.open(data, aad)


def test_insecure_sealer_passes_plaintext() -> None:
    s = PacketSealer(None)
    assert s.open(s.seal(b"x", AAD_UDP), AAD_UDP) == b"x"
