"""Storage benchmark: append, fsync'd append, random reads, scans and recovery of dcl.storage.Log.

Usage: .venv/bin/python bench/storage.py [--quick] [--dir DIR]

Prints one line per measurement, then a final JSON line with the headline figures. Every
measurement runs in a fresh temporary directory. On shared 2-core machines the numbers are
noisy (other processes compete for CPU and disk): compare runs on the same machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dcl.storage import Log, LogConfig

MIB = 1024 * 1024


@contextmanager
def fresh_dir(parent: str | None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dcl-bench-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def percentiles(samples_ns: list[int]) -> str:
    if not samples_ns:
        return "n/a"
    ordered = sorted(samples_ns)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000

    return f"p50={at(0.50):.1f}us p99={at(0.99):.1f}us p99.9={at(0.999):.1f}us max={at(1):.1f}us"


def report(name: str, value: float, unit: str, detail: str = "") -> None:
    shown = f"{value:>14,.3f}" if unit == "s" else f"{value:>14,.1f}"
    print(f"{name:<28} {shown} {unit:<10} {detail}", flush=True)


def batches(record_size: int, batch_records: int, seed: int) -> list[list[bytes]]:
    """A few distinct pre-built batches, cycled, so generating data is not measured."""
    rng = random.Random(seed)
    return [[rng.randbytes(record_size) for _ in range(batch_records)] for _ in range(8)]


def bench_append(
    directory: Path, record_size: int, total_records: int, batch_records: int, fsync: bool
) -> tuple[float, float, list[int]]:
    """Returns (records/s, MB/s, per-batch latencies in ns)."""
    data = batches(record_size, batch_records, seed=record_size)
    latencies: list[int] = []
    log = Log(directory)
    clock = time.perf_counter_ns
    start = clock()
    for i in range(total_records // batch_records):
        t0 = clock()
        log.append_batch(data[i % len(data)])
        if fsync:
            log.sync()
        latencies.append(clock() - t0)
    log.flush()
    elapsed = (clock() - start) / 1e9
    written = (total_records // batch_records) * batch_records
    if log.next_offset != written:
        raise SystemExit(f"benchmark bug: wrote {written} records, log holds {log.next_offset}")
    log.close()
    return written / elapsed, written * record_size / elapsed / 1e6, latencies


def fill(directory: Path, record_size: int, total_bytes: int, config: LogConfig) -> int:
    data = batches(record_size, max(1, MIB // record_size), seed=7)
    log = Log(directory, config)
    i = 0
    while log.next_offset * record_size < total_bytes:
        log.append_batch(data[i % len(data)])
        i += 1
    count = log.next_offset
    log.close()
    return count


def drop_page_cache(directory: Path) -> None:
    """Evict this log's clean pages (only ours, unlike drop_caches) so recovery reads the disk."""
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about 10 s)")
    parser.add_argument("--dir", default=None, help="parent directory for the temp dirs")
    args = parser.parse_args()
    quick: bool = args.quick
    parent: str | None = args.dir

    small_records = 300_000 if quick else 3_000_000
    fsync_bytes = 64 * MIB if quick else 512 * MIB
    reads = 100_000 if quick else 500_000
    recover_bytes = 128 * MIB if quick else 1024 * MIB
    print(f"dcl.storage benchmark (quick={quick}, cpus={os.cpu_count()}; shared machine: noisy)")

    results: dict[str, float] = {}
    with fresh_dir(parent) as directory:
        rps, mbps, lat = bench_append(directory, 100, small_records, 1000, fsync=False)
        detail = f"{mbps:.0f} MB/s; per batch {percentiles(lat)}"
        report("append 100B, batch 1000", rps, "records/s", detail)
        results["append_100b_rps"] = rps

        log = Log(directory)
        count = log.next_offset
        rng = random.Random(1)
        offsets = [rng.randrange(count) for _ in range(reads)]
        read = log.read
        start = time.perf_counter()
        for offset in offsets:
            read(offset)
        elapsed = time.perf_counter() - start
        report("random read 100B", reads / elapsed, "records/s")
        results["random_read_rps"] = reads / elapsed
        clock = time.perf_counter_ns
        samples: list[int] = []
        for offset in offsets[:20_000]:
            t0 = clock()
            read(offset)
            samples.append(clock() - t0)
        print(f"{'  random read latency':<28} {percentiles(samples)}")

        def scan() -> int:
            offset, total = log.lowest_offset, 0
            while offset < log.next_offset:
                got = log.read_batch(offset, 4096, MIB)
                offset += len(got)
                total += len(got)
            return total

        elapsed = timed(scan)
        report("scan read_batch 100B", count / elapsed, "records/s")
        results["scan_rps"] = count / elapsed

        def stream() -> None:
            with log.reader() as reader:
                while reader.read(4 * MIB):
                    pass

        elapsed = timed(stream)
        size = sum(p.stat().st_size for p in directory.glob("*.store"))
        report("scan reader() bytes", size / elapsed / 1e6, "MB/s")
        log.close()

    with fresh_dir(parent) as directory:
        rps, _, lat = bench_append(directory, 100, small_records // 10, 1, fsync=False)
        report("append 100B, one by one", rps, "records/s", f"per call {percentiles(lat)}")

    with fresh_dir(parent) as directory:
        rps, mbps, _ = bench_append(directory, 1024, 64 * 1024, 1024, fsync=False)
        report("append 1KiB, batch 1MiB", mbps, "MB/s", f"{rps:,.0f} records/s")

    with fresh_dir(parent) as directory:
        # Worst case for one segment: its index is lost and every frame is re-read and CRC'd.
        config = LogConfig()
        records = fill(directory, 100, config.max_store_bytes - MIB, config)
        for index in directory.glob("*.index"):
            index.unlink()
        drop_page_cache(directory)
        rebuilt: list[Log] = []
        elapsed = timed(lambda: rebuilt.append(Log(directory, config)))
        rebuilt.pop().close()
        report("rebuild lost index, 63 MiB", elapsed, "s", f"{records:,} records of 100 B")

    with fresh_dir(parent) as directory:
        rps, mbps, lat = bench_append(directory, 1024, fsync_bytes // 1024, 1024, fsync=True)
        report("append 1KiB + fsync/MiB", mbps, "MB/s", f"{rps:,.0f} rec/s; {percentiles(lat)}")
        results["append_1k_fsync_mbps"] = mbps

    with fresh_dir(parent) as directory:
        config = LogConfig()
        records = fill(directory, 1024, recover_bytes, config)
        opened: list[Log] = []
        drop_page_cache(directory)
        clean = timed(lambda: opened.append(Log(directory, config)))
        # Scale a quick run's figure to 1 GiB so the JSON key means the same in both modes.
        scale = (1024 * MIB) / recover_bytes
        report(
            f"recover {recover_bytes // MIB} MiB (clean)", clean, "s",
            f"{records:,} records, cold cache; scaled to 1 GiB: {clean * scale:.3f} s",
        )
        # kill -9 after more appends: indexes stay oversized, nothing is trimmed or fsynced.
        log = opened.pop()
        log.append_batch([b"x" * 1024] * 100)
        log.flush()
        for segment in log._segments:
            os.close(segment.store._fd)
            segment.index.mm.close()
            os.close(segment.index._fd)
        os.close(log._dir_fd)
        drop_page_cache(directory)
        crashed = timed(lambda: opened.append(Log(directory, config)))
        opened.pop().close()
        report(
            f"recover {recover_bytes // MIB} MiB (crash)", crashed, "s",
            f"cold cache where the kernel allows; scaled to 1 GiB: {crashed * scale:.3f} s",
        )
        results["recover_1gib_s"] = max(clean, crashed) * scale
        # The full check recovery skips (LogFsm runs it at open on segments not yet verified):
        # every frame's CRC and every index entry, cold cache.
        log = Log(directory, config)
        drop_page_cache(directory)
        found: list[int | None] = []
        verified = timed(lambda: found.append(log.verify()))
        log.close()
        assert found == [None]
        report(
            f"verify {recover_bytes // MIB} MiB", verified, "s",
            f"1 KiB records, cold cache; scaled to 1 GiB: {verified * scale:.3f} s",
        )
        results["verify_1gib_s"] = verified * scale

    print(json.dumps({k: round(v, 3) for k, v in results.items()}))


if __name__ == "__main__":
    main()
