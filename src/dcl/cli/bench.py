"""``dcl bench``: produce then consume load against a cluster, with a summary table.

Produce: ``--concurrency`` tasks each send ProduceBatch calls of ``--batch`` records of
``--size`` bytes until ``--records`` are appended. Consume: as many tasks read the range
just produced back with ConsumeBatch, in ``--batch``-record slices. Latency is per call
(one batch), measured at the client from send to answer. A consume call that lands on a
follower still behind the range counts as a retry, not as a sample, and is tried again.
"""

from __future__ import annotations

import asyncio
import enum
import json
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from dcl.cli.connection import (
    DEFAULT_CA_FILE,
    DEFAULT_CERT_FILE,
    DEFAULT_KEY_FILE,
    DEFAULT_TIMEOUT,
    AddrOpt,
    CaFileOpt,
    CertFileOpt,
    Connection,
    KeyFileOpt,
    TimeoutOpt,
)
from dcl.cli.errors import CliError
from dcl.cli.output import progress, stdout_console
from dcl.client import DclClient
from dcl.errors import OffsetOutOfRange

__all__ = ["BenchMode", "PhaseResult", "bench", "percentile"]

#: How long a consume slice may wait for a lagging follower before the run is abandoned.
_CATCH_UP_SECONDS = 30.0


class BenchMode(enum.StrEnum):
    both = "both"
    produce = "produce"
    consume = "consume"


@dataclass(frozen=True, slots=True)
class PhaseResult:
    phase: str
    records: int
    calls: int
    seconds: float
    records_per_second: float
    mib_per_second: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(math.ceil(fraction * len(sorted_values)), 1)
    return sorted_values[rank - 1]


def _result(phase: str, records: int, size: int, seconds: float,
            latencies: list[float]) -> PhaseResult:
    ordered = sorted(latencies)
    rate = records / seconds if seconds > 0 else 0.0
    return PhaseResult(
        phase, records, len(latencies), seconds, rate, rate * size / (1 << 20),
        percentile(ordered, 0.50) * 1e3, percentile(ordered, 0.90) * 1e3,
        percentile(ordered, 0.99) * 1e3, (ordered[-1] if ordered else 0.0) * 1e3,
    )


async def _workers(concurrency: int, work: Callable[[], Awaitable[bool]]) -> None:
    """Run ``concurrency`` loops of work() until it returns False; the first error wins."""

    async def loop() -> None:
        while await work():
            pass

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(loop())
    except BaseExceptionGroup as failed:  # report the error itself, not the group
        raise failed.exceptions[0] from None


async def _produce_phase(client: DclClient, records: int, size: int, batch: int,
                         concurrency: int) -> tuple[PhaseResult, int]:
    payload = os.urandom(size)
    remaining = records
    latencies: list[float] = []
    first_offsets: list[int] = []
    with progress() as bar:
        task = bar.add_task("produce", total=records)

        async def one_call() -> bool:
            nonlocal remaining
            count = min(batch, remaining)
            if count <= 0:
                return False
            remaining -= count
            started = time.perf_counter()
            first_offsets.append(await client.produce_batch([payload] * count))
            latencies.append(time.perf_counter() - started)
            bar.advance(task, count)
            return True

        started = time.perf_counter()
        await _workers(concurrency, one_call)
        elapsed = time.perf_counter() - started
    return _result("produce", records, size, elapsed, latencies), min(first_offsets)


async def _consume_phase(client: DclClient, start: int, end: int, size: int, batch: int,
                         concurrency: int) -> PhaseResult:
    cursor = start
    latencies: list[float] = []
    with progress() as bar:
        task = bar.add_task("consume", total=end - start)

        async def read_slice(offset: int, stop: int) -> None:
            deadline = time.monotonic() + _CATCH_UP_SECONDS
            while offset < stop:
                begun = time.perf_counter()
                try:
                    got, offset_after = await client.consume_batch(offset, stop - offset)
                except OffsetOutOfRange:
                    got, offset_after = [], offset  # this follower has not applied it yet
                if not got:
                    if time.monotonic() > deadline:
                        raise CliError(f"offset {offset} was not readable within "
                                       f"{_CATCH_UP_SECONDS:.0f}s")
                    await asyncio.sleep(0.005)
                    continue
                latencies.append(time.perf_counter() - begun)
                bar.advance(task, offset_after - offset)
                offset = offset_after

        async def one_slice() -> bool:
            nonlocal cursor
            if cursor >= end:
                return False
            offset, cursor = cursor, min(cursor + batch, end)
            await read_slice(offset, cursor)
            return True

        started = time.perf_counter()
        await _workers(concurrency, one_slice)
        elapsed = time.perf_counter() - started
    return _result("consume", end - start, size, elapsed, latencies)


async def _run(client: DclClient, mode: BenchMode, records: int, size: int, batch: int,
               concurrency: int) -> list[PhaseResult]:
    results = []
    if mode is BenchMode.consume:
        end = await client.end_offset()
        start = max(end - records, 0)
    else:
        produced, start = await _produce_phase(client, records, size, batch, concurrency)
        results.append(produced)
        # Other producers' records may interleave with ours: the range still holds
        # `records` records, which is all the consume phase needs.
        end = start + records
    if mode is not BenchMode.produce and end > start:
        results.append(await _consume_phase(client, start, end, size, batch, concurrency))
    return results


def _table(results: list[PhaseResult], size: int, batch: int, concurrency: int) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False,
                  title=f"dcl bench: {size}-byte records, {batch} per call, "
                        f"{concurrency} in flight", title_justify="left")
    table.add_column("phase", no_wrap=True)
    for name in ("records", "seconds", "records/s", "MiB/s", "p50 ms", "p90 ms", "p99 ms",
                 "max ms"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in results:
        table.add_row(
            r.phase, f"{r.records:,}", f"{r.seconds:.2f}", f"{r.records_per_second:,.0f}",
            f"{r.mib_per_second:.1f}", f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}",
            f"{r.p99_ms:.2f}", f"{r.max_ms:.2f}",
        )
    return table


def bench(
    records: Annotated[int, typer.Option("--records", "-n", min=1,
                                         help="Records to produce (and read back).")] = 100_000,
    size: Annotated[int, typer.Option("--size", min=0, help="Bytes per record value.")] = 100,
    batch: Annotated[int, typer.Option("--batch", min=1,
                                       help="Records per produce / consume call.")] = 1000,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1,
                                             help="Calls in flight at once.")] = 4,
    mode: Annotated[BenchMode, typer.Option(
        "--mode", help="both: produce, then read the same records back; consume: read the "
        "last --records records of the log.")] = BenchMode.both,
    json_line: Annotated[bool, typer.Option(
        "--json", help="Also print the results as one JSON line.")] = False,
    addr: AddrOpt = None,
    ca_file: CaFileOpt = DEFAULT_CA_FILE,
    cert_file: CertFileOpt = DEFAULT_CERT_FILE,
    key_file: KeyFileOpt = DEFAULT_KEY_FILE,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Measure produce and consume throughput and per-call latency (p50/p90/p99/max)."""
    conn = Connection.from_options(addr, ca_file, cert_file, key_file, timeout)
    results = conn.run(lambda client: _run(client, mode, records, size, batch, concurrency))
    stdout_console.print(_table(results, size, batch, concurrency))
    if json_line:
        typer.echo(json.dumps({"bench": "dcl", "size": size, "batch": batch,
                               "concurrency": concurrency,
                               "results": [asdict(r) for r in results]}))
