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
from dcl.raft.types import (
    AppendEntries,
    AppendResponse,
    Entry,
    EntryType,
    HeartbeatResponse,
    InstallSnapshot,
    SnapshotMeta,
)
from dcl.server.replicated import LogFsm, ReplicatedBackend
from dcl.storage.space import DiskSpace
from tests.unit.raft.test_driver import (
    Recording,
    _follower,
    _joined,
    gate_snapshots,
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
        assert driver.refused_for_disk == 1
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


async def test_the_memory_limit_holds_when_the_snapshot_that_frees_it_has_no_room(
    tmp_path: Path,
) -> None:
    """Past its memory limit a leader waits for a snapshot to free its Raft log. With no
    room on the disk for the snapshot's copies it cannot take one: it refuses appends
    (InsufficientStorage, saying so) rather than hold them, or take them past the limit
    (before, the log grew without bound here). Freed space lets the snapshot start, and
    appends are taken again."""
    disk = Disk()
    async with leader(tmp_path, disk=disk.space, snapshot_threshold_entries=1,
                      snapshot_max_log_bytes=4096, max_log_memory_bytes=8192) as driver:
        fsm = cast(LogFsm, driver._fsm)
        backend = ReplicatedBackend(driver, fsm, "127.0.0.1:1")
        await until_applied(driver)
        for _ in range(1024):  # 1 MiB of records, snapshots taken as they come due
            await backend.append([b"x" * 1024])
        for _ in range(300):
            if not driver.snapshot_in_progress:
                break
            await asyncio.sleep(0.01)
        assert not driver.snapshot_in_progress, "the last snapshot did not finish in 3 s"
        # Above the reserve (not low) but without room for two copies of 1 MiB of records.
        disk.free = RESERVE + (1 << 20)
        appended = 0
        with pytest.raises(InsufficientStorage) as refused:
            for _ in range(100):
                await asyncio.wait_for(backend.append([b"y" * 1024]), 2)
                appended += 1
        assert 0 < appended < 100
        assert "the snapshot that must free its Raft log first needs" in str(refused.value)
        assert refused.value.reserve_bytes == RESERVE < refused.value.free_bytes
        assert refused.value.snapshot_bytes >= 2 << 20  # two copies of the 1 MiB log
        assert driver.core.log_bytes < 8192 + 1100  # the limit and one entry
        assert driver.disk_full and not disk.space.low
        disk.free = 1 << 40
        for _ in range(300):
            if not driver.disk_full:
                break
            await asyncio.sleep(0.01)
        first = await asyncio.wait_for(backend.append([b"z"]), 5)
        assert first == 1024 + appended
        assert record_value(fsm, first) == b"z"


def chunk(offset: int, data: bytes, *, size: int, index: int = 9) -> InstallSnapshot:
    return InstallSnapshot(1, "L", "f", SnapshotMeta(index, 1, frozenset({"L"})), offset, data,
                           False, size)


async def test_a_follower_takes_a_snapshot_only_with_room_for_all_of_it(tmp_path: Path) -> None:
    """A snapshot is received into a spool, saved as a file and restored into the commit
    log: a follower whose free space above the reserve is less than that drops it from its
    first chunk (filling the disk partway stops the node); one whose disk goes low partway
    drops the spool as well (its space comes back), so the leader's transfer starts over."""
    disk = Disk(free=RESERVE + 250_000)
    fsm, storage, driver = _follower(tmp_path, disk=disk.space)
    driver.start()
    try:
        await _joined(driver)
        incoming = driver.core._incoming
        driver.receive(chunk(0, b"a" * 1000, size=100_000))  # needs 3 x 100 kB: no room
        assert len(incoming) == 0 and driver.dropped_for_disk == 1
        driver.receive(chunk(0, b"a" * 1000, size=80_000))  # 240 kB: room
        assert len(incoming) == 1000
        driver.receive(chunk(1000, b"b" * 1000, size=80_000))
        assert len(incoming) == 2000
        disk.free = RESERVE - 1
        driver.receive(chunk(2000, b"c" * 1000, size=80_000))
        assert len(incoming) == 0 and driver.dropped_for_disk == 2
    finally:
        await driver.stop()
        storage.close()
        fsm.close()


async def test_a_follower_without_room_still_takes_configuration_and_no_op_entries(
    tmp_path: Path,
) -> None:
    """They are tiny, and a new leader's no-op or a change of members (adding a node that
    has room) must commit on nodes that take no records."""
    disk = Disk(free=RESERVE - 1)
    fsm, storage, driver = _follower(tmp_path, disk=disk.space)
    driver.start()
    try:
        await _joined(driver)  # the founding configuration, while low
        driver.receive(AppendEntries(1, "L", "f", 2, 1, (record_entry(3),), 2))
        assert driver.core.last_index == 2 and driver.dropped_for_disk == 1
        noop = Entry(2, 3, EntryType.NOOP, b"")
        driver.receive(AppendEntries(2, "L", "f", 2, 1, (noop,), 3))
        for _ in range(200):
            if driver.core.applied_index == 3:
                break
            await asyncio.sleep(0.01)
        assert driver.core.applied_index == 3
        assert fsm.log.next_offset == 0
    finally:
        await driver.stop()
        storage.close()
        fsm.close()


def test_a_follower_tells_the_leader_its_disk_is_low_in_its_heartbeat_answers(
    tmp_path: Path,
) -> None:
    """What lets the leader refuse writes no quorum could take (`write_refusal`)."""
    disk = Disk()
    fsm, storage, driver = _follower(tmp_path, disk=disk.space)
    transport = cast(Recording, driver._transport)
    try:
        driver._send([HeartbeatResponse(1, "f", "L", 7)])
        disk.free = RESERVE - 1
        driver._send([HeartbeatResponse(1, "f", "L", 8)])
        answers = [m for _, m in transport.sent if isinstance(m, HeartbeatResponse)]
        assert [(m.context, m.disk_low) for m in answers] == [(7, False), (8, True)]
    finally:
        storage.close()
        fsm.close()


async def test_appends_held_for_memory_are_refused_once_the_disk_runs_low(
    tmp_path: Path,
) -> None:
    """Appends wait while a snapshot frees the in-memory Raft log; if the disk drops below
    its reserve meanwhile, they are refused (nothing appended) rather than proposed when
    the hold lifts."""
    disk = Disk()
    async with leader(tmp_path, disk=disk.space, snapshot_threshold_entries=1,
                      snapshot_max_log_bytes=4096, max_log_memory_bytes=8192) as driver:
        fsm = cast(LogFsm, driver._fsm)
        gate = gate_snapshots(fsm)
        backend = ReplicatedBackend(driver, fsm, "127.0.0.1:1")
        await until_applied(driver)
        while not driver.log_memory_full:
            await asyncio.wait_for(backend.append([b"a" * 1024]), 2)
        next_offset = fsm.log.next_offset
        last = driver.core.last_index
        held = [asyncio.ensure_future(backend.append([b"held"])) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert not any(f.done() for f in held)
        disk.free = RESERVE - 1
        try:
            for f in held:
                with pytest.raises(InsufficientStorage):
                    await asyncio.wait_for(f, 2)
        finally:
            gate.set()
        assert driver.core.last_index == last
        assert fsm.log.next_offset == next_offset
