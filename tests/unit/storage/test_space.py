"""DiskSpace: the free space of the data directory's disk against the node's reserve."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from dcl.storage.space import DiskSpace


class FakeDisk:
    """statvfs with a settable free space, counting the calls; and a settable clock."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.calls = 0
        self.now = 0.0
        self.error: OSError | None = None

    def statvfs(self, path: str) -> os.statvfs_result:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return os.statvfs_result((4096, 512, 0, 0, self.free // 512, 0, 0, 0, 0, 255))

    def clock(self) -> float:
        return self.now


def space(disk: FakeDisk, reserve: int) -> DiskSpace:
    return DiskSpace("/data", reserve, node="n1", recheck_seconds=0.01,
                     statvfs=disk.statvfs, clock=disk.clock)


def test_low_exactly_while_free_space_is_below_the_reserve() -> None:
    disk = FakeDisk(free=100 << 20)
    guard = space(disk, reserve=64 << 20)
    assert guard.free_bytes() == 100 << 20
    assert not guard.low
    for free, low in ((64 << 20, False), ((64 << 20) - 512, True), (0, True),
                      (65 << 20, False)):
        disk.free = free
        disk.now += 1
        assert guard.low is low, free


def test_no_reserve_is_never_low() -> None:
    disk = FakeDisk(free=0)
    guard = space(disk, reserve=0)
    assert not guard.low
    assert guard.free_bytes() == 0  # still measured, for metrics


def test_the_disk_is_measured_at_most_once_per_recheck_interval() -> None:
    """statvfs is on the append path: within the interval the last measure stands, and a
    change shows from the first look after it."""
    disk = FakeDisk(free=100 << 20)
    guard = space(disk, reserve=64 << 20)
    for _ in range(50):
        assert not guard.low
    assert disk.calls == 1
    disk.free = 1 << 20
    disk.now += 0.005
    assert not guard.low  # the last measure, 5 ms old
    disk.now += 0.005
    assert guard.low
    assert disk.calls == 2


def test_a_disk_that_cannot_be_measured_counts_as_full(caplog: pytest.LogCaptureFixture) -> None:
    disk = FakeDisk(free=100 << 20)
    guard = space(disk, reserve=64 << 20)
    disk.error = OSError(5, "Input/output error")
    assert guard.low
    assert guard.free_bytes() == 0
    assert "cannot measure free disk space" in caplog.text
    disk.error = None
    disk.now += 1
    assert not guard.low


def test_each_change_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dcl.storage.space")
    disk = FakeDisk(free=100 << 20)
    guard = space(disk, reserve=64 << 20)
    for free in (1 << 20, 2 << 20, 100 << 20, 99 << 20, 3 << 20):
        disk.free = free
        disk.now += 1
        guard.low  # noqa: B018 - a look, as a write makes
    messages = [r.getMessage() for r in caplog.records]
    below = [m for m in messages if m.startswith("disk below its reserve")]
    above = [m for m in messages if m.startswith("disk above its reserve")]
    assert len(below) == 2 and len(above) == 1
    assert "free_bytes=1048576 reserve_bytes=67108864" in below[0]


def test_room_for_a_write_is_what_it_leaves_above_the_reserve() -> None:
    disk = FakeDisk(free=100 << 20)
    guard = space(disk, reserve=64 << 20)
    assert guard.room_for(36 << 20)
    assert not guard.room_for((36 << 20) + 512)
    assert space(disk, reserve=0).room_for(1 << 40)  # no reserve: no limit of ours


def test_a_negative_reserve_is_refused() -> None:
    with pytest.raises(ValueError, match="reserve_bytes"):
        DiskSpace("/data", -1)


def test_the_real_disk_is_measured(tmp_path: Path) -> None:
    guard = DiskSpace(tmp_path, 1)
    st = os.statvfs(tmp_path)
    assert abs(guard.free_bytes() - st.f_bavail * st.f_frsize) < 64 << 20
    assert not guard.low
    assert DiskSpace(tmp_path, guard.free_bytes() + (1 << 40)).low  # 1 TiB more than free
