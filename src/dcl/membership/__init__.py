"""SWIM gossip membership: who is in the cluster, at which address, with which tags.

Layers (each usable alone):
- `swim.Swim`: the pure protocol core (no I/O, clock or randomness of its own).
- `driver.Membership`: asyncio UDP (probes, gossip) + TCP (push-pull state sync) driver;
  every frame is sealed with AES-GCM under a shared key (`crypto`), encoded by `wire`.

Public API::

    config = GossipConfig(node_name="n1", bind_addr=("127.0.0.1", 7946),
                          tags={"rpc_addr": "127.0.0.1:8400"}, key=load_keyring(path))
    m = Membership(config, on_event=handler)   # handler(MemberEvent) -> None | Awaitable
    await m.start()                            # GossipKeyRequired without key/insecure
    await m.join(["127.0.0.1:7947"], retries=3, timeout=10.0) -> int   # JoinFailed if 0
    m.members() / m.alive_members() / m.local_member / m.set_tags({...}) / m.stats
    m.set_keys(load_keyring(path))             # a new keyring, e.g. on SIGHUP
    await m.leave(timeout=3.0); await m.stop()
"""

from dcl.membership.crypto import key_fingerprint, load_keyring, parse_key, parse_keyring
from dcl.membership.driver import GossipConfig, GossipStats, Membership, parse_addr
from dcl.membership.errors import (
    AuthenticationFailed,
    GossipConfigError,
    GossipError,
    GossipKeyRequired,
    InvalidGossipKey,
    JoinFailed,
    MalformedPacket,
)
from dcl.membership.model import EventKind, Member, MemberEvent, MemberState
from dcl.membership.swim import Swim, SwimConfig

__all__ = [
    "AuthenticationFailed",
    "EventKind",
    "GossipConfig",
    "GossipConfigError",
    "GossipError",
    "GossipKeyRequired",
    "GossipStats",
    "InvalidGossipKey",
    "JoinFailed",
    "MalformedPacket",
    "Member",
    "MemberEvent",
    "MemberState",
    "Membership",
    "Swim",
    "SwimConfig",
    "key_fingerprint",
    "load_keyring",
    "parse_addr",
    "parse_key",
    "parse_keyring",
]
