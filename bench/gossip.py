"""Failure-detection time of the SWIM driver with default settings, over real UDP on loopback.

Each trial starts an N-node keyed cluster, waits for convergence, stops one node abruptly
(no leave) and measures until the first and until every survivor fires FAILED.

    .venv/bin/python bench/gossip.py --nodes 5 --trials 5
Prints one line per trial, a summary, and a final JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Callable

from dcl.membership import EventKind, GossipConfig, MemberEvent, Membership


async def _poll(cond: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def trial(n: int, key: bytes) -> tuple[float, float]:
    failed: dict[str, float] = {}
    nodes: list[Membership] = []

    def handler_for(name: str) -> Callable[[MemberEvent], None]:
        def on_event(e: MemberEvent) -> None:
            if e.kind is EventKind.FAILED:
                failed.setdefault(name, time.monotonic())
        return on_event

    try:
        for i in range(n):
            g = Membership(GossipConfig(node_name=f"n{i}", bind_addr=("127.0.0.1", 0), key=key),
                           handler_for(f"n{i}"))
            await g.start()
            nodes.append(g)
        for g in nodes[1:]:
            await g.join([nodes[0].addr])
        await _poll(lambda: all(len(g.alive_members()) == n for g in nodes), 20.0)
        await asyncio.sleep(1.0)  # settle: let join gossip drain before the measurement
        killed = time.monotonic()
        await nodes[-1].stop()
        await _poll(lambda: len(failed) == n - 1, 30.0)
        times = sorted(t - killed for t in failed.values())
        return times[0], times[-1]
    finally:
        for g in nodes:
            await g.stop()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    key = os.urandom(32)
    firsts, alls = [], []
    for i in range(args.trials):
        first, last = await trial(args.nodes, key)
        firsts.append(first)
        alls.append(last)
        print(f"trial {i}: first peer {first:.2f} s, all peers {last:.2f} s")
    print(f"median: first {statistics.median(firsts):.2f} s, all {statistics.median(alls):.2f} s;"
          f" max all {max(alls):.2f} s")
    print(json.dumps({"bench": "gossip_failure_detection", "nodes": args.nodes,
                      "trials": args.trials, "first_median_s": round(statistics.median(firsts), 3),
                      "all_median_s": round(statistics.median(alls), 3),
                      "all_max_s": round(max(alls), 3)}))


if __name__ == "__main__":
    asyncio.run(main())
