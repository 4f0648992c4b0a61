"""Values and messages of the SWIM protocol, shared by the core, the codec and the driver.

Everything here is an immutable value: the core swaps whole `Member` records instead of
mutating them, so a record handed to an event handler never changes under its feet.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

Addr = tuple[str, int]


class MemberState(enum.Enum):
    """Lifecycle of a member as seen by one node.

    DEAD means "failed" (declared by others after suspicion timed out); LEFT means the member
    announced a graceful leave. Both are terminal for that incarnation: only the member itself
    can come back, by announcing a higher incarnation.
    """

    ALIVE = "a"
    SUSPECT = "s"
    DEAD = "d"
    LEFT = "l"


#: What operators read (status, metrics): SWIM's DEAD is a failure, not a verdict.
STATE_NAMES = {MemberState.ALIVE: "alive", MemberState.SUSPECT: "suspect",
               MemberState.DEAD: "failed", MemberState.LEFT: "left"}

LIVE_STATES = frozenset({MemberState.ALIVE, MemberState.SUSPECT})
GONE_STATES = frozenset({MemberState.DEAD, MemberState.LEFT})


class EventKind(enum.Enum):
    JOIN = "join"
    LEAVE = "leave"
    FAILED = "failed"
    UPDATE = "update"


@dataclass(frozen=True, slots=True)
class Member:
    """One node's record: what gossip disseminates and what push-pull exchanges.

    `incarnation` is owned by the member itself: only it raises it (to refute a suspicion,
    to change its tags, or to leave), which is what lets every node order conflicting news.
    """

    name: str
    addr: Addr
    tags: Mapping[str, str]
    state: MemberState
    incarnation: int


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """A state transition of a remote member, fired once per transition by the core."""

    kind: EventKind
    member: Member


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int
    source: str
    target: str  # checked by the receiver, so a ping to a reused address is not acked


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    source: str


@dataclass(frozen=True, slots=True)
class PingReq:
    """Ask the receiver to ping `target` for us and forward the ack under our `seq`."""

    seq: int
    source: str
    source_addr: Addr
    target: str
    target_addr: Addr


Message = Ping | Ack | PingReq


@dataclass(frozen=True, slots=True)
class Packet:
    """One UDP datagram: an optional protocol message plus piggybacked member updates."""

    message: Message | None
    updates: tuple[Member, ...]


@dataclass(frozen=True, slots=True)
class PushPull:
    """One side of a TCP full-state exchange (join or periodic anti-entropy)."""

    source: str
    join: bool
    members: tuple[Member, ...]
