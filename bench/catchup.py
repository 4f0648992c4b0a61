"""Benchmark a follower catching up through the leader's snapshot (3 nodes, loopback, mTLS).

Starts three `dcl agent` processes with a 64 MiB Raft-log cap (`--snapshot-log-bytes`), so
the leader snapshots and compacts while it is written to. One follower is killed (SIGKILL),
N MiB of 1 KiB records are written through ProduceBatch, and the follower is restarted: it
has missed entries the leader no longer holds, so it gets the leader's snapshot, restores
its commit log from it and then catches up on the rest. Measured:

  write_mbps          ProduceBatch throughput while the leader snapshots in the background
  catchup_s           restart of the follower (process start included) until it has
                      applied every record
  catchup_mbps        N MiB / catchup_s
  peak_anon_rss_mib   the restarted follower's peak anonymous memory (heap, not the page
                      cache its mapped files use), sampled every 20 ms
  leader_anon_rss_mib the leader's peak anonymous memory meanwhile (what serving the
                      catch-up costs it)
  max_stall_ms        the longest a ConsumeBatch call on the follower took, once it first
                      answered, while it caught up (polled every 20 ms): how long it
                      stopped serving readers, and gossip, which shares its event loop

The last line is one JSON object with exactly those keys. `--quick` writes 60 MiB, not 300
(with a 16 MiB cap); `--mib N` writes N MiB. `--held-mib H` first writes H MiB with the
follower up: it then holds them, receives a snapshot of H + N MiB and appends only the N.

By default the nodes keep no Raft log below their snapshot (`--raft-retain-bytes 0`), so the
follower needs the snapshot. `--retain-mib R` lets them keep R MiB: with R above what the
follower missed, it catches up from the leader's retained log entries instead (checked: it
must not install a snapshot), and the same figures compare the two paths.

`--retention-mib K` runs every node with `--retention-bytes` K MiB: the commit log, and so
each snapshot, stays near K MiB however much is written (the follower's progress is read at
the newest record, which retention keeps).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import time
from pathlib import Path

from cluster import agent_args, launch_cluster, stop_cluster, wait_applied, wait_ready, write_mib
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from dcl.api.dcl.v1 import batch_grpc, batch_pb2


def anon_rss_kib(pid: int) -> int:
    """RssAnon of a process, from /proc (Linux); 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return int(status.split("RssAnon:")[1].split()[0])


async def stable_size(path: Path, still: float = 1.0, timeout: float = 60.0) -> None:
    """Until `path` exists and its size has not changed for `still` seconds."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        size = path.stat().st_size if path.exists() else -1
        if size != last:
            last, since = size, time.monotonic()
        elif size >= 0 and time.monotonic() - since >= still:
            return
        await asyncio.sleep(0.1)
    raise SystemExit(f"{path} still changing after {timeout} s")


async def run(
    quick: bool, mib: int | None = None, held_mib: int = 0, retain_mib: int = 0,
    retention_mib: int = 0,
) -> dict[str, float]:
    mib = mib or (60 if quick else 300)
    log_cap = (16 if quick else 64) << 20  # a few snapshots while writing
    extra = ["--snapshot-threshold", "1000", "--snapshot-log-bytes", str(log_cap),
             "--raft-retain-bytes", str(retain_mib << 20),
             "--retention-bytes", str(retention_mib << 20)]
    work, pki, procs, ports, _, channels = launch_cluster("dcl-catchup-", extra)
    out: dict[str, float] = {}
    try:
        li = await wait_ready(channels)
        fi = (li + 1) % 3
        leader = batch_grpc.BatchStub(channels[li])
        held = 0
        if held_mib:
            held = await write_mib(leader, held_mib)
            await wait_applied(batch_grpc.BatchStub(channels[fi]), held)
            print(f"wrote {held_mib} MiB that the follower holds")
        procs[fi].kill()
        procs[fi].wait()

        t0 = time.perf_counter()
        end = held + await write_mib(leader, mib)
        out["write_mbps"] = round(mib * 1.048576 / (time.perf_counter() - t0), 1)
        print(f"wrote {mib} MiB with a follower down: {out['write_mbps']} MB/s")
        # Let the leader's background snapshot finish, so the follower gets a whole one.
        await stable_size(work / f"n{li}" / "raft" / "snapshot" / "snapshot")

        # The restarted node dials the others again: its gossip port is new, its RPC port not.
        args = agent_args(work, pki, fi, ports)
        args[args.index("--log-level") + 1] = "INFO"  # to see that it installed a snapshot
        log_path = work / f"n{fi}.log"
        t0 = time.perf_counter()
        with log_path.open("wb") as log_file:
            procs[fi] = subprocess.Popen([*args, *extra], stderr=log_file)
        follower = batch_grpc.BatchStub(channels[fi])
        peak = leader_peak = 0
        stall = 0.0
        answered = False
        while True:
            peak = max(peak, anon_rss_kib(procs[fi].pid))
            leader_peak = max(leader_peak, anon_rss_kib(procs[li].pid))
            counted, sent = answered, time.perf_counter()  # the first call also connects
            try:
                r = await follower.ConsumeBatch(  # OUT_OF_RANGE until it holds the last
                    batch_pb2.ConsumeBatchRequest(offset=end - 1, max_records=1),
                    timeout=60 if answered else 0.5)
                answered = True
                if r.next_offset >= end:
                    break
            except (TimeoutError, OSError, StreamTerminatedError):
                if answered:
                    raise  # it answered before: a stall past 60 s is a failure
                # not listening yet
            except GRPCError as exc:  # starting up, or restoring
                if exc.status not in (Status.UNAVAILABLE, Status.OUT_OF_RANGE):
                    raise
                answered = True
            finally:
                if counted:
                    stall = max(stall, time.perf_counter() - sent)
            if time.perf_counter() - t0 > 300:
                raise SystemExit("follower did not catch up within 300 s")
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - t0
        installed = "raft installing snapshot" in log_path.read_text(errors="replace")
        if not retain_mib and not installed:
            raise SystemExit("the follower caught up without a snapshot: nothing measured")
        if retain_mib and installed:
            raise SystemExit("the follower needed a snapshot: raise --retain-mib")
        out["catchup_s"] = round(elapsed, 2)
        out["catchup_mbps"] = round(mib * 1.048576 / elapsed, 1)
        out["peak_anon_rss_mib"] = round(peak / 1024)
        out["max_stall_ms"] = round(stall * 1000)
        out["leader_anon_rss_mib"] = round(leader_peak / 1024)
        print(f"follower caught up on {mib} MiB "
              f"{'from log entries' if retain_mib else 'through a snapshot'} "
              f"in {elapsed:.2f} s (process start included), "
              f"peak anonymous memory {out['peak_anon_rss_mib']} MiB, "
              f"longest call {out['max_stall_ms']} ms, "
              f"leader peak anonymous memory {out['leader_anon_rss_mib']} MiB")
    finally:
        stop_cluster(procs, channels, work)
    keys = ["write_mbps", "catchup_s", "catchup_mbps", "peak_anon_rss_mib", "max_stall_ms",
            "leader_anon_rss_mib"]
    return {k: out[k] for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mib", type=int, help="MiB to write (default 300, or 60 --quick)")
    parser.add_argument("--held-mib", type=int, default=0,
                        help="MiB written first, with the follower up (it keeps them)")
    parser.add_argument("--retain-mib", type=int, default=0,
                        help="Raft log each node keeps below its snapshot (default 0)")
    parser.add_argument("--retention-mib", type=int, default=0,
                        help="commit log each node keeps (--retention-bytes; default 0: all)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.quick, args.mib, args.held_mib, args.retain_mib,
                                     args.retention_mib))))


if __name__ == "__main__":
    main()
