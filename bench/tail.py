"""Benchmark how soon a follower's tail reader sees a record (3 nodes, mTLS, fsync on a quorum).

A consumer that reads from a follower gets a record only once the follower learns it is
committed, which takes a message from the leader after the commit. The leader may hold that
message back for the next append to carry (see `RaftDriver`: only while writes are steady),
so this measures both shapes of traffic, with one ConsumeStream open on a follower at the
tail and one-record Produce calls on the leader:

  - sparse: one write every 20 ms (the leader announces each commit at once);
  - steady: one write after another, each sent when the previous one was acknowledged.

Measured, per shape (ms):

  <shape>_e2e_p50_ms / _p99_ms     from the Produce call to the follower's push
  <shape>_after_ack_p50_ms / _p99_ms   from the acknowledgement to the follower's push

The last line is one JSON object with exactly those eight keys. `--quick` sends 100 records
per shape instead of 500.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from cluster import launch_cluster, pct, stop_cluster, wait_ready

from dcl.api.log.v1 import log_grpc, log_pb2


async def measure(
    leader: log_grpc.LogStub, follower: log_grpc.LogStub, count: int, gap_s: float
) -> tuple[list[float], list[float]]:
    """(call -> push, ack -> push) in ms for `count` one-record writes `gap_s` apart."""
    one = log_pb2.ProduceRequest(record=log_pb2.Record(value=b"t" * 100))
    start = (await leader.Produce(one)).offset + 1
    pushed: dict[int, float] = {}
    all_seen = asyncio.Event()

    async with follower.ConsumeStream.open() as stream:
        await stream.send_message(log_pb2.ConsumeRequest(offset=start), end=True)

        async def follow() -> None:
            async for response in stream:
                pushed[response.record.offset] = time.perf_counter()
                if len(pushed) == count:
                    all_seen.set()

        reader = asyncio.get_running_loop().create_task(follow())
        try:
            await asyncio.sleep(0.3)  # the stream is open and waiting at the tail
            called: dict[int, float] = {}
            acked: dict[int, float] = {}
            for _ in range(count):
                t0 = time.perf_counter()
                offset = (await leader.Produce(one, timeout=30)).offset
                called[offset], acked[offset] = t0, time.perf_counter()
                if gap_s:
                    await asyncio.sleep(gap_s)
            await asyncio.wait_for(all_seen.wait(), 30)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await stream.cancel()
    if sorted(pushed) != sorted(called):
        raise SystemExit("the follower pushed other offsets than were produced")
    e2e = [(pushed[o] - called[o]) * 1000 for o in called]
    after_ack = [(pushed[o] - acked[o]) * 1000 for o in called]
    return e2e, after_ack


async def run(count: int) -> dict[str, float]:
    work, _, procs, _, _, channels = launch_cluster("dcl-tail-")
    out: dict[str, float] = {}
    try:
        li = await wait_ready(channels)
        leader = log_grpc.LogStub(channels[li])
        follower = log_grpc.LogStub(channels[(li + 1) % 3])
        for shape, gap in (("sparse", 0.02), ("steady", 0.0)):
            e2e, after_ack = await measure(leader, follower, count, gap)
            out[f"{shape}_e2e_p50_ms"] = round(pct(e2e, 50), 2)
            out[f"{shape}_e2e_p99_ms"] = round(pct(e2e, 99), 2)
            out[f"{shape}_after_ack_p50_ms"] = round(pct(after_ack, 50), 2)
            out[f"{shape}_after_ack_p99_ms"] = round(pct(after_ack, 99), 2)
            print(f"{shape}: call -> follower push p50 {out[f'{shape}_e2e_p50_ms']} ms, "
                  f"ack -> push p50 {out[f'{shape}_after_ack_p50_ms']} ms")
        return out
    finally:
        stop_cluster(procs, channels, work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(100 if args.quick else 500))))


if __name__ == "__main__":
    main()
