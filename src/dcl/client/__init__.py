"""The DCL Store client: discovery, leader routing, follower reads, safe retries.

See dcl.client.client for the routing and duplication rules.
"""

from dcl.client.client import ClusterStatus, DclClient, NodeStatus, ServerInfo
from dcl.client.errors import BatchPartiallyWritten, ProduceOutcomeUnknown, RemoteError
from dcl.client.sync import SyncClient

__all__ = [
    "BatchPartiallyWritten",
    "ClusterStatus",
    "DclClient",
    "NodeStatus",
    "ProduceOutcomeUnknown",
    "RemoteError",
    "ServerInfo",
    "SyncClient",
]
