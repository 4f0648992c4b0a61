"""The commit log is fsynced behind the applies, in an executor thread.

Applies do not fsync (the Raft log is the durable copy), so without write-behind a segment
roll fsyncs a whole segment's dirty bytes on the event loop (39 ms for 64 MiB here) and a
checkpoint as much. A write-behind fsync that fails must not be forgotten: after a failed
fsync the kernel may have dropped the pages it could not write, and a later fsync can then
succeed without them, so no checkpoint may vouch for those records.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from pathlib import Path

import pytest

from dcl.raft.types import Entry, EntryType
from dcl.server.replicated import LogFsm, encode_records_cmd

_MIB = [b"x" * 1024] * 1024


async def _apply_mib(fsm: LogFsm, mib: int, first_index: int = 2) -> None:
    for i in range(mib):
        fsm.apply([Entry(1, first_index + i, EntryType.NORMAL, encode_records_cmd(_MIB))])
        await asyncio.sleep(0.002)  # let the executor run, as the node's loop does


async def test_applied_records_are_fsynced_in_the_background_every_few_mib(
    tmp_path: Path,
) -> None:
    fsm = LogFsm(tmp_path / "fsm")
    syncs: list[str] = []
    real_sync = fsm.log.sync

    def recorded_sync() -> None:
        syncs.append(threading.current_thread().name)
        real_sync()

    fsm.log.sync = recorded_sync  # type: ignore[method-assign]
    try:
        await _apply_mib(fsm, 4)
        assert syncs == [], "fsynced before 8 MiB were applied"
        await _apply_mib(fsm, 28, first_index=6)
        await asyncio.sleep(0.2)
        assert 3 <= len(syncs) <= 4, f"{len(syncs)} background fsyncs for 32 MiB"
        assert threading.main_thread().name not in syncs, "fsynced on the event loop"
    finally:
        fsm.close()


async def test_a_failed_background_fsync_fails_every_later_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fsm = LogFsm(tmp_path / "fsm")
    real_sync = fsm.log.sync
    failures = [OSError(errno.EIO, "Input/output error")]

    def sync_failing_once() -> None:
        if failures:
            raise failures.pop()
        real_sync()  # the next fsync succeeds, as Linux reports an error only once

    fsm.log.sync = sync_failing_once  # type: ignore[method-assign]
    try:
        with caplog.at_level("ERROR", logger="dcl.server.replicated"):
            await _apply_mib(fsm, 9)
            await asyncio.sleep(0.2)
        assert not failures, "no background fsync ran"
        assert "write-behind fsync failed" in caplog.text
        for _ in range(2):
            with pytest.raises(OSError) as info:
                fsm.checkpoint()
            assert info.value.errno == errno.EIO
    finally:
        fsm.close()
    reopened = LogFsm(tmp_path / "fsm")
    assert reopened.applied_index == 0, "a checkpoint vouched for records after the failure"
    reopened.close()
