"""AES-GCM sealing of every gossip packet, UDP and TCP alike, and key loading.

Frame: 1 version byte, then for version 1 a 12-byte random nonce and the AES-GCM ciphertext
with its 16-byte tag. The associated data binds a frame to its channel ("udp"/"tcp") so a
datagram cannot be replayed as a push-pull frame or vice versa. Version 0 is plaintext and is
only produced and accepted by an insecure sealer: a keyed node rejects it as unauthenticated,
so an insecure node can never talk its way into a keyed cluster.

A node holds a keyring: the first key seals, every key opens. That is how the key changes
without a moment when members cannot hear each other (as Serf's keyring): add the new key
everywhere, then seal with it everywhere, then drop the old one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dcl.membership.errors import AuthenticationFailed, InvalidGossipKey

KEY_SIZES = (16, 24, 32)
#: A frame the first key cannot open is tried with every other: bounded work per packet.
MAX_KEYS = 8
NONCE_SIZE = 12
OVERHEAD = 1 + NONCE_SIZE + 16
_PLAIN = 0
_AES_GCM = 1
AAD_UDP = b"dcl-gossip-udp"
AAD_TCP = b"dcl-gossip-tcp"


def check_key(key: bytes) -> bytes:
    if len(key) not in KEY_SIZES:
        raise InvalidGossipKey(f"gossip key must be 16, 24 or 32 bytes, got {len(key)}")
    return key


def parse_key(text: str | bytes) -> bytes:
    """Decode a key written as hex or base64 (the two forms operators paste into files)."""
    raw = text.decode("ascii", "replace") if isinstance(text, bytes) else text
    raw = raw.strip()
    if len(raw) in (2 * n for n in KEY_SIZES):
        try:
            return check_key(bytes.fromhex(raw))
        except ValueError:
            pass
    try:
        return check_key(base64.b64decode(raw, validate=True))
    except (binascii.Error, ValueError):
        raise InvalidGossipKey("gossip key is neither hex nor base64") from None


def key_fingerprint(key: bytes) -> str:
    """A name for a key that does not give it away (logs, metrics, the rotation commands):
    the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(key).hexdigest()[:16]


def parse_keyring(text: str) -> tuple[bytes, ...]:
    """Keys one per line, hex or base64; blank lines and ``#`` comments are skipped. The
    first seals. A line that is not a key, a key given twice, none, or more than MAX_KEYS
    raises InvalidGossipKey naming the line."""
    keys: dict[bytes, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            key = parse_key(line)
        except InvalidGossipKey as exc:
            raise InvalidGossipKey(f"line {number}: {exc}") from None
        if key in keys:
            raise InvalidGossipKey(f"line {number}: the key of line {keys[key]} again")
        keys[key] = number
    if not keys:
        raise InvalidGossipKey("no gossip key in it")
    if len(keys) > MAX_KEYS:
        raise InvalidGossipKey(f"{len(keys)} gossip keys, at most {MAX_KEYS}")
    return tuple(keys)


def load_keyring(path: str | Path) -> tuple[bytes, ...]:
    """The keys of a gossip key file (see `parse_keyring`); errors name the file."""
    try:
        return parse_keyring(Path(path).read_text())
    except OSError as exc:
        raise InvalidGossipKey(f"cannot read gossip key file {path}: {exc}") from None
    except (InvalidGossipKey, UnicodeDecodeError) as exc:
        raise InvalidGossipKey(f"gossip key file {path}: {exc}") from None


class PacketSealer:
    """Seals frames under the first key of a keyring and opens them under any of its keys,
    or passes plaintext when there is no key (``None``)."""

    __slots__ = ("_aeads", "fingerprints")

    def __init__(self, keys: bytes | Sequence[bytes] | None) -> None:
        ring = () if keys is None else (keys,) if isinstance(keys, bytes) else tuple(keys)
        if keys is not None and not 1 <= len(ring) <= MAX_KEYS:
            raise InvalidGossipKey(f"a keyring holds 1 to {MAX_KEYS} keys, not {len(ring)}")
        self._aeads = tuple(AESGCM(check_key(key)) for key in ring)
        #: The keys' fingerprints, the sealing one first.
        self.fingerprints = tuple(key_fingerprint(key) for key in ring)

    @property
    def secure(self) -> bool:
        return bool(self._aeads)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        if not self._aeads:
            return bytes((_PLAIN,)) + plaintext
        nonce = os.urandom(NONCE_SIZE)
        return bytes((_AES_GCM,)) + nonce + self._aeads[0].encrypt(nonce, plaintext, aad)

    def open(self, frame: bytes, aad: bytes) -> bytes:
        if not frame:
            raise AuthenticationFailed("empty frame")
        version = frame[0]
        if not self._aeads:
            if version != _PLAIN:
                raise AuthenticationFailed("encrypted frame but no key configured")
            return frame[1:]
        if version != _AES_GCM or len(frame) < OVERHEAD:
            raise AuthenticationFailed("frame is not AES-GCM sealed")
        nonce, sealed = frame[1 : 1 + NONCE_SIZE], frame[1 + NONCE_SIZE :]
        for aead in self._aeads:
            try:
                return aead.decrypt(nonce, sealed, aad)
            except InvalidTag:
                continue
        raise AuthenticationFailed("AES-GCM tag mismatch under every key")
