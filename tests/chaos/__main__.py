"""`python -m tests.chaos --duration S --seed N [--nodes 3|5]`: one chaos run; exit 1 on any
violation. Prints the summary table, then a JSON line last."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
from pathlib import Path

from tests.chaos.nemesis import DEMO_KINDS, FAULT_KINDS
from tests.chaos.runner import ChaosConfig, run_chaos
from tests.chaos.summary import format_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--duration", type=float, default=60.0, help="nemesis seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--nodes", type=int, choices=(3, 5), default=3)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the cluster, history and final logs go (default: a new "
                             "temporary directory, kept)")
    parser.add_argument("--faults", default=",".join(FAULT_KINDS),
                        help="comma-separated fault kinds (default: all; lying_disk is a "
                             "demonstration that loses acked writes, never a default)")
    parser.add_argument("--snapshot-threshold", type=int, default=1000,
                        help="applied Raft entries between snapshots on each node")
    parser.add_argument("--snapshot-log-bytes", type=int, default=256 << 10,
                        help="Raft-log bytes after which each node snapshots anyway")
    parser.add_argument("--retention-bytes", type=int, default=0,
                        help="commit log each node keeps (0: all); the checker then reads "
                             "each node's log from its first offset")
    parser.add_argument("--raft-retain-bytes", type=int, default=None,
                        help="Raft log each node keeps below its snapshot (default: the "
                             "agent's); 0: lagging nodes always catch up by snapshot")
    parser.add_argument("--cover", action="store_true",
                        help="go on past --duration until every fault kind was injected")
    parser.add_argument("--verbose", action="store_true", help="log each fault")
    parser.add_argument("--check-only", type=Path, default=None, metavar="WORKDIR",
                        help="re-run the checker on a finished run's history.jsonl and "
                             "final_logs.json; prints the JSON report")
    args = parser.parse_args(argv)
    if args.check_only is not None:
        return _check_only(args.check_only)
    kinds = tuple(k for k in args.faults.split(",") if k)
    unknown = set(kinds) - set(FAULT_KINDS) - set(DEMO_KINDS)
    if unknown:
        parser.error(f"unknown fault kinds: {sorted(unknown)}; known: {list(FAULT_KINDS)} "
                     f"and, to see the checker fail, {list(DEMO_KINDS)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("dcl").setLevel(logging.WARNING)  # the clients' retries are routine
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"dcl-chaos-{args.seed}-"))
    config = ChaosConfig(duration=args.duration, seed=args.seed, workdir=workdir,
                         nodes=args.nodes, kinds=kinds, cover=args.cover,
                         snapshot_threshold=args.snapshot_threshold,
                         snapshot_log_bytes=args.snapshot_log_bytes,
                         retention_bytes=args.retention_bytes,
                         raft_retain_bytes=args.raft_retain_bytes)
    result = asyncio.run(run_chaos(config))
    print(format_summary(result))
    print(json.dumps(result.to_json(), separators=(",", ":")))
    sys.stdout.flush()
    return 0 if result.ok else 1


def _check_only(workdir: Path) -> int:
    from tests.chaos.checker import NodeLog, check
    from tests.chaos.history import load_history

    history = load_history(workdir / "history.jsonl")
    finals = json.loads((workdir / "final_logs.json").read_text())
    report = check(history, {name: NodeLog(doc["values"], doc["errors"], first=doc.get("first", 0))
                             for name, doc in finals.items()})
    for v in report.violations:
        print(f"{v.kind}: {v.detail}")
    print(json.dumps(report.to_json(), separators=(",", ":")))
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
