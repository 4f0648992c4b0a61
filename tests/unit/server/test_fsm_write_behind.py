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
    """Apply `mib` entries of 1 MiB, letting each write-behind finish before the next."""
    for i in range(mib):
        fsm.apply([Entry(1, first_index + i, EntryType.NORMAL, encode_records_cmd(_MIB))])
        if fsm._behind is not None:
            await fsm._behind


async def test_applied_records_are_fsynced_in_the_background_every_8_mib(
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
        await _apply_mib(fsm, 7)
        assert syncs == [], "fsynced before 8 MiB were applied"
        await _apply_mib(fsm, 25, first_index=9)
        assert len(syncs) == 4, f"{len(syncs)} background fsyncs for 32 MiB"
        assert threading.main_thread().name not in syncs, "fsynced on the event loop"
    finally:
        fsm.close()


async def test_a_checkpoint_racing_a_failing_background_fsync_does_not_vouch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The write-behind's fsync fails (EIO) while a checkpoint is under way. The kernel
    reports the error to one fsync only, so the checkpoint's own fsync would succeed: it must
    wait for the write-behind's outcome and fail, and so must every later one."""
    fsm = LogFsm(tmp_path / "fsm")
    real_sync = fsm.log.sync
    release = threading.Event()
    calls: list[str] = []

    def sync_failing_first() -> None:
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            release.wait(5)
            raise OSError(errno.EIO, "Input/output error")
        real_sync()  # later fsyncs succeed, as Linux reports the error only once

    fsm.log.sync = sync_failing_first  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    try:
        with caplog.at_level("ERROR", logger="dcl.server.replicated"):
            for i in range(9):
                fsm.apply([Entry(1, 2 + i, EntryType.NORMAL, encode_records_cmd(_MIB))])
            for _ in range(500):
                if calls:
                    break
                await asyncio.sleep(0.01)
            assert calls, "no background fsync started"
            checkpoint = loop.run_in_executor(None, fsm.checkpoint)
            for _ in range(500):  # until the checkpoint is under way, waiting on the fsync
                if fsm._checkpoint_lock.locked():
                    break
                await asyncio.sleep(0.01)
            assert fsm._checkpoint_lock.locked(), "the checkpoint did not start"
            release.set()
            with pytest.raises(OSError) as info:
                await checkpoint
            assert info.value.errno == errno.EIO
        assert "write-behind fsync failed" in caplog.text
        with pytest.raises(OSError):
            fsm.checkpoint()
    finally:
        release.set()
        fsm.close()
    reopened = LogFsm(tmp_path / "fsm")
    assert reopened.applied_index == 0, "a checkpoint vouched for records after the failure"
    reopened.close()
