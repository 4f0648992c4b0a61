"""The seam between the RPC services and whatever owns the log.

Services never touch dcl.storage or Raft directly; they talk to a ``Backend``. Today that is
``LocalBackend`` (one node, no replication); the Raft layer provides another implementation
with the same contract, so the services, their tests and the error mapping do not change.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Backend", "ServerInfo"]


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """One cluster member as GetServers reports it."""

    id: str
    rpc_addr: str
    is_leader: bool


class Backend(Protocol):
    """What the log services need from the node.

    Stored records are serialized ``log.v1.Record`` messages with ``offset`` set (see
    dcl.server.records), so readers return them without re-encoding.

    Contracts:
    - ``append`` enqueues synchronously, at call time, and returns an awaitable of the first
      offset. Calls are assigned offsets in call order, which lets a stream pipeline many
      appends and still ack them in order. The awaitable resolves only once the records are
      durable (fsynced locally; on a quorum under Raft). A follower raises NotLeader (from
      the awaitable); values are validated by the caller.
    - Reads only see durable (committed) records: ``next_offset`` is the first offset not yet
      readable, ``read``/``read_batch`` raise OffsetOutOfRange at or beyond it.
    - ``wait_for(offset)`` resolves once offset is readable, without polling, and raises
      Unavailable when the backend shuts down. Cancelling the waiter is always safe.
    """

    def append(self, values: Sequence[bytes]) -> Awaitable[int]: ...

    def read(self, offset: int) -> bytes: ...

    def read_batch(self, offset: int, max_records: int, max_bytes: int) -> list[bytes]:
        """At least one record when offset is readable, even if it exceeds max_bytes."""
        ...

    @property
    def lowest_offset(self) -> int: ...

    @property
    def next_offset(self) -> int: ...

    async def wait_for(self, offset: int) -> None: ...

    def servers(self) -> list[ServerInfo]: ...

    @property
    def has_leader(self) -> bool: ...
