"""Benchmark a 3-node DCL Store cluster on loopback: every ack is fsynced on a quorum.

Starts three `dcl agent` processes in a fresh temporary directory (file creation right after a
large delete is slow on this disk and would skew write figures), then measures from this
process over mutual TLS:

  produce_p50/p99_ms     one-at-a-time log.v1 Produce latency
  batch_1k / batch_100b  dcl.v1 ProduceBatch throughput (records/s, MB/s)
  consume_follower_rps   dcl.v1 ConsumeBatch from a follower
  unary_produce_64_rps   log.v1 Produce with 64 calls in flight
  pstream_rps            log.v1 ProduceStream, 8 streams x 64 unanswered requests
  cstream_rps            log.v1 ConsumeStream from a follower, one stream (100 B records;
                         1 KiB records and an idle stream at the tail are printed too)

The last line is one JSON object with exactly those keys. `--quick` shrinks every phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from grpclib.client import Channel

from dcl.api.dcl.v1 import batch_grpc, batch_pb2
from dcl.api.log.v1 import log_grpc, log_pb2
from dcl.server.certs import PkiFiles, generate_pki
from dcl.tls import client_context


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def agent_args(work: Path, pki: PkiFiles, i: int, ports: Sequence[int]) -> list[str]:
    """The command line of node i of a cluster whose RPC ports are `ports` (n0 bootstraps)."""
    args = [
        sys.executable, "-m", "dcl.cli.main", "agent", "--node-name", f"n{i}",
        "--data-dir", str(work / f"n{i}"), "--rpc-port", str(ports[i]),
        "--bind-addr", f"127.0.0.1:{free_port()}",
        "--acl-model-file", str(pki.acl_model), "--acl-policy-file", str(pki.acl_policy),
        "--server-tls-cert-file", str(pki.server_cert),
        "--server-tls-key-file", str(pki.server_key),
        "--server-tls-ca-file", str(pki.ca_cert), "--peer-tls-cert-file", str(pki.peer_cert),
        "--peer-tls-key-file", str(pki.peer_key), "--peer-tls-ca-file", str(pki.ca_cert),
        "--log-level", "WARNING", "--snapshot-threshold", "1000000000",
        "--gossip-key-file", str(pki.gossip_key),
    ]
    return args + (["--bootstrap"] if i == 0 else ["--join-rpc-addrs", f"127.0.0.1:{ports[0]}"])


def start_cluster(
    work: Path, pki: PkiFiles, extra_args: Sequence[str] = ()
) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    """Three agents; `extra_args` go on every command line (later flags win)."""
    ports = [free_port() for _ in range(3)]
    procs = [subprocess.Popen([*agent_args(work, pki, i, ports), *extra_args])
             for i in range(3)]
    return procs, ports


class Launched(NamedTuple):
    """A benchmark's cluster: its directory, PKI, agents, their RPC ports, and a client."""

    work: Path
    pki: PkiFiles
    procs: list[subprocess.Popen[bytes]]
    ports: list[int]
    tls: ssl.SSLContext
    channels: list[Channel]


def launch_cluster(prefix: str, extra_args: Sequence[str] = ()) -> Launched:
    """A fresh directory and PKI, three agents (`start_cluster`), and the root client's
    channel to each; `stop_cluster(procs, channels, work)` undoes it all."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    pki = generate_pki(work / "pki")
    procs, ports = start_cluster(work, pki, extra_args)
    tls = client_context(pki.root_client_cert, pki.root_client_key, pki.ca_cert)
    channels = [Channel("127.0.0.1", p, ssl=tls) for p in ports]
    return Launched(work, pki, procs, ports, tls, channels)


def stop_cluster(
    procs: Sequence[subprocess.Popen[bytes]], channels: Sequence[Channel], work: Path
) -> None:
    """Close the channels, stop the agents (SIGTERM, then SIGKILL after 30 s), drop `work`."""
    for c in channels:
        c.close()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    shutil.rmtree(work, ignore_errors=True)


async def wait_applied(stub: batch_grpc.BatchStub, next_offset: int) -> None:
    """Wait (up to 30 s) until the node behind stub has applied everything below next_offset."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = await stub.ConsumeBatch(batch_pb2.ConsumeBatchRequest(offset=0, max_records=1))
        if r.next_offset >= next_offset:
            return
        await asyncio.sleep(0.05)


async def write_mib(stub: batch_grpc.BatchStub, mib: int) -> int:
    """Write `mib` MiB of 1 KiB records through ProduceBatch, 512 per call, 4 calls in
    flight (the background load of bench/catchup.py and bench/loaded.py); the record count."""
    values = [b"x" * 1024] * 512
    window = asyncio.Semaphore(4)

    async def one() -> None:
        async with window:
            await stub.ProduceBatch(batch_pb2.ProduceBatchRequest(values=values), timeout=60)

    await asyncio.gather(*(one() for _ in range(mib * 2)))
    return mib * 2 * len(values)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU time per call of each agent and of this client over a phase: where a phase bound
    by CPU spends it (an fsync run by a kernel worker, as the leader's is, is not counted)."""

    def __init__(self, procs: Sequence[subprocess.Popen[bytes]], leader: int) -> None:
        self._pids = [p.pid for p in procs]
        self._leader = leader
        self._start = self._sample()

    def _sample(self) -> list[float]:
        return [cpu_seconds(pid) for pid in self._pids] + [time.process_time()]

    def report(self, calls: int) -> str:
        per_call = [round((b - a) / calls * 1e6)
                    for a, b in zip(self._start, self._sample(), strict=True)]
        client = per_call.pop()
        followers = "/".join(str(us) for i, us in enumerate(per_call) if i != self._leader)
        return (f"CPU per call: leader {per_call[self._leader]} us, followers {followers} us, "
                f"client {client} us")


def pct(samples: list[float], p: float) -> float:
    samples = sorted(samples)
    return samples[min(len(samples) - 1, int(p / 100 * len(samples)))]


async def wait_ready(channels: list[Channel]) -> int:
    """Index of the leader once all three nodes report the same full membership."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            views = [await log_grpc.LogStub(c).GetServers(log_pb2.GetServersRequest(), timeout=2)
                     for c in channels]
            if all(len(v.servers) == 3 and sum(s.is_leader for s in v.servers) == 1
                   for v in views):
                leader_addr = next(s.rpc_addr for s in views[0].servers if s.is_leader)
                if all(s.rpc_addr for s in views[0].servers):
                    ports = [str(c._port) for c in channels]
                    return ports.index(leader_addr.rpartition(":")[2])
        except Exception:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("cluster did not become ready")


async def run(quick: bool) -> dict[str, float]:
    scale = 0.2 if quick else 1.0
    work, _, procs, _, _, channels = launch_cluster("dcl-bench-")
    out: dict[str, float] = {}
    try:
        li = await wait_ready(channels)
        leader, follower = channels[li], channels[(li + 1) % 3]
        log_stub, batch_stub = log_grpc.LogStub(leader), batch_grpc.BatchStub(leader)

        # One at a time.
        lat = []
        cpu = CpuMeter(procs, li)
        for _ in range(int(2000 * scale)):
            t0 = time.perf_counter()
            await log_stub.Produce(log_pb2.ProduceRequest(record=log_pb2.Record(value=b"x" * 100)))
            lat.append((time.perf_counter() - t0) * 1000)
        out["produce_p50_ms"] = round(pct(lat, 50), 3)
        out["produce_p99_ms"] = round(pct(lat, 99), 3)
        print(f"produce one-at-a-time: p50 {out['produce_p50_ms']} ms, "
              f"p90 {pct(lat, 90):.3f} ms, p99 {out['produce_p99_ms']} ms; "
              f"{cpu.report(len(lat))}")

        # Per-record phases first, on a log still small: the batch phases below write a
        # gigabyte, and the disk's writeback of it would be measured by whatever runs next.
        fstub, fl = batch_grpc.BatchStub(follower), log_grpc.LogStub(follower)

        # Unary Produce, 64 in flight: 64 callers, each starting its next call when the last
        # one returns. (A task per call behind a semaphore made the client create and first
        # step all 20,000 tasks inside the timed window: its first 2,000 calls ran at 2.5k/s
        # where the rest ran at 3.7k/s, and the run averaged 5-8% below this loop's.)
        total = int(20_000 * scale)

        async def caller(calls: int) -> None:
            for _ in range(calls):
                await log_stub.Produce(log_pb2.ProduceRequest(record=log_pb2.Record(value=b"u")))

        cpu = CpuMeter(procs, li)
        t0 = time.perf_counter()
        await asyncio.gather(*(caller(total // 64 + (i < total % 64)) for i in range(64)))
        out["unary_produce_64_rps"] = round(total / (time.perf_counter() - t0))
        print(f"unary Produce x64 in flight: {out['unary_produce_64_rps']:,} records/s; "
              f"{cpu.report(total)}")

        # ProduceStream: 8 streams, 64 unanswered requests each.
        per_stream = int(10_000 * scale)

        async def pstream() -> None:
            async with log_stub.ProduceStream.open() as st:
                await st.send_request()
                acked = 0
                req = log_pb2.ProduceRequest(record=log_pb2.Record(value=b"s" * 100))
                window = asyncio.Semaphore(64)  # at most 64 requests unanswered

                async def sender() -> None:
                    for _ in range(per_stream):
                        await window.acquire()
                        await st.send_message(req)
                    await st.end()

                task = asyncio.create_task(sender())
                while acked < per_stream:
                    if await st.recv_message() is None:
                        break
                    acked += 1
                    window.release()
                await task

        pstream_first = (await batch_stub.ConsumeBatch(
            batch_pb2.ConsumeBatchRequest(offset=0))).next_offset
        t0 = time.perf_counter()
        await asyncio.gather(*(pstream() for _ in range(8)))
        out["pstream_rps"] = round(8 * per_stream / (time.perf_counter() - t0))
        print(f"ProduceStream 8x64: {out['pstream_rps']:,} records/s")

        # ConsumeStream from a follower, one stream, over records already there: the
        # ProduceStream phase's 100-byte records (the JSON figure); the 1 KiB records of the
        # batch phase follow below (printed only, to show the byte-bound case).
        await wait_applied(fstub, pstream_first + 8 * per_stream)

        async def cstream(first: int, count: int) -> float:
            t0, got = time.perf_counter(), 0
            async with fl.ConsumeStream.open() as st:
                await st.send_message(log_pb2.ConsumeRequest(offset=first), end=True)
                while got < count:
                    if await st.recv_message() is None:
                        break
                    got += 1
                await st.cancel()
            return got / (time.perf_counter() - t0)

        out["cstream_rps"] = round(await cstream(pstream_first, 8 * per_stream))
        print(f"ConsumeStream from follower: {out['cstream_rps']:,} records/s (100 B records)")
        async def batched(size: int, per_call: int, total: int, inflight: int) -> float:
            values = [os.urandom(size)] * per_call
            calls = total // per_call
            sem = asyncio.Semaphore(inflight)

            async def one() -> None:
                async with sem:
                    await batch_stub.ProduceBatch(batch_pb2.ProduceBatchRequest(values=values))

            t0 = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(calls)))
            return calls * per_call / (time.perf_counter() - t0)

        first_1k = (await batch_stub.ConsumeBatch(
            batch_pb2.ConsumeBatchRequest(offset=0))).next_offset
        rps = await batched(1024, 512, int(200_000 * scale), 4)
        out["batch_1k_rps"] = round(rps)
        out["batch_1k_mbps"] = round(rps * 1024 / 1e6, 1)
        print(f"batch 1 KiB: {rps:,.0f} records/s, {rps * 1024 / 1e6:.1f} MB/s")
        rps = await batched(100, 4096, int(600_000 * scale), 4)
        out["batch_100b_rps"] = round(rps)
        print(f"batch 100 B: {rps:,.0f} records/s")

        # Consume everything from a follower in batches.
        nxt = (await batch_stub.ConsumeBatch(batch_pb2.ConsumeBatchRequest(offset=0))).next_offset
        await wait_applied(fstub, nxt)
        t0, offset, n = time.perf_counter(), 0, 0
        while offset < nxt:
            r = await fstub.ConsumeBatch(batch_pb2.ConsumeBatchRequest(
                offset=offset, max_records=16384, max_bytes=3 << 20))
            offset += len(r.records)
            n += len(r.records)
        out["consume_follower_rps"] = round(n / (time.perf_counter() - t0))
        print(f"consume from follower: {out['consume_follower_rps']:,} records/s ({n} records)")


        await wait_applied(fstub, first_1k + int(100_000 * scale))
        big = await cstream(first_1k, int(100_000 * scale))
        print(f"ConsumeStream from follower: {big:,.0f} records/s (1 KiB records, "
              f"{big * 1024 / 1e6:.0f} MB/s)")

        # An idle ConsumeStream parked at the tail must cost (next to) nothing: no polling.
        fpid = procs[(li + 1) % 3].pid
        tail = (await fstub.ConsumeBatch(batch_pb2.ConsumeBatchRequest(offset=0))).next_offset
        async with fl.ConsumeStream.open() as st:
            await st.send_message(log_pb2.ConsumeRequest(offset=tail), end=True)
            await asyncio.sleep(0.5)
            c0, t0 = cpu_seconds(fpid), time.perf_counter()
            await asyncio.sleep(3.0 * scale if quick else 3.0)
            idle = (cpu_seconds(fpid) - c0) / (time.perf_counter() - t0) * 100
            await st.cancel()
        print(f"idle ConsumeStream at the tail: follower process at {idle:.1f}% CPU "
              "(includes Raft heartbeats and gossip)")
    finally:
        stop_cluster(procs, channels, work)
    keys = ["produce_p50_ms", "produce_p99_ms", "batch_1k_rps", "batch_1k_mbps",
            "batch_100b_rps", "consume_follower_rps", "unary_produce_64_rps", "pstream_rps",
            "cstream_rps"]
    return {k: out[k] for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.quick))))


if __name__ == "__main__":
    main()
