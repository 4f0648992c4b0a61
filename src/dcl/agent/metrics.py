"""What a node's metrics endpoint shows: one Registry over the parts the agent wired.

The names follow what operators of etcd and Kafka already chart: Raft term, role, indexes
and each follower's lag (Kafka's under-replication), fsync latency (etcd's
``wal_fsync_duration_seconds``), calls by method and status, the commit log's offsets and
size, and the standard ``process_*`` metrics. State that lives in the parts is read at scrape
time; only events (calls, fsyncs, retention cuts) are counted as they happen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import dcl
from dcl.addresses import ConnectionCap
from dcl.membership import GossipError, Membership
from dcl.membership.model import STATE_NAMES
from dcl.metrics import Family, Registry, gauge, process_families
from dcl.raft.driver import RaftDriver
from dcl.raft.types import Role
from dcl.server.replicated import ReplicatedBackend
from dcl.server.server import DclServer

__all__ = ["NodeMetrics"]


class NodeMetrics:
    """The registry of one node."""

    def __init__(self, node_name: str, driver: RaftDriver, backend: ReplicatedBackend,
                 server: DclServer, *,
                 certificates: Callable[[], Mapping[str, tuple[float, float]]] = dict,
                 reloads: Mapping[str, int] | None = None,
                 gossip: Callable[[], Membership | None] = lambda: None):
        """`certificates`: validity (not before, not after) of each certificate in use, by
        use; `reloads`: reloads (SIGHUP) by result. Both change on a reload. `gossip`: the
        node's membership once it runs."""
        self._node_name = node_name
        self._driver = driver
        self._backend = backend
        self._server = server
        self._certificates = certificates
        self._reloads = reloads or {}
        self._gossip = gossip
        self.registry = Registry()
        for source in (self._node_families, self._config_families, self._gossip_families,
                       server.calls_total,
                       server.call_seconds, driver.fsync_seconds, process_families):
            self.registry.register(source)

    def _config_families(self) -> Iterator[Family]:
        validity = sorted(self._certificates().items())
        yield Family("dcl_tls_certificate_expiration_timestamp_seconds", "gauge",
                     "When each certificate the node serves or dials with expires (Unix "
                     "seconds): alert well before; `dcl certs renew` and SIGHUP replace it.",
                     ("certificate",), [("", (use,), after) for use, (_, after) in validity])
        yield Family("dcl_config_reloads_total", "counter",
                     "Reloads of certificates and ACL (SIGHUP) since start, by result; a "
                     "failed one changed nothing.", ("result",),
                     [("", (result,), n) for result, n in sorted(self._reloads.items())])

    def _gossip_families(self) -> Iterator[Family]:
        membership = self._gossip()
        if membership is None:
            return
        fingerprints = membership.key_fingerprints
        yield Family("dcl_gossip_key_info", "gauge",
                     "1 per gossip key in use, by fingerprint: the primary seals, every key "
                     "opens. Drop an old key only once every node shows the new one primary.",
                     ("fingerprint", "role"),
                     [("", (fp, "primary" if i == 0 else "secondary"), 1)
                      for i, fp in enumerate(fingerprints)])
        yield _shed("dcl_gossip_connections_shed_total",
                    "Push-pull (TCP) connections gossip's cap shed since start, by reason "
                    "(as dcl_rpc_connections_shed_total).", membership.tcp_cap)
        yield _counter("dcl_gossip_auth_failures_total",
                       "Gossip frames no key in use opened (a stranger, or a member whose "
                       "key this node does not hold) since the node started.",
                       membership.stats.auth_failures)
        try:
            states = [m.state for m in membership.members()]
        except GossipError:  # stopped: the node is shutting down
            return
        yield Family("dcl_gossip_members", "gauge",
                     "Members this node's gossip knows, by state (itself included).",
                     ("state",), [("", (name,), states.count(st))
                                  for st, name in STATE_NAMES.items()])

    def _node_families(self) -> Iterator[Family]:
        driver, backend = self._driver, self._backend
        st = driver.core.status()
        yield gauge("dcl_node_info", "This node's name and version (always 1).", 1,
                    node=self._node_name, version=dcl.__version__)
        yield gauge("dcl_raft_term", "Current Raft term.", st.term)
        yield Family("dcl_raft_role", "gauge", "1 for this node's current Raft role.",
                     ("role",), [("", (r.value,), int(st.role is r)) for r in Role])
        yield gauge("dcl_raft_leader_known",
                    "1 while this node is a member that knows a leader (health SERVING).",
                    int(backend.has_leader))
        yield gauge("dcl_raft_voters", "Voters in the configuration.", len(st.voters))
        yield gauge("dcl_raft_learners", "Learners in the configuration.", len(st.learners))
        yield gauge("dcl_raft_first_index", "First entry of the Raft log held.", st.first_index)
        yield gauge("dcl_raft_last_index", "Last entry of the Raft log.", st.last_index)
        yield gauge("dcl_raft_commit_index", "Highest entry known committed.", st.commit_index)
        yield gauge("dcl_raft_applied_index", "Highest entry applied to the commit log.",
                    st.applied_index)
        yield gauge("dcl_raft_log_memory_bytes", "Raft log bytes held in memory.",
                    driver.core.log_bytes)
        if st.role is Role.LEADER:
            # `voter` lets an under-replication alert leave out learners still catching up.
            # Right after an election a peer's match reads 0 until its first answer (one
            # heartbeat), so its lag briefly reads the whole log: alert on a lasting lag.
            peers = sorted((p, pr) for p, pr in st.progress.items() if p != st.id)
            labelled = [((p, str(not pr.is_learner).lower()), pr) for p, pr in peers]
            yield Family("dcl_raft_peer_match_index", "gauge",
                         "Leader only: highest entry each peer is known to hold.",
                         ("peer", "voter"), [("", ls, pr.match) for ls, pr in labelled])
            yield Family("dcl_raft_peer_lag_entries", "gauge",
                         "Leader only: entries each peer is behind the leader's log.",
                         ("peer", "voter"),
                         [("", ls, max(st.last_index - pr.match, 0)) for ls, pr in labelled])
            yield Family("dcl_raft_peer_active", "gauge",
                         "Leader only: 1 if the peer answered within the last election "
                         "timeout.", ("peer", "voter"),
                         [("", ls, int(pr.heard_recently)) for ls, pr in labelled])
        yield _counter("dcl_raft_snapshots_taken_total",
                       "Snapshots this node built and stored since it started.",
                       driver.snapshots_taken)
        yield _counter("dcl_raft_snapshots_installed_total",
                       "Snapshots from a leader this node restored since it started.",
                       driver.snapshots_installed)
        fsm = backend.fsm
        yield _counter("dcl_log_retention_cuts_total",
                       "Retention passes that dropped segments since the node started.",
                       fsm.retention_cuts)
        yield _counter("dcl_log_retention_dropped_bytes_total",
                       "Commit log bytes retention dropped since the node started.",
                       fsm.retention_dropped_bytes)
        segments = len(fsm.log.segment_spans())
        yield gauge("dcl_log_first_offset", "First offset the commit log holds.",
                    backend.lowest_offset)
        yield gauge("dcl_log_next_offset", "Offset the next record will get.",
                    backend.next_offset)
        yield gauge("dcl_log_bytes", "Bytes of the commit log's store files.",
                    backend.log_bytes)
        yield gauge("dcl_log_segments", "Segments of the commit log.", segments)
        disk = driver.disk
        if disk is not None:
            yield gauge("dcl_disk_free_bytes",
                        "Free space of the data directory's filesystem (for its user).",
                        disk.free_bytes())
            yield gauge("dcl_disk_reserve_bytes",
                        "Free space the node keeps (--min-free-bytes); below it, it takes "
                        "no new records.", disk.reserve_bytes)
            yield gauge("dcl_disk_low", "1 while free space is below the reserve.",
                        int(disk.low))
            yield Family("dcl_disk_refusals_total", "counter",
                         "What the node refused for a low disk since start: appends "
                         "(client records, on a leader) and replication (entries and "
                         "snapshot chunks a follower dropped on arrival; a leader sends "
                         "none once the follower's heartbeat answers say its disk is low).",
                         ("kind",),
                         [("", ("appends",), driver.refused_for_disk),
                          ("", ("replication",), driver.dropped_for_disk)])
        yield gauge("dcl_rpc_active_calls", "Calls inside a handler (open streams included).",
                    self._server.active_calls)
        cap = self._server.connection_cap
        yield gauge("dcl_rpc_connections",
                    "Connections open on the RPC port, counted from accept (before TLS).",
                    cap.open)
        yield gauge("dcl_rpc_connections_max", "Connections the RPC port holds at most.",
                    cap.total)
        yield _shed("dcl_rpc_connections_shed_total",
                    "Connections the RPC port's cap shed since start: evicted (cut before its "
                    "TLS handshake finished, to make room for a new one), total (refused: "
                    "every open one established), per_host (refused: that host's cap).", cap)


def _shed(name: str, help_text: str, cap: ConnectionCap) -> Family:
    return Family(name, "counter", help_text, ("reason",),
                  [("", (reason,), n) for reason, n in sorted(cap.shed.items())])


def _counter(name: str, help_text: str, value: float) -> Family:
    return Family(name, "counter", help_text, (), [("", (), value)])
