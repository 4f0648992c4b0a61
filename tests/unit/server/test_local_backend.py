"""LocalBackend: durable-before-visible, group commit, ordered offsets, tail waiting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dcl.api.log.v1 import log_pb2
from dcl.errors import OffsetOutOfRange, Unavailable
from dcl.server.local import LocalBackend
from dcl.storage import LogConfig
from tests.unit.server.memory_log import MemoryLog

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
async def slow_sync() -> AsyncIterator[tuple[LocalBackend, MemoryLog]]:
    log = MemoryLog(sync_seconds=0.01)
    backend = LocalBackend(log)
    yield backend, log
    await backend.close()


def value_at(backend: LocalBackend, offset: int) -> bytes:
    return log_pb2.Record.FromString(backend.read(offset)).value


async def test_concurrent_appends_share_one_fsync_per_group(
    slow_sync: tuple[LocalBackend, MemoryLog],
) -> None:
    backend, log = slow_sync
    firsts = await asyncio.gather(*(backend.append([b"%d" % i]) for i in range(200)))
    assert firsts == list(range(200)), "offsets follow call order"
    assert log.syncs < 20, f"{log.syncs} syncs for 200 appends: no group commit"
    assert [value_at(backend, i) for i in (0, 199)] == [b"0", b"199"]


async def test_stored_records_carry_their_offset(slow_sync: tuple[LocalBackend, MemoryLog]) -> None:
    backend, _ = slow_sync
    assert await backend.append([b"a", b"b", b"c"]) == 0
    record = log_pb2.Record.FromString(backend.read(2))
    assert (record.value, record.offset) == (b"c", 2)


async def test_records_are_invisible_until_synced(
    slow_sync: tuple[LocalBackend, MemoryLog],
) -> None:
    backend, log = slow_sync
    pending = backend.append([b"x"])
    await asyncio.sleep(0)  # let the committer write; its fsync is now in flight
    assert log.next_offset == 1 and log.syncs == 0
    assert backend.next_offset == 0
    with pytest.raises(OffsetOutOfRange):
        backend.read(0)
    assert await pending == 0
    assert backend.next_offset == 1 and value_at(backend, 0) == b"x"


async def test_wait_for_resolves_when_the_offset_is_committed(
    slow_sync: tuple[LocalBackend, MemoryLog],
) -> None:
    backend, _ = slow_sync
    waiter = asyncio.ensure_future(backend.wait_for(1))
    await backend.append([b"a"])
    assert not waiter.done()
    await backend.append([b"b"])
    await asyncio.wait_for(waiter, 5)


async def test_cancelling_one_waiter_does_not_affect_others(
    slow_sync: tuple[LocalBackend, MemoryLog],
) -> None:
    backend, _ = slow_sync
    cancelled = asyncio.ensure_future(backend.wait_for(0))
    survivor = asyncio.ensure_future(backend.wait_for(0))
    await asyncio.sleep(0)
    cancelled.cancel()
    await backend.append([b"a"])
    await asyncio.wait_for(survivor, 5)
    assert cancelled.cancelled()


async def test_close_commits_queued_appends_and_wakes_waiters_with_unavailable() -> None:
    log = MemoryLog()
    backend = LocalBackend(log)
    queued = backend.append([b"last"])
    waiter = asyncio.ensure_future(backend.wait_for(5))
    await asyncio.sleep(0)
    await backend.close()
    assert await queued == 0
    with pytest.raises(Unavailable):
        await waiter
    with pytest.raises(Unavailable):
        await backend.append([b"late"])
    assert log.closed and not backend.has_leader


class FailingSyncLog(MemoryLog):
    def sync(self) -> None:
        raise OSError(28, "No space left on device")


async def test_a_failed_commit_refuses_further_appends_but_keeps_reads() -> None:
    log = FailingSyncLog()
    backend = LocalBackend(log)
    with pytest.raises(Unavailable):
        await backend.append([b"a"])
    with pytest.raises(Unavailable):
        await backend.append([b"b"])
    assert backend.next_offset == 0 and not backend.has_leader
    await backend.close()


async def test_reopening_the_storage_log_recovers_committed_records(tmp_path: Path) -> None:
    config = LogConfig(max_store_bytes=1024, max_index_bytes=12 * 16)
    backend = LocalBackend.open(tmp_path, config)
    await backend.append([b"r%d" % i for i in range(100)])
    await backend.close()

    reopened = LocalBackend.open(tmp_path, config)
    try:
        assert reopened.next_offset == 100
        records = reopened.read_batch(0, 1000, 1 << 20)
        assert [log_pb2.Record.FromString(r).offset for r in records][-1] == len(records) - 1
        assert value_at(reopened, 99) == b"r99"
    finally:
        await reopened.close()
