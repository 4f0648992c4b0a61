"""Raft's safety properties, checked continuously while the simulated cluster runs.

The checker is fed events by the simulated drivers (entries persisted, entries committed,
entries applied, snapshots installed, role changes, client acknowledgements, read states) and
also polls every node after each step. It keeps a global "ground truth" built from what it has
seen, so a property is checked against *all history*, not just the current state:

* election safety   -- one leader per term, ever (`_leaders`);
* log matching      -- an (index, term) pair names exactly one entry and one predecessor term,
                       ever (`_log_ids`); by induction identical ids imply identical prefixes;
* leader completeness -- everything known committed is in each new leader's log, unless the
                       leader's snapshot covers it;
* state-machine safety -- one payload per applied position, across all nodes (`_committed`);
* durability of acknowledged writes -- a write a client saw committed stays at its position;
* commit monotonicity -- on a node that did not crash;
* one pending membership change at a time (judged on a leader's own proposals);
* read linearizability -- a ReadIndex result covers every write acknowledged before the read
                       was issued.

Violations are collected rather than raised immediately so the world can attach its trace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class LogEntry:
    """A core log entry normalised by the driver, so the checker does not depend on core types."""

    index: int
    term: int
    kind: str  # "normal" | "conf" | "empty"
    data: bytes


class Violation(AssertionError):
    """An invariant broke; `message` says which and where."""


@dataclass(slots=True)
class _ReadRequest:
    node: Any
    issued_at: int
    min_index: int


class InvariantChecker:
    """Accumulates ground truth from driver events and reports the first broken property."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self._leaders: dict[int, Any] = {}
        # (index, term) -> (data, kind, prev_term): identity of an entry across all logs.
        self._log_ids: dict[tuple[int, int], tuple[bytes, str, int]] = {}
        # index -> (entry term, payload) of entries known committed, and index -> an upper
        # bound on the term in which each was committed (the smallest current term of a node
        # seen holding it as committed; the committing leader's term is at most that).
        self._committed: dict[int, tuple[int, bytes]] = {}
        self._commit_term: dict[int, int] = {}
        self._highest_committed = 0
        # index -> payload of writes a client was told are committed.
        self.acknowledged: dict[int, bytes] = {}
        self.highest_acknowledged = 0
        self._last_commit: dict[Any, int] = {}
        self._reads: dict[Any, _ReadRequest] = {}
        self.reads_checked = 0

    # -- reporting --------------------------------------------------------------------------------

    def fail(self, message: str) -> None:
        self.violations.append(message)

    @property
    def ok(self) -> bool:
        return not self.violations

    # -- events from drivers ----------------------------------------------------------------------

    def on_persist(self, node: Any, entries: list[LogEntry], prev_term: int | None) -> None:
        """Entries written to `node`'s durable log, contiguous, after an entry of `prev_term`.

        `prev_term` is None when the predecessor is unknown to the driver (never expected; kept
        so a driver bug shows as a clear message rather than a silent skip).
        """
        for entry in entries:
            key = (entry.index, entry.term)
            ident = (entry.data, entry.kind, -1 if prev_term is None else prev_term)
            seen = self._log_ids.get(key)
            if seen is None:
                self._log_ids[key] = ident
            elif seen[0] != ident[0] or seen[1] != ident[1]:
                self.fail(
                    f"log matching: node {node} has entry {key} = {entry.data!r}/{entry.kind}, "
                    f"another log had {seen[0]!r}/{seen[1]}"
                )
            elif prev_term is not None and seen[2] >= 0 and seen[2] != prev_term:
                self.fail(
                    f"log matching: node {node} entry {key} follows term {prev_term}, "
                    f"another log had it after term {seen[2]}"
                )
            prev_term = entry.term

    def on_committed(self, node: Any, entries: list[LogEntry], node_term: int) -> None:
        """Entries a node's core declared committed (handed out for apply) at `node_term`."""
        for entry in entries:
            self._record_committed(node, entry.index, entry.term, entry.data, node_term)

    def _record_committed(
        self, node: Any, index: int, term: int, data: bytes, node_term: int
    ) -> None:
        known = self._commit_term.get(index)
        if known is None or node_term < known:
            self._commit_term[index] = node_term
        seen = self._committed.get(index)
        if seen is None:
            self._committed[index] = (term, data)
            self._highest_committed = max(self._highest_committed, index)
        elif seen[1] != data or (term >= 0 and seen[0] >= 0 and seen[0] != term):
            self.fail(
                f"state-machine safety: node {node} committed index {index} as "
                f"(term {term}, {data!r}); earlier committed (term {seen[0]}, {seen[1]!r})"
            )

    def on_applied_state(
        self, node: Any, start: int, payloads: list[bytes], node_term: int
    ) -> None:
        """Positions `start..` of `node`'s state machine now hold `payloads` (apply or restore)."""
        for offset, payload in enumerate(payloads):
            index = start + offset
            seen = self._committed.get(index)
            if seen is None:
                self._committed[index] = (-1, payload)
                self._highest_committed = max(self._highest_committed, index)
                known = self._commit_term.get(index)
                if known is None or node_term < known:
                    self._commit_term[index] = node_term
            elif seen[1] != payload:
                self.fail(
                    f"state-machine safety: node {node} applied {payload!r} at {index}, "
                    f"but {seen[1]!r} is committed there"
                )
            acked = self.acknowledged.get(index)
            if acked is not None and acked != payload:
                self.fail(
                    f"lost acknowledged write: node {node} has {payload!r} at {index}, "
                    f"client was told {acked!r} committed there"
                )

    def on_acknowledged(self, index: int, payload: bytes) -> None:
        self.acknowledged[index] = payload
        self.highest_acknowledged = max(self.highest_acknowledged, index)

    def on_became_leader(
        self, node: Any, term: int, log: dict[int, tuple[int, bytes]], snapshot_index: int
    ) -> None:
        """Election safety and leader completeness, checked at the moment a leader appears.

        Completeness binds leaders of terms *after* the one in which an entry was committed;
        a leader of an older term can still win late (its vote grants arrive after others
        moved on) without holding entries committed since, and that is not a violation.
        """
        holder = self._leaders.get(term)
        if holder is not None and holder != node:
            self.fail(f"election safety: nodes {holder} and {node} both leaders in term {term}")
        self._leaders[term] = node
        commit_term = self._commit_term
        for index, (cterm, data) in self._committed.items():
            if index <= snapshot_index or commit_term[index] >= term:
                continue
            have = log.get(index)
            if have is None:
                self.fail(
                    f"leader completeness: leader {node} (term {term}) lacks committed "
                    f"index {index}"
                )
                return
            if have[1] != data or (cterm >= 0 and have[0] != cterm):
                self.fail(
                    f"leader completeness: leader {node} (term {term}) has {have} at "
                    f"index {index}, committed ({cterm}, {data!r})"
                )
                return

    def on_read_issued(self, request_id: Any, node: Any, now: int) -> None:
        self._reads[request_id] = _ReadRequest(node, now, self.highest_acknowledged)

    def on_read_state(self, request_id: Any, node: Any, index: int) -> None:
        request = self._reads.pop(request_id, None)
        if request is None:
            return
        self.reads_checked += 1
        if index < request.min_index:
            self.fail(
                f"linearizable read: read {request_id!r} on node {node} got index {index}, "
                f"but index {request.min_index} was acknowledged before it was issued"
            )

    # -- polled state -----------------------------------------------------------------------------

    def on_restart(self, node: Any, commit_index: int) -> None:
        self._last_commit[node] = commit_index

    def check_commit(self, node: Any, commit_index: int) -> None:
        last = self._last_commit.get(node, 0)
        if commit_index < last:
            self.fail(f"commit index on node {node} went back from {last} to {commit_index}")
        self._last_commit[node] = commit_index

    def check_leader_role(self, node: Any, term: int) -> None:
        holder = self._leaders.get(term)
        if holder is None:
            self._leaders[term] = node
        elif holder != node:
            self.fail(f"election safety: nodes {holder} and {node} both leaders in term {term}")

    def check_pending_conf(
        self, node: Any, term: int, commit_index: int, log: list[LogEntry]
    ) -> None:
        """One membership change at a time (single-server changes are only safe one by one).

        Judged on the leader's own proposals: a newly elected leader may inherit several
        uncommitted changes it cannot yet know are committed (its commit index lags), which is
        fine; what must never happen is a leader proposing a change while another change in
        its log is above its commit index.
        """
        pending = [e for e in log if e.kind == "conf" and e.index > commit_index]
        own = [e for e in pending if e.term == term]
        if own and len(pending) > 1:
            self.fail(
                f"membership: leader {node} (term {term}) proposed a change at {own[-1].index} "
                f"with {len(pending)} uncommitted changes at {[e.index for e in pending]} "
                f"(commit {commit_index})"
            )
