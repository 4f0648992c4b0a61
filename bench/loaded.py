"""Benchmark one-record produce latency while the cluster takes a batch write (3 nodes, mTLS).

A steady batch writer is what fills segments, triggers write-behind and checkpoints, and
queues fsyncs on the shared disk; a latency-sensitive client on the same cluster sees the
stalls that causes. This runs both at once against the leader:

  - the load: ProduceBatch calls of 512 x 1 KiB records, 4 in flight, N MiB in all;
  - the probe: one-record Produce every 20 ms on its own connection, for as long as the
    load runs.

Measured:

  write_mbps       the load's throughput
  probe_p50_ms     probe latency while the load runs (queued behind it, so not the idle p50)
  probe_p99_ms
  probe_max_ms

The last line is one JSON object with exactly those keys. `--quick` writes 60 MiB, not 400;
`--mib N` writes N MiB. Snapshots are off (see bench/catchup.py for those).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from cluster import launch_cluster, pct, stop_cluster, wait_ready, write_mib
from grpclib.client import Channel

from dcl.api.dcl.v1 import batch_grpc
from dcl.api.log.v1 import log_grpc, log_pb2


async def run(mib: int) -> dict[str, float]:
    work, _, procs, ports, ctx, channels = launch_cluster("dcl-loaded-")
    probe_channel: Channel | None = None
    try:
        li = await wait_ready(channels)
        probe_channel = Channel("127.0.0.1", ports[li], ssl=ctx)
        probe_stub = log_grpc.LogStub(probe_channel)
        one = log_pb2.ProduceRequest(record=log_pb2.Record(value=b"p" * 100))
        for _ in range(20):  # connect and warm up
            await probe_stub.Produce(one)

        writing = True
        latencies: list[float] = []

        async def probe() -> None:
            while writing:
                t0 = time.perf_counter()
                await probe_stub.Produce(one, timeout=30)
                latencies.append((time.perf_counter() - t0) * 1000)
                await asyncio.sleep(0.02)

        prober = asyncio.get_running_loop().create_task(probe())
        t0 = time.perf_counter()
        await write_mib(batch_grpc.BatchStub(channels[li]), mib)
        elapsed = time.perf_counter() - t0
        writing = False
        await prober
        if len(latencies) < 20:
            raise SystemExit(f"only {len(latencies)} probes during the load: nothing measured")
        out = {
            "write_mbps": round(mib * 1.048576 / elapsed, 1),
            "probe_p50_ms": round(pct(latencies, 50), 2),
            "probe_p99_ms": round(pct(latencies, 99), 2),
            "probe_max_ms": round(max(latencies), 2),
        }
        print(f"wrote {mib} MiB in {elapsed:.1f} s with {len(latencies)} probes alongside")
        return out
    finally:
        if probe_channel is not None:
            probe_channel.close()
        stop_cluster(procs, channels, work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mib", type=int, help="MiB to write (default 400, or 60 --quick)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.mib or (60 if args.quick else 400)))))


if __name__ == "__main__":
    main()
