"""Errors raised by the gossip layer.

They sit under `DclError` and say whose fault a failure is: a misconfigured local node
(`GossipKeyRequired`, `InvalidGossipKey`, `GossipConfigError`), a peer that sent bytes we cannot
trust (`AuthenticationFailed`, `MalformedPacket`; the driver drops and counts these, it never
lets them escape the receive loop), or a cluster we could not reach (`JoinFailed`).
"""

from __future__ import annotations

from dcl.errors import DclError, InvalidRequest, Unavailable


class GossipError(DclError):
    """Root of every gossip-layer error."""


class GossipConfigError(GossipError, InvalidRequest):
    """The local gossip configuration is inconsistent (operator's fault; do not retry)."""


class GossipKeyRequired(GossipConfigError):
    """No encryption key was configured and insecure mode was not requested explicitly.

    Gossip packets carry membership that drives Raft configuration changes, so an
    unauthenticated port would let anyone on the network add or remove servers.
    """


class InvalidGossipKey(GossipConfigError):
    """The key is not 16, 24 or 32 bytes, or its hex/base64 text does not decode."""


class AuthenticationFailed(GossipError):
    """A packet failed AES-GCM authentication (wrong key, tampering, or plaintext)."""


class MalformedPacket(GossipError):
    """A packet authenticated (or arrived in insecure mode) but does not decode."""


class JoinFailed(GossipError, Unavailable):
    """No start address answered a push-pull within the retries and timeout given."""
