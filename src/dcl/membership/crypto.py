"""AES-GCM sealing of every gossip packet, UDP and TCP alike, and key loading.

Frame: 1 version byte, then for version 1 a 12-byte random nonce and the AES-GCM ciphertext
with its 16-byte tag. The associated data binds a frame to its channel ("udp"/"tcp") so a
datagram cannot be replayed as a push-pull frame or vice versa. Version 0 is plaintext and is
only produced and accepted by an insecure sealer: a keyed node rejects it as unauthenticated,
so an insecure node can never talk its way into a keyed cluster.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dcl.membership.errors import AuthenticationFailed, InvalidGossipKey

KEY_SIZES = (16, 24, 32)
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


def load_key_file(path: str | Path) -> bytes:
    try:
        return parse_key(Path(path).read_text())
    except OSError as exc:
        raise InvalidGossipKey(f"cannot read gossip key file {path}: {exc}") from None


class PacketSealer:
    """Seals and opens frames under one key, or passes plaintext when `key` is None."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes | None) -> None:
        self._aead = AESGCM(check_key(key)) if key is not None else None

    @property
    def secure(self) -> bool:
        return self._aead is not None

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        if self._aead is None:
            return bytes((_PLAIN,)) + plaintext
        nonce = os.urandom(NONCE_SIZE)
        return bytes((_AES_GCM,)) + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, frame: bytes, aad: bytes) -> bytes:
        if not frame:
            raise AuthenticationFailed("empty frame")
        version = frame[0]
        if self._aead is None:
            if version != _PLAIN:
                raise AuthenticationFailed("encrypted frame but no key configured")
            return frame[1:]
        if version != _AES_GCM or len(frame) < OVERHEAD:
            raise AuthenticationFailed("frame is not AES-GCM sealed")
        nonce = frame[1 : 1 + NONCE_SIZE]
        try:
            return self._aead.decrypt(nonce, frame[1 + NONCE_SIZE :], aad)
        except InvalidTag:
            raise AuthenticationFailed("AES-GCM tag mismatch") from None
