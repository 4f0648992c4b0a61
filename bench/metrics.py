"""What metrics cost: the per-call bookkeeping every RPC pays, and one scrape of a node.

Per call, DclServer's guard reads the clock twice, counts the call by (method, status) and
observes its latency; per group commit, the Raft driver does the same for its fsync. This
times exactly those steps, in batches of 1000 calls, and reports the cost per call against a
one-at-a-time Produce's CPU (about 875 us on the leader in a fast hour, README). A scrape's
cost is the render of a registry shaped like a node's (every RPC method, a few dozen gauges,
the process metrics). The last line is one JSON object.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dcl.metrics import Counter, Histogram, Registry, gauge, process_families

BATCH = 1000
BATCHES = 300
METHODS = 20


def call_bookkeeping_us() -> list[float]:
    """Per-call cost of the guard's metrics steps, one figure per batch of calls."""
    calls = Counter("dcl_rpc_calls_total", "Calls.", ("method", "code"))
    seconds = Histogram("dcl_rpc_duration_seconds", "Latency.", ("method",))
    method = "/log.v1.Log/Produce"
    timer = seconds.labels(method)
    clock = time.perf_counter
    figures = []
    for _ in range(BATCHES):
        started_batch = time.perf_counter_ns()
        for _ in range(BATCH):
            started = clock()
            code = "OK"
            calls.inc((method, code))
            timer.observe(clock() - started)
        figures.append((time.perf_counter_ns() - started_batch) / BATCH / 1000)
    return figures


def scrape_ms() -> list[float]:
    """Render time of a node-sized registry, one figure per scrape."""
    calls = Counter("dcl_rpc_calls_total", "Calls.", ("method", "code"))
    seconds = Histogram("dcl_rpc_duration_seconds", "Latency.", ("method",))
    for m in range(METHODS):
        calls.inc((f"/svc/Method{m}", "OK"), 1000)
        seconds.labels(f"/svc/Method{m}").observe(0.001)
    registry = Registry()
    registry.register(lambda: [gauge(f"dcl_bench_g{i}", "Gauge.", i) for i in range(30)])
    registry.register(calls)
    registry.register(seconds)
    registry.register(process_families)
    figures = []
    for _ in range(200):
        started = time.perf_counter_ns()
        registry.render()
        figures.append((time.perf_counter_ns() - started) / 1e6)
    return figures


def main() -> None:
    per_call = sorted(call_bookkeeping_us())
    scrape = sorted(scrape_ms())
    result = {
        "call_bookkeeping_us_p50": round(statistics.median(per_call), 3),
        "call_bookkeeping_us_p99": round(per_call[int(len(per_call) * 0.99)], 3),
        "share_of_leader_cpu_per_produce_pct": round(statistics.median(per_call) / 875 * 100, 3),
        "scrape_render_ms_p50": round(statistics.median(scrape), 3),
        "scrape_render_ms_max": round(scrape[-1], 3),
    }
    print(f"per call: p50 {result['call_bookkeeping_us_p50']} us, "
          f"p99 {result['call_bookkeeping_us_p99']} us")
    print(f"scrape render: p50 {result['scrape_render_ms_p50']} ms, "
          f"max {result['scrape_render_ms_max']} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
