"""The latency floor of one-at-a-time Produce on this transport: the same processes, sockets,
mutual TLS, gRPC stack and fsyncs as a quorum write, with no Raft and no log behind them.

Four processes on loopback, as in bench/cluster.py: a client, a "leader" and two
"followers". The client calls log.v1 Produce one at a time. The leader writes the record to a
file and starts an fsync (AIO, as the Raft log does), and sends one RaftBatch holding one
AppendEntries message to each follower over a long-lived dcl.v1.Raft/Send stream. Each
follower writes and fsyncs the entry, then sends an AppendResponse back over its own stream
to the leader. The leader answers the client once its fsync and the first follower's
response are in: the message pattern, hop count and durability of a real 3-node commit.

What is left out is everything DCL Store adds on top: the Raft core, the Raft log's segment
files, the commit log and apply, the ACL, heartbeats and gossip. So this p50 bounds from
below what any Raft on grpclib + TLS can reach on the machine at that moment; compare it
with bench/cluster.py's `produce_p50_ms` from the same hour (machine speed varies a lot).

  python bench/floor.py [--calls N] [--no-fsync] [--no-tls]

The last line is one JSON object: floor_p50_ms, floor_p99_ms and the CPU per call of each
process (the sum bounds the p50 from below on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cluster import cpu_seconds, free_port, pct, stop_cluster
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from dcl.api.dcl.v1 import raft_grpc, raft_pb2
from dcl.api.log.v1 import log_grpc, log_pb2
from dcl.server.certs import PkiFiles, generate_pki
from dcl.server.server import _CorkedServer
from dcl.storage.aio import AioFsync
from dcl.tls import client_context, server_context


class Disk:
    """Appends to one file and fsyncs through AIO (a thread where AIO is unavailable)."""

    def __init__(self, path: Path, fsync: bool) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._pos = 0
        self._fsync = fsync
        self._aio = AioFsync.open(asyncio.get_running_loop()) if fsync else None

    async def write(self, data: bytes) -> None:
        os.pwrite(self._fd, data, self._pos)
        self._pos += len(data)
        if not self._fsync:
            return
        if self._aio is not None:
            await self._aio.fsync(self._fd)
        else:
            await asyncio.get_running_loop().run_in_executor(None, os.fsync, self._fd)


class Outbound:
    """One long-lived Raft/Send stream to a peer, fed from a queue, as the node's transport
    (dcl.server.raft_transport) keeps one per peer."""

    def __init__(self, port: int, tls: ssl.SSLContext | None) -> None:
        self._channel = Channel("127.0.0.1", port, ssl=tls)
        self._queue: asyncio.Queue[raft_pb2.RaftBatch] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def send(self, batch: raft_pb2.RaftBatch) -> None:
        self._queue.put_nowait(batch)

    async def _run(self) -> None:
        while True:
            try:
                async with raft_grpc.RaftStub(self._channel).Send.open() as stream:
                    await stream.send_request()
                    while True:
                        await stream.send_message(await self._queue.get())
            except (TimeoutError, OSError, GRPCError):
                await asyncio.sleep(0.05)  # the peer is not up yet


def append_batch(index: int, data: bytes) -> raft_pb2.RaftBatch:
    batch = raft_pb2.RaftBatch()
    m = batch.messages.add(term=1, src="leader", dst="follower")
    m.append.prev_index, m.append.prev_term, m.append.commit = index - 1, 1, index - 1
    m.append.want_response = True
    m.append.entries.add(term=1, index=index, type=1, data=data)
    return batch


def response_batch(index: int) -> raft_pb2.RaftBatch:
    batch = raft_pb2.RaftBatch()
    batch.messages.add(term=1, src="follower", dst="leader").append_response.index = index
    return batch


class FollowerRaft(raft_grpc.RaftBase):
    def __init__(self, disk: Disk, leader: Outbound) -> None:
        self._disk, self._leader = disk, leader

    async def Send(self, stream: Stream[raft_pb2.RaftBatch, raft_pb2.RaftSendSummary]) -> None:
        async for batch in stream:
            for m in batch.messages:
                entries = m.append.entries
                await self._disk.write(entries[0].SerializeToString())
                self._leader.send(response_batch(entries[-1].index))
        await stream.send_message(raft_pb2.RaftSendSummary())


class LeaderRaft(raft_grpc.RaftBase):
    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future[None]] = {}

    async def Send(self, stream: Stream[raft_pb2.RaftBatch, raft_pb2.RaftSendSummary]) -> None:
        async for batch in stream:
            for m in batch.messages:
                done = self.waiting.pop(m.append_response.index, None)
                if done is not None and not done.done():
                    done.set_result(None)
        await stream.send_message(raft_pb2.RaftSendSummary())


class LeaderLog(log_grpc.LogBase):
    def __init__(self, disk: Disk, raft: LeaderRaft, peers: list[Outbound]) -> None:
        self._disk, self._raft, self._peers = disk, raft, peers
        self._index = 0

    async def Produce(
        self, stream: Stream[log_pb2.ProduceRequest, log_pb2.ProduceResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        self._index += 1
        index = self._index
        data = req.record.SerializeToString()
        acked = self._raft.waiting[index] = asyncio.get_running_loop().create_future()
        batch = append_batch(index, data)
        for peer in self._peers:
            peer.send(batch)
        await self._disk.write(data)
        await acked
        await stream.send_message(log_pb2.ProduceResponse(offset=index - 1))

    async def _unimplemented(self, stream: Stream[Any, Any]) -> None:
        raise GRPCError(Status.UNIMPLEMENTED)

    Consume = ProduceStream = ConsumeStream = GetServers = _unimplemented


async def serve(role: str, work: Path, port: int, peer_ports: list[int], fsync: bool,
                tls: bool) -> None:
    pki = PkiFiles(work / "pki")
    tls_server = server_context(pki.server_cert, pki.server_key, pki.ca_cert) if tls else None
    tls_peer = client_context(pki.peer_cert, pki.peer_key, pki.ca_cert) if tls else None
    disk = Disk(work / f"{role}-{port}.data", fsync)
    handlers: list[Any]
    if role == "leader":
        raft = LeaderRaft()
        handlers = [raft, LeaderLog(disk, raft, [Outbound(p, tls_peer) for p in peer_ports])]
    else:
        handlers = [FollowerRaft(disk, Outbound(peer_ports[0], tls_peer))]
    server = _CorkedServer(handlers)
    await server.start("127.0.0.1", port, ssl=tls_server)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()


async def measure(work: Path, ports: list[int], procs: list[subprocess.Popen[bytes]],
                  calls: int, tls: bool) -> dict[str, float]:
    pki = PkiFiles(work / "pki")
    context = (client_context(pki.root_client_cert, pki.root_client_key, pki.ca_cert)
               if tls else None)
    channel = Channel("127.0.0.1", ports[0], ssl=context)
    stub = log_grpc.LogStub(channel)
    request = log_pb2.ProduceRequest(record=log_pb2.Record(value=b"x" * 100))
    deadline = time.monotonic() + 30
    while True:  # until the leader's streams to both followers carry answers
        try:
            await asyncio.wait_for(stub.Produce(request), 1.0)
            break
        except (TimeoutError, OSError, GRPCError):
            if time.monotonic() > deadline:
                raise SystemExit("the floor cluster did not come up") from None
            await asyncio.sleep(0.1)
    for _ in range(300):  # warm up
        await stub.Produce(request)
    before = [cpu_seconds(p.pid) for p in procs]
    self_before = time.process_time()
    lat = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await stub.Produce(request)
        lat.append((time.perf_counter() - t0) * 1000)
    us = [(cpu_seconds(p.pid) - b) / calls * 1e6 for p, b in zip(procs, before, strict=True)]
    client_us = (time.process_time() - self_before) / calls * 1e6
    channel.close()
    return {
        "floor_p50_ms": round(pct(lat, 50), 3), "floor_p99_ms": round(pct(lat, 99), 3),
        "leader_cpu_us": round(us[0]), "follower_cpu_us": round((us[1] + us[2]) / 2),
        "client_cpu_us": round(client_us),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--no-fsync", action="store_true", help="skip every fsync")
    parser.add_argument("--no-tls", action="store_true",
                        help="plaintext HTTP/2 (DCL Store never runs so): the share TLS takes")
    parser.add_argument("--serve", nargs=3, metavar=("ROLE", "WORK", "PORTS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        role, work, ports = args.serve
        port, *peers = (int(p) for p in ports.split(","))
        asyncio.run(serve(role, Path(work), port, peers, not args.no_fsync, not args.no_tls))
        return
    work = Path(tempfile.mkdtemp(prefix="dcl-floor-"))
    generate_pki(work / "pki")
    ports = [free_port() for _ in range(3)]
    flags = ["--no-fsync"] * args.no_fsync + ["--no-tls"] * args.no_tls
    leader = f"{ports[0]},{ports[1]},{ports[2]}"
    roles = [("leader", leader), ("follower", f"{ports[1]},{ports[0]}"),
             ("follower", f"{ports[2]},{ports[0]}")]
    procs = [subprocess.Popen([sys.executable, __file__, *flags, "--serve", role, str(work), p])
             for role, p in roles]
    try:
        out = asyncio.run(measure(work, ports, procs, args.calls, not args.no_tls))
    finally:
        stop_cluster(procs, [], work)
    print(f"floor one-at-a-time: p50 {out['floor_p50_ms']} ms, p99 {out['floor_p99_ms']} ms; "
          f"CPU per call: leader {out['leader_cpu_us']} us, followers {out['follower_cpu_us']} us"
          f" each, client {out['client_cpu_us']} us")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
