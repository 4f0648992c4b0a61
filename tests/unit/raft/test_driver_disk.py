"""A node whose disk falls below its reserve (dcl.storage.space) takes no new records and
keeps running: a leader refuses appends, a follower drops what it is sent, a snapshot waits
for room; each resumes once space is freed. Real files; the free space is a fake statvfs."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import cast

import pytest

from dcl.errors import InsufficientStorage
from dcl.raft.types import AppendEntries, AppendResponse, InstallSnapshot, SnapshotMeta
from dcl.server.replicated import LogFsm, ReplicatedBackend
from dcl.storage.space import DiskSpace
from tests.unit.raft.test_driver import (
    Recording,
    _follower,
    _joined,
    leader,
    record_entry,
    record_value,
    until_applied,
)

pytestmark = pytest.mark.timeout(30)

RESERVE = 64 << 20


class Disk:
    """A settable free space, seen through DiskSpace as the node sees its real one."""

    def __init__(self, free: int = 1 << 40) -> None:
        self.free = free
        self.space = DiskSpace("/data", RESERVE, node="n", recheck_seconds=0,
                               statvfs=self.statvfs)

    def statvfs(self, path: str) -> os.statvfs_result:
        return os.statvfs_result((4096, 1, 0, 0, self.free, 0, 0, 0, 0, 255))


async def test_a_leader_on_a_low_disk_refuses_appends_and_takes_them_once_space_is_freed(
    tmp_path: Path,
) -> None:
    disk = Disk()
    async with leader(tmp_path, disk=disk.space) as driver:
        fsm = cast(LogFsm, driver._fsm)
        backend = ReplicatedBackend(driver, fsm, "127.0.0.1:1")
        await until_applied(driver)
        assert await backend.append([b"a"]) == 0
        disk.free = RESERVE - 1
        last = driver.core.last_index
        with pytest.raises(InsufficientStorage) as refused:
            await backend.append([b"refused"])
        assert (refused.value.free_bytes, refused.value.reserve_bytes) == (RESERVE - 1, RESERVE)
        assert driver.core.last_index == last  # nothing proposed
        assert disk.space.refused == 1
        disk.free = RESERVE
        assert await backend.append([b"b"]) == 1
        assert [record_value(fsm, o) for o in (0, 1)] == [b"a", b"b"]
        assert fsm.log.next_offset == 2


async def test_a_follower_on_a_low_disk_drops_entries_and_snapshots_then_takes_them_again(
    tmp_path: Path,
) -> None:
    """Dropped unanswered, as lost messages: the leader resends them once the follower
    answers again. Heartbeat-only appends (no entries) are still answered, so the leader
    keeps its term and commit index flowing to a node that cannot write."""
    disk = Disk()
    fsm, storage, driver = _follower(tmp_path, disk=disk.space)
    transport = cast(Recording, driver._transport)
    driver.start()
    try:
        await _joined(driver)
        driver.receive(AppendEntries(1, "L", "f", 2, 1, (record_entry(3),), 3))
        disk.free = RESERVE - 1
        driver.receive(AppendEntries(1, "L", "f", 3, 1, (record_entry(4),), 4))
        meta = SnapshotMeta(9, 1, frozenset({"L"}))
        driver.receive(InstallSnapshot(1, "L", "f", meta, 0, b"x", False))
        assert driver.core.last_index == 3
        assert driver.dropped_for_disk == 2
        driver.receive(AppendEntries(1, "L", "f", 3, 1, (), 3))  # entries: none
        for _ in range(200):
            if driver.core.applied_index == 3:
                break
            await asyncio.sleep(0.01)
        answered = [m.index for _, m in transport.sent if isinstance(m, AppendResponse)]
        assert 4 not in answered and answered.count(3) >= 2
        disk.free = RESERVE
        driver.receive(AppendEntries(1, "L", "f", 3, 1, (record_entry(4),), 4))
        for _ in range(200):
            if driver.core.applied_index == 4:
                break
            await asyncio.sleep(0.01)
        assert [record_value(fsm, o) for o in (0, 1)] == [bytes([3]) * 1024, bytes([4]) * 1024]
        assert driver.dropped_for_disk == 2
    finally:
        await driver.stop()
        storage.close()
        fsm.close()


async def test_a_snapshot_waits_until_the_disk_has_room_for_its_copies(tmp_path: Path) -> None:
    """A snapshot writes a scratch copy of the commit log and then the snapshot file: with
    less room than that above the reserve it waits (ENOSPC in the middle of one stops the
    node), and the Raft log stays; once space is freed the next apply takes it."""
    disk = Disk()
    async with leader(tmp_path, disk=disk.space, snapshot_threshold_entries=4) as driver:
        fsm = cast(LogFsm, driver._fsm)
        backend = ReplicatedBackend(driver, fsm, "127.0.0.1:1")
        await until_applied(driver)
        disk.free = RESERVE + 1024  # appends go on, but a copy of 8 KiB of records does not fit
        for i in range(8):
            await backend.append([bytes([i]) * 1024])
        await asyncio.sleep(0.1)
        assert driver.snapshots_taken == 0 and not driver.snapshot_in_progress
        assert driver.core.first_index == 1  # the Raft log is all there
        disk.free = RESERVE + (1 << 20)
        await backend.append([b"last"])
        for _ in range(300):
            if driver.snapshots_taken == 1 and not driver.snapshot_in_progress:
                break
            await asyncio.sleep(0.01)
        assert driver.snapshots_taken == 1
        assert driver.core.first_index > 1  # compacted behind it
        assert record_value(fsm, 8) == b"last"
