"""Command line: `python -m tests.sim --seeds N [--seed S] [--nodes 3|5] [--verbose]`.

Runs seeds 0..N-1 (or `--start`..), each a whole cluster life with faults and recovery, and
prints progress, a summary (seeds per second, violating seeds, how often each fault kind was
injected) and, as the LAST line, one JSON object for scripts and CI. Exit status 1 when any
seed broke an invariant. A failing seed replays exactly with `--seed S --verbose`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from collections import Counter

from dcl.raft.types import Mutations

from .cluster import SimOptions, SimResult, run_seed
from .profiles import SCENARIOS, options_for_seed

MUTATION_NAMES = sorted(Mutations.__dataclass_fields__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.sim", description="Deterministic Raft cluster simulator."
    )
    parser.add_argument("--seeds", type=int, default=100, help="number of seeds to run")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--seed", type=int, default=None, help="run only this seed")
    parser.add_argument("--nodes", type=int, choices=(3, 5), default=None,
                        help="cluster size (default: 3 for even seeds, 5 for odd)")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="default",
                        help="fault schedule (see tests/sim/profiles.py)")
    parser.add_argument("--fault-ticks", type=int, default=SimOptions().fault_ticks,
                        help="ticks of fault injection per seed")
    parser.add_argument("--no-membership", action="store_true",
                        help="no membership changes")
    parser.add_argument("--mutation", choices=MUTATION_NAMES, action="append", default=[],
                        help="enable a deliberate core bug (to see the simulator catch it)")
    parser.add_argument("--verbose", action="store_true",
                        help="print every event as it happens (best with --seed)")
    args = parser.parse_args(argv)

    mutations = Mutations(**{name: True for name in args.mutation})
    if args.seed is not None:
        seeds = [args.seed]
    else:
        seeds = list(range(args.start, args.start + args.seeds))

    faults: Counter[str] = Counter()
    stats: Counter[str] = Counter()
    failures: list[SimResult] = []
    digest = 0
    slowest_recovery = 0
    started = time.perf_counter()
    step = max(1, len(seeds) // 10)
    for done, seed in enumerate(seeds, start=1):
        options = options_for_seed(
            seed,
            args.nodes,
            args.scenario,
            fault_ticks=args.fault_ticks,
            membership=not args.no_membership,
            mutations=mutations,
            verbose=args.verbose,
        )
        result = run_seed(seed, options)
        faults.update(result.faults)
        stats.update(result.stats)
        digest = zlib.crc32(result.digest.to_bytes(4, "big"), digest)
        slowest_recovery = max(slowest_recovery, result.stats["recovery_ticks"])
        if not result.ok:
            failures.append(result)
            print(result.report(), flush=True)
        if done % step == 0 or done == len(seeds):
            elapsed = time.perf_counter() - started
            print(f"[{done}/{len(seeds)}] {len(failures)} violating seed(s), "
                  f"{done / elapsed:.1f} seeds/s", flush=True)

    elapsed = time.perf_counter() - started
    rate = len(seeds) / elapsed if elapsed > 0 else 0.0
    print(f"\n{len(seeds)} seeds in {elapsed:.1f}s ({rate:.1f} seeds/s)")
    if failures:
        print("violating seeds: " + " ".join(str(r.seed) for r in failures))
    else:
        print("no violations")
    print(f"slowest recovery after healing: {slowest_recovery} ticks "
          f"(bound {SimOptions().recovery_ticks})")
    print("fault coverage:")
    for name, count in sorted(faults.items()):
        print(f"  {name:<26} {count}")
    print("workload:")
    for name, count in sorted(stats.items()):
        print(f"  {name:<26} {count}")
    summary = {
        "seeds": len(seeds),
        "violations": len(failures),
        "violating_seeds": [r.seed for r in failures],
        "seeds_per_s": round(rate, 2),
        "elapsed_s": round(elapsed, 2),
        "max_recovery_ticks": slowest_recovery,
        "mutations": args.mutation,
        "scenario": args.scenario,
        # CRC over every event of every seed: equal digests mean identical runs.
        "digest": digest,
        "faults": dict(sorted(faults.items())),
    }
    print(json.dumps(summary, sort_keys=False))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
