"""The checker: a chaos history plus every node's final log in, violations and figures out.

Safety (each failure is a `Violation`):
  * lost: an acknowledged value is not at its acknowledged offset in some member's final log
    (the log is too short there or holds another value).
  * duplicate: a value appears more than once in a final log (acked or unknown outcome alike:
    the client never retries an append that may have landed, so nothing may appear twice).
  * phantom: a final log holds a value no client tried to append, or one whose append was
    definitely rejected (outcome failed).
  * double_ack: two acknowledgements name the same offset.
  * divergent: two nodes hold different values at one offset.
  * non_dense: a node served a record whose offset is not its position (gaps, repeats).
  * dirty_read: a read returned, at offset o, a value other than the final log's at o (or an
    offset the final log never reached): garbage, or an entry that was never committed.
  * unreadable_node: a member's final log could not be read at all after healing.
  * stream_gap: a read served a record at another offset than asked, or one stream returned
    offsets that are not consecutive.
A node may refuse to serve a damaged range (DATA_LOSS): those offsets are None in its final
log, are reported as `refused`, and are not read as a loss (the issue allows refusing, never
serving garbage); the other nodes still must hold the values there.
With retention on, a node's log starts at its `first` offset: the offsets below are None too,
neither refused nor lost there; an acknowledged value must still be at its offset on every
node that holds that offset, and not refused by all of them.

Liveness figures: per fault window, the produce operations invoked during it and in the 10 s
after it healed (ok / failed / unknown), the time from heal to the first acknowledged write
invoked after it (recovery), and for leader kills (kill_leader, or a disk fault whose victim
was the leader) the time from SIGKILL to the first acknowledged write invoked after it
(failover).
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.chaos.history import FAILED, OK, UNKNOWN

__all__ = ["NodeLog", "Report", "Violation", "check"]

#: Seconds after a heal that count as "after the fault" for availability.
AFTER_WINDOW = 10.0
#: Violations of one kind listed in full; the rest are counted.
MAX_LISTED = 20


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str
    detail: str


@dataclass
class NodeLog:
    """One node's final log from offset 0: a value, or None where the node refused (DATA_LOSS).

    `errors` are structural problems seen while reading it (a record's offset field differing
    from its position).
    """

    values: list[str | None]
    errors: list[str] = field(default_factory=list)
    member: bool = True
    #: The node's first offset: retention dropped everything below (values there are None).
    first: int = 0


@dataclass
class Report:
    violations: list[Violation] = field(default_factory=list)
    ops: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    refused: dict[str, int] = field(default_factory=dict)
    #: Each member's first offset where retention cut its log (only those above 0).
    first_offsets: dict[str, int] = field(default_factory=dict)
    windows: list[dict[str, Any]] = field(default_factory=list)
    failovers: list[float] = field(default_factory=list)
    final_length: int = 0
    acked_values: int = 0

    @property
    def violation_counts(self) -> Counter[str]:
        return Counter(v.kind for v in self.violations)

    @property
    def worst_recovery(self) -> float | None:
        times = [w["recovery"] for w in self.windows if w["recovery"] is not None]
        return max(times) if times else None

    @property
    def unrecovered(self) -> list[str]:
        return [w["fault"] for w in self.windows if w["recovery"] is None]

    def availability(self) -> dict[str, dict[str, Any]]:
        """Per fault kind: writes invoked during / after its windows, and the worst recovery."""
        kinds: dict[str, dict[str, Any]] = {}
        for w in self.windows:
            k = kinds.setdefault(w["fault"], {
                "during": Counter(), "after": Counter(), "worst_recovery_s": None,
                "unrecovered": 0})
            k["during"].update(w["during"])
            k["after"].update(w["after"])
            if w["recovery"] is None:
                k["unrecovered"] += 1
            elif k["worst_recovery_s"] is None or w["recovery"] > k["worst_recovery_s"]:
                k["worst_recovery_s"] = w["recovery"]
        for k in kinds.values():
            for phase in ("during", "after"):
                counts = k[phase]
                total = sum(counts.values())
                k[phase] = dict(counts)
                k[f"failed_{phase}"] = round((total - counts[OK]) / total, 3) if total else None
        return kinds

    def failover_p50(self) -> float | None:
        return statistics.median(self.failovers) if self.failovers else None

    def to_json(self) -> dict[str, Any]:
        p50 = self.failover_p50()
        worst = self.worst_recovery
        return {
            "violations": len(self.violations),
            "violation_kinds": dict(self.violation_counts),
            "violation_examples": [f"{v.kind}: {v.detail}" for v in self.violations[:MAX_LISTED]],
            "ops": dict(self.ops),
            "faults": dict(self.faults),
            "refused_offsets": self.refused,
            "first_offsets": self.first_offsets,
            "final_length": self.final_length,
            "acked_values": self.acked_values,
            "worst_recovery_s": None if worst is None else round(worst, 3),
            "unrecovered_faults": self.unrecovered,
            "failover_p50_s": None if p50 is None else round(p50, 3),
            "failover_max_s": round(max(self.failovers), 3) if self.failovers else None,
            "failovers_s": [round(f, 3) for f in self.failovers],
            "availability": self.availability(),
        }


def check(history: Sequence[Mapping[str, Any]], logs: Mapping[str, NodeLog]) -> Report:
    report = Report()
    produces = [r for r in history if r.get("type") == "op" and r["f"] == "produce"]
    reads = [r for r in history if r.get("type") == "op" and r["f"] == "read"]
    nemesis = [r for r in history if r.get("type") == "nemesis"]
    for r in produces:
        report.ops[f"produce_{r['outcome']}"] += 1
    for r in reads:
        report.ops[f"read_{r['outcome']}"] += 1
    for r in nemesis:
        if r["phase"] == "start":
            report.faults[r["fault"]] += 1

    violations = report.violations
    members = {name: log for name, log in logs.items() if log.member}
    reference = _reference(members, violations)
    report.final_length = len(reference)
    for name, log in members.items():
        report.refused[name] = sum(1 for v in log.values[log.first:] if v is None)
        if log.first:
            report.first_offsets[name] = log.first
        violations.extend(
            Violation("unreadable_node" if e.startswith("final log unreadable") else
                      "non_dense", f"{name}: {e}") for e in log.errors)

    # What each value's append ended as; values are unique per attempt by construction.
    outcome_of: dict[str, str] = {}
    acked_at: dict[int, str] = {}
    acks: list[tuple[int, str]] = []
    double = 0
    for r in produces:
        for i, value in enumerate(r["values"]):
            outcome_of[value] = r["outcome"]
            if r["outcome"] != OK:
                continue
            offset = int(r["offset"]) + i
            if offset in acked_at:
                double += 1
                if double <= MAX_LISTED:
                    violations.append(Violation(
                        "double_ack", f"offset {offset} acked for {acked_at[offset]} and "
                                      f"{value}"))
            acked_at[offset] = value
            acks.append((offset, value))
    if double > MAX_LISTED:
        violations.append(Violation("double_ack", f"... and {double - MAX_LISTED} more"))
    report.acked_values = len(acks)

    for name, log in members.items():
        _check_node_log(name, log.values, acks, outcome_of, violations, log.first)
    lowest_first = min((log.first for log in members.values()), default=0)
    gone = [(o, v) for o, v in acks
            if lowest_first <= o < len(reference) and reference[o] is None]
    for offset, value in gone[:MAX_LISTED]:
        violations.append(Violation(
            "lost", f"acked {value!r} at {offset} is refused by every node"))
    _check_reads(reads, reference, violations)
    _availability(report, produces, nemesis)
    return report


def _reference(logs: Mapping[str, NodeLog], violations: list[Violation]) -> list[str | None]:
    """The agreed log: at each offset the value the nodes hold (None if every holder refused).

    Reports every offset where two nodes disagree (the first holder's value is kept)."""
    length = max((len(log.values) for log in logs.values()), default=0)
    reference: list[str | None] = []
    divergent = 0
    for offset in range(length):
        seen: dict[str, str] = {}
        for name, log in logs.items():
            if offset < len(log.values) and log.values[offset] is not None:
                seen[name] = log.values[offset]  # type: ignore[assignment]
        distinct = set(seen.values())
        if len(distinct) > 1:
            divergent += 1
            if divergent <= MAX_LISTED:
                violations.append(Violation("divergent", f"offset {offset}: {seen}"))
        reference.append(next(iter(seen.values())) if seen else None)
    if divergent > MAX_LISTED:
        violations.append(Violation("divergent", f"... and {divergent - MAX_LISTED} more offsets"))
    return reference


def _check_node_log(name: str, values: Sequence[str | None], acks: Sequence[tuple[int, str]],
                    outcome_of: Mapping[str, str], violations: list[Violation],
                    first: int = 0) -> None:
    positions: dict[str, list[int]] = defaultdict(list)
    for offset, value in enumerate(values):
        if value is not None:
            positions[value].append(offset)
    listed: Counter[str] = Counter()

    def report(kind: str, detail: str) -> None:
        listed[kind] += 1
        if listed[kind] <= MAX_LISTED:
            violations.append(Violation(kind, f"{name}: {detail}"))

    for value, where in positions.items():
        if len(where) > 1:
            report("duplicate", f"{value!r} at offsets {where} ({outcome_of.get(value)})")
        outcome = outcome_of.get(value)
        if outcome is None:
            report("phantom", f"{value!r} at {where} was never appended by any client")
        elif outcome == FAILED:
            report("phantom", f"{value!r} at {where} was definitely rejected (outcome failed)")
    for offset, value in sorted(acks):
        if offset < first:
            continue  # dropped by retention on this node
        if offset < len(values) and values[offset] is None:
            continue  # refused (damaged range); counted in Report.refused
        if offset >= len(values) or values[offset] != value:
            found = positions.get(value)
            here = values[offset] if offset < len(values) else "<end of log>"
            report("lost", f"acked {value!r} at {offset}; log has {here!r} there, "
                           f"value found at {found or 'nowhere'}")
    for kind, count in listed.items():
        if count > MAX_LISTED:
            violations.append(Violation(kind, f"{name}: ... and {count - MAX_LISTED} more"))


def _check_reads(reads: Iterable[Mapping[str, Any]], reference: Sequence[str | None],
                 violations: list[Violation]) -> None:
    dirty = gaps = 0
    for r in reads:
        records = r.get("records") or []
        # A read must start at the offset asked for; a stream must then go on without gaps.
        previous = int(r["offset"]) - 1
        for i, (offset, value) in enumerate(records):
            if offset != previous + 1 and (i == 0 or r["mode"] == "stream"):
                gaps += 1
                if gaps <= MAX_LISTED:
                    violations.append(Violation(
                        "stream_gap", f"{r['process']} {r['mode']} from {r['offset']} on "
                                      f"{r['node']}: after {previous} came {offset}"))
            previous = offset
            final = reference[offset] if 0 <= offset < len(reference) else "<beyond final log>"
            if final is None:
                continue  # every node refuses that offset now: nothing to compare with
            if final != value:
                dirty += 1
                if dirty <= MAX_LISTED:
                    violations.append(Violation(
                        "dirty_read", f"{r['process']} read {value!r} at {offset} from "
                                      f"{r['node']} at t={r['complete']}; final log has {final!r}"))
    if dirty > MAX_LISTED:
        violations.append(Violation("dirty_read", f"... and {dirty - MAX_LISTED} more"))
    if gaps > MAX_LISTED:
        violations.append(Violation("stream_gap", f"... and {gaps - MAX_LISTED} more"))


def _availability(report: Report, produces: Sequence[Mapping[str, Any]],
                  nemesis: Sequence[Mapping[str, Any]]) -> None:
    by_invoke = sorted(produces, key=lambda r: r["invoke"])
    open_faults: dict[int, Mapping[str, Any]] = {}
    windows: list[tuple[Mapping[str, Any], float]] = []
    for r in nemesis:
        if r["phase"] == "start":
            open_faults[r["id"]] = r
        elif r["phase"] == "stop" and r["id"] in open_faults:
            windows.append((open_faults.pop(r["id"]), float(r["time"])))
        if r["phase"] == "start" and (r["fault"] == "kill_leader" or (
                r["fault"].startswith("disk_") and r.get("was_leader"))):
            t = float(r["time"])
            first = _first_ok_after(by_invoke, t)
            if first is not None:
                report.failovers.append(first - t)
    for start, stop in windows:
        t0 = float(start["time"])

        def tally(lo: float, hi: float) -> dict[str, int]:
            c = Counter(r["outcome"] for r in by_invoke if lo <= r["invoke"] < hi)
            return {k: c.get(k, 0) for k in (OK, FAILED, UNKNOWN)}

        first = _first_ok_after(by_invoke, stop)
        report.windows.append({
            "fault": start["fault"], "id": start["id"], "start": t0, "stop": stop,
            "nodes": start.get("nodes", []),
            "during": tally(t0, stop), "after": tally(stop, stop + AFTER_WINDOW),
            "recovery": None if first is None else round(first - stop, 3),
        })


def _first_ok_after(by_invoke: Sequence[Mapping[str, Any]], t: float) -> float | None:
    """Completion time of the first acknowledged write invoked at or after t."""
    completes = [float(r["complete"]) for r in by_invoke if r["invoke"] >= t and
                 r["outcome"] == OK]
    return min(completes) if completes else None
