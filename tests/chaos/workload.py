"""The clients of a chaos run: producers (Produce and ProduceBatch) and readers (Consume and
ConsumeStream on random nodes), each operation recorded in the history as it completes.

Every produced value is unique ("c{client}-{seq}"), so the checker can tell each append apart.
Producers use DclClient (leader routing, redirects and its duplication rules: it never retries
an append that may have landed); readers use raw grpclib stubs so each read names the node that
served it. Each operation has a hard deadline, so a paused node cannot stall a client forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from dcl.api.log.v1 import log_grpc, log_pb2
from dcl.client import DclClient
from dcl.client.errors import BatchPartiallyWritten, ProduceOutcomeUnknown
from dcl.errors import DclError
from tests.chaos.history import FAILED, OK, UNKNOWN, History

__all__ = ["Workload", "WorkloadConfig"]

#: A read or produce not finished in this long is abandoned (produce: outcome unknown).
OP_DEADLINE = 12.0
_READ_ERRORS = (GRPCError, OSError, StreamTerminatedError, ProtocolError, EOFError,
                TimeoutError)


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    producers: int = 3
    readers: int = 2
    streamers: int = 1
    #: Pause between one client's operations (seconds): bounds the load on 2 cores.
    think: float = 0.01
    max_batch: int = 8


class Workload:
    def __init__(self, history: History, addresses: Sequence[tuple[str, str]],
                 ssl_context: ssl.SSLContext, config: WorkloadConfig, seed: int) -> None:
        """addresses: (node name, rpc address) of every node."""
        self.history = history
        self.addresses = list(addresses)
        self.ssl_context = ssl_context
        self.config = config
        self.seed = seed
        self.max_acked = -1
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        c = self.config
        for i in range(c.producers):
            self._tasks.append(loop.create_task(self._producer(i)))
        for i in range(c.readers):
            self._tasks.append(loop.create_task(self._reader(i)))
        for i in range(c.streamers):
            self._tasks.append(loop.create_task(self._streamer(i)))

    async def stop(self) -> None:
        self._stop.set()
        done, pending = await asyncio.wait(self._tasks, timeout=OP_DEADLINE + 5)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    # ------------------------------------------------------------------ producers

    async def produce(self, client: DclClient, process: str, values: list[str],
                      batch: bool) -> str:
        """One append, recorded; its outcome."""
        h = self.history
        invoke = h.now()
        payload = [v.encode() for v in values]
        offset: int | None = None
        error = ""
        try:
            if batch:
                offset = await asyncio.wait_for(client.produce_batch(payload), OP_DEADLINE)
            else:
                offset = await asyncio.wait_for(client.produce(payload[0]), OP_DEADLINE)
            outcome = OK
        except (ProduceOutcomeUnknown, BatchPartiallyWritten, TimeoutError) as exc:
            outcome, error = UNKNOWN, repr(exc)[:200]
        except DclError as exc:  # the client knows nothing was appended
            outcome, error = FAILED, repr(exc)[:200]
        except Exception as exc:  # a client bug: it may have been sent; keep the run going
            outcome, error = UNKNOWN, f"unexpected {exc!r}"[:200]
        h.add({"type": "op", "f": "produce", "process": process, "batch": batch,
               "values": values, "invoke": invoke, "complete": h.now(), "outcome": outcome,
               "offset": offset, "error": error})
        if offset is not None:
            self.max_acked = max(self.max_acked, offset + len(values) - 1)
        return outcome

    async def _producer(self, index: int) -> None:
        rng = random.Random(f"{self.seed}-producer-{index}")
        process = f"p{index}"
        client = DclClient([a for _, a in self.addresses], self.ssl_context, timeout=2.0,
                           retries=8, backoff_base=0.02, backoff_max=0.2, rng=rng)
        seq = 0
        try:
            while not self._stop.is_set():
                batch = rng.random() < 0.5
                n = rng.randint(1, self.config.max_batch) if batch else 1
                values = [f"c{index}-{seq + i}" for i in range(n)]
                seq += n
                await self.produce(client, process, values, batch)
                await asyncio.sleep(self.config.think)
        finally:
            await client.close()

    # ------------------------------------------------------------------ readers

    def _pick_offset(self, rng: random.Random) -> int:
        top = self.max_acked
        if top < 0:
            return 0
        return rng.randint(max(0, top - 500), top + 3) if rng.random() < 0.7 else \
            rng.randint(0, top + 3)

    async def _reader(self, index: int) -> None:
        rng = random.Random(f"{self.seed}-reader-{index}")
        process = f"r{index}"
        channels = {name: _channel(addr, self.ssl_context) for name, addr in self.addresses}
        try:
            while not self._stop.is_set():
                name = rng.choice(sorted(channels))
                offset = self._pick_offset(rng)
                h = self.history
                invoke = h.now()
                records: list[list[object]] = []
                outcome, error = OK, ""
                try:
                    reply = await log_grpc.LogStub(channels[name]).Consume(
                        log_pb2.ConsumeRequest(offset=offset), timeout=2.0)
                    assert reply is not None
                    records.append([int(reply.record.offset),
                                    reply.record.value.decode(errors="replace")])
                except GRPCError as exc:
                    if exc.status is not Status.OUT_OF_RANGE:
                        outcome, error = FAILED, f"{exc.status.name} {exc.message}"[:200]
                except _READ_ERRORS as exc:
                    outcome, error = FAILED, repr(exc)[:200]
                h.add({"type": "op", "f": "read", "mode": "consume", "process": process,
                       "node": name, "offset": offset, "invoke": invoke, "complete": h.now(),
                       "outcome": outcome, "records": records, "error": error})
                await asyncio.sleep(self.config.think * 2)
        finally:
            for channel in channels.values():
                channel.close()

    async def _streamer(self, index: int) -> None:
        rng = random.Random(f"{self.seed}-streamer-{index}")
        process = f"s{index}"
        while not self._stop.is_set():
            name, addr = rng.choice(self.addresses)
            offset = max(0, self.max_acked - rng.randint(0, 300))
            h = self.history
            invoke = h.now()
            records: list[list[object]] = []
            outcome, error = OK, ""
            channel = _channel(addr, self.ssl_context)
            try:
                async with asyncio.timeout(rng.uniform(1.0, 3.0)):
                    stub = log_grpc.LogStub(channel)
                    async with stub.ConsumeStream.open() as stream:
                        await stream.send_message(log_pb2.ConsumeRequest(offset=offset),
                                                  end=True)
                        async for reply in stream:
                            records.append([int(reply.record.offset),
                                            reply.record.value.decode(errors="replace")])
            except TimeoutError:
                pass  # the planned end of this stream
            except GRPCError as exc:
                if exc.status is not Status.OUT_OF_RANGE:
                    outcome, error = FAILED, f"{exc.status.name} {exc.message}"[:200]
            except _READ_ERRORS as exc:
                outcome, error = FAILED, repr(exc)[:200]
            finally:
                channel.close()
            h.add({"type": "op", "f": "read", "mode": "stream", "process": process,
                   "node": name, "offset": offset, "invoke": invoke, "complete": h.now(),
                   "outcome": outcome, "records": records, "error": error})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.config.think * 5)


def _channel(address: str, ssl_context: ssl.SSLContext) -> Channel:
    host, _, port = address.rpartition(":")
    return Channel(host, int(port), ssl=ssl_context)
