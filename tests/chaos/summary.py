"""The human summary of a chaos run; the machine-readable JSON line is printed after it."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from tests.chaos.runner import ChaosResult

__all__ = ["format_summary"]


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def format_summary(result: ChaosResult) -> str:
    report = result.report
    cfg = result.config
    out = [f"chaos run: seed={cfg.seed} nodes={cfg.nodes} duration={cfg.duration:.0f}s "
           f"elapsed={result.elapsed:.0f}s history={result.history_path}", ""]

    per_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for w in report.windows:
        per_kind[w["fault"]].append(w)
    rows = []
    for kind in sorted(set(result.injected) | set(per_kind)):
        windows = per_kind.get(kind, [])
        during = [sum(w["during"][k] for w in windows) for k in ("ok", "failed", "unknown")]
        after = [sum(w["after"][k] for w in windows) for k in ("ok", "failed", "unknown")]
        recoveries = [w["recovery"] for w in windows if w["recovery"] is not None]
        total_d, total_a = sum(during), sum(after)
        rows.append([
            kind, result.injected.get(kind, 0),
            f"{during[0]}/{during[1]}/{during[2]}",
            f"{(during[1] + during[2]) / total_d:.0%}" if total_d else "-",
            f"{(after[1] + after[2]) / total_a:.0%}" if total_a else "-",
            _s(max(recoveries) if recoveries else None),
            len(windows) - len(recoveries),
        ])
    out += _table(["fault", "injected", "writes during ok/failed/unknown", "failed during",
                   "failed after", "worst recovery", "unrecovered"], rows)
    out.append("")
    ops = report.ops
    out += _table(["operations", "ok", "failed", "unknown"], [
        ["produce", ops.get("produce_ok", 0), ops.get("produce_failed", 0),
         ops.get("produce_unknown", 0)],
        ["read", ops.get("read_ok", 0), ops.get("read_failed", 0), "-"],
    ])
    out.append("")
    p50 = report.failover_p50()
    out.append(f"acked values: {report.acked_values}   final log length: {report.final_length}"
               f"   refused offsets per node: {report.refused or '-'}")
    out.append(f"leader failover (SIGKILL -> first acked write): p50 {_s(p50)}  max "
               f"{_s(max(report.failovers) if report.failovers else None)}  "
               f"(n={len(report.failovers)})")
    out.append(f"worst recovery after heal: {_s(report.worst_recovery)}")
    if result.skipped:
        out.append(f"skipped (nothing to damage yet / no leader): {result.skipped}")
    for name, code, tail in result.crashes:
        last = tail.strip().splitlines()[-1:] or [""]
        out.append(f"NODE EXITED WITHOUT BEING KILLED: {name} (exit {code}): {last[0][:160]}")
    for error in result.node_errors[:10]:
        out.append(f"NODE ERROR: {error}")
    if result.unrecovered_nodes:
        out.append(f"NODES THAT DID NOT COME BACK: {result.unrecovered_nodes}")
    counts = report.violation_counts
    out.append(f"violations: {sum(counts.values())} {dict(counts) if counts else ''}")
    for v in report.violations[:20]:
        out.append(f"  {v.kind}: {v.detail}")
    out.append("RESULT: " + ("PASS" if result.ok else "FAIL"))
    return "\n".join(out)
