"""AES-GCM sealing: only frames sealed under a key the receiver holds, on the same channel,
open; a keyring seals with its first key and opens with any."""

from __future__ import annotations

import base64
import itertools
from pathlib import Path

import pytest

from dcl.membership.crypto import (
    AAD_TCP,
    AAD_UDP,
    MAX_KEYS,
    PacketSealer,
    key_fingerprint,
    load_keyring,
    parse_key,
    parse_keyring,
)
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
    assert load_keyring(path) == (KEY,)
    with pytest.raises(InvalidGossipKey, match="missing"):
        load_keyring(tmp_path / "missing")
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(InvalidGossipKey, match=r"gossip\.key"):
        load_keyring(path)


def test_a_keyring_is_keys_in_order_with_comments_and_blank_lines_skipped() -> None:
    other = bytes(16)
    text = f"# rotating\n{other.hex()}  # new\n\n{base64.b64encode(KEY).decode()}\n"
    assert parse_keyring(text) == (other, KEY)


@pytest.mark.parametrize(("text", "message"), [
    ("", "no gossip key"),
    ("# only a comment\n\n", "no gossip key"),
    (f"{KEY.hex()}\nnot a key\n", "line 2"),
    (f"{KEY.hex()}\n# x\n{base64.b64encode(KEY).decode()}\n", "line 3: the key of line 1"),
    ("".join(f"{bytes([i]).hex() * 32}\n" for i in range(MAX_KEYS + 1)),
     f"at most {MAX_KEYS}"),
])
def test_a_bad_keyring_names_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(InvalidGossipKey, match=message):
        parse_keyring(text)


def test_a_key_rotation_never_leaves_two_members_unable_to_hear_each_other() -> None:
    """add B, then use B, then remove A: at each step, a member that has taken it and one
    that has not yet open each other's frames; at the end A no longer opens."""
    a, b = KEY, bytes(range(100, 132))
    steps = [PacketSealer(a), PacketSealer([a, b]), PacketSealer([b, a]), PacketSealer(b)]
    for before, after in itertools.pairwise(steps):
        for sender, receiver in ((before, after), (after, before)):
            assert receiver.open(sender.seal(b"ping", AAD_UDP), AAD_UDP) == b"ping"
    assert steps[2].fingerprints == (key_fingerprint(b), key_fingerprint(a))
    with pytest.raises(AuthenticationFailed, match="every key"):
        steps[-1].open(steps[0].seal(b"ping", AAD_UDP), AAD_UDP)
    with pytest.raises(InvalidGossipKey):
        PacketSealer([])


def test_a_fingerprint_names_a_key_without_giving_it_away() -> None:
    fingerprint = key_fingerprint(KEY)
    assert len(fingerprint) == 16 and KEY.hex()[:16] != fingerprint
    assert fingerprint != key_fingerprint(bytes(32))


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
