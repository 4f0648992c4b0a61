"""Log: a directory of segments; append, read, truncate at both ends, recover."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from dcl.errors import CorruptRecord, InvalidRequest, OffsetOutOfRange
from dcl.storage import Log, LogClosed, LogConfig, LogInUse, iter_records
from dcl.storage.store import HEADER_SIZE
from tests.unit.storage.helpers import ReleaseWatch, crash, flipped

SMALL = LogConfig(max_store_bytes=256, max_index_bytes=12 * 8)


def store_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.store"))


def index_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.index"))


def values(count: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randrange(0, 60)) for _ in range(count)]


def test_empty_log_has_highest_below_lowest(tmp_path: Path) -> None:
    log = Log(tmp_path)
    assert (log.lowest_offset, log.highest_offset, log.next_offset) == (0, -1, 0)
    log.close()


def test_append_and_read_back(tmp_path: Path) -> None:
    log = Log(tmp_path)
    assert log.append(b"first") == 0
    assert log.append(b"second") == 1
    assert log.read(0) == b"first"
    assert log.read(1) == b"second"
    assert log.highest_offset == 1
    log.close()


def test_fresh_log_starts_at_initial_offset(tmp_path: Path) -> None:
    log = Log(tmp_path, LogConfig(initial_offset=1000))
    assert log.append(b"a") == 1000
    assert log.lowest_offset == 1000
    log.close()
    # An existing log ignores initial_offset.
    log = Log(tmp_path, LogConfig(initial_offset=5))
    assert (log.lowest_offset, log.next_offset) == (1000, 1001)
    log.close()


def test_append_batch_returns_first_of_consecutive_offsets(tmp_path: Path) -> None:
    log = Log(tmp_path, SMALL)
    log.append(b"zero")
    data = values(50)
    assert log.append_batch(data) == 1
    assert log.next_offset == 51
    assert [log.read(1 + i) for i in range(50)] == data
    assert log.append_batch([]) == 51
    log.close()


def test_segments_roll_and_survive_reopen(tmp_path: Path) -> None:
    log = Log(tmp_path, SMALL)
    data = values(100)
    for value in data[:40]:
        log.append(value)
    log.append_batch(data[40:])
    assert log.segment_count > 5
    assert len(store_files(tmp_path)) == log.segment_count
    log.close()
    log = Log(tmp_path, SMALL)
    assert log.next_offset == 100
    assert [log.read(i) for i in range(100)] == data
    log.close()


def test_index_files_are_trimmed_on_close(tmp_path: Path) -> None:
    log = Log(tmp_path, SMALL)
    log.append_batch(values(20))
    log.close()
    assert sum(p.stat().st_size for p in index_files(tmp_path)) == 20 * 12


def test_reading_missing_offsets_raises_offset_out_of_range(tmp_path: Path) -> None:
    log = Log(tmp_path, LogConfig(initial_offset=10))
    log.append_batch([b"a", b"b"])
    for offset in (9, 12, -1, 10**12):
        with pytest.raises(OffsetOutOfRange) as info:
            log.read(offset)
        assert (info.value.offset, info.value.lowest, info.value.next_offset) == (offset, 10, 12)
    log.close()


def test_read_batch_respects_record_and_byte_limits(tmp_path: Path) -> None:
    log = Log(tmp_path, SMALL)
    data = [bytes([i]) * 10 for i in range(60)]
    log.append_batch(data)
    assert log.read_batch(5, 7, 10**6) == data[5:12]
    assert log.read_batch(5, 100, 35) == data[5:8]
    assert log.read_batch(0, 1000, 10**9) == data
    assert log.read_batch(59, 10, 100) == data[59:]
    log.close()


def test_read_batch_returns_one_oversized_record(tmp_path: Path) -> None:
    log = Log(tmp_path)
    log.append_batch([b"x" * 1000, b"y"])
    assert log.read_batch(0, 10, 10) == [b"x" * 1000]
    log.close()


def test_read_batch_rejects_bad_arguments(tmp_path: Path) -> None:
    log = Log(tmp_path)
    log.append(b"a")
    with pytest.raises(InvalidRequest):
        log.read_batch(0, 0, 10)
    with pytest.raises(OffsetOutOfRange):
        log.read_batch(1, 10, 10)
    log.close()


def test_truncate_before_drops_only_whole_segments(tmp_path: Path) -> None:
    log = Log(tmp_path, SMALL)
    data = values(100)
    log.append_batch(data)
    segments = log.segment_count
    log.truncate_before(50)
    assert 0 < log.lowest_offset <= 50
    assert log.segment_count < segments
    assert [log.read(i) for i in range(log.lowest_offset, 100)] == data[log.lowest_offset :]
    with pytest.raises(OffsetOutOfRange):
        log.read(log.lowest_offset - 1)
    lowest = log.lowest_offset
    log.close()
    log = Log(tmp_path, SMALL)
    assert (log.lowest_offset, log.next_offset) == (lowest, 100)
    log.close()


def test_truncate_before_everything_leaves_an_empty_log_at_next_offset(tmp_path: Path) -> None:
    log = Log(tmp_path, SMALL)
    log.append_batch(values(30))
    log.truncate_before(1000)
    assert (log.lowest_offset, log.highest_offset, log.next_offset) == (30, 29, 30)
    assert log.append(b"more") == 30
    log.close()


def test_truncate_after_cuts_inside_a_segment_and_across_segments(tmp_path: Path) -> None:
    log = Log(tmp_path, SMALL)
    data = values(100)
    log.append_batch(data)
    log.truncate_after(73)
    assert log.highest_offset == 73
    with pytest.raises(OffsetOutOfRange):
        log.read(74)
    assert log.append(b"new") == 74
    log.truncate_after(10)
    assert log.next_offset == 11
    assert log.read_batch(0, 100, 10**6) == data[:11]
    log.close()
    log = Log(tmp_path, SMALL)
    assert log.next_offset == 11
    assert [log.read(i) for i in range(11)] == data[:11]
    log.close()


def test_truncate_after_lowest_minus_one_empties_the_log(tmp_path: Path) -> None:
    log = Log(tmp_path, LogConfig(max_store_bytes=256, max_index_bytes=96, initial_offset=5))
    log.append_batch(values(40))
    log.truncate_after(4)
    assert (log.lowest_offset, log.next_offset) == (5, 5)
    with pytest.raises(OffsetOutOfRange):
        log.truncate_after(2)
    log.close()


def test_reader_streams_every_record_as_of_its_creation(tmp_path: Path) -> None:
    log = Log(tmp_path, SMALL)
    data = values(80)
    log.append_batch(data)
    reader = log.reader()
    log.append(b"after the snapshot")
    log.truncate_before(60)
    assert list(iter_records(reader)) == data
    reader.close()
    log.close()


def test_reader_bytes_are_the_store_bytes(tmp_path: Path) -> None:
    log = Log(tmp_path, SMALL)
    log.append_batch(values(30))
    with log.reader() as reader:
        streamed = reader.read()
    log.close()
    assert streamed == b"".join(p.read_bytes() for p in store_files(tmp_path))


def test_reset_starts_fresh_at_the_given_offset(tmp_path: Path) -> None:
    log = Log(tmp_path, SMALL)
    log.append_batch(values(50))
    log.reset(500)
    assert (log.lowest_offset, log.next_offset) == (500, 500)
    assert log.append(b"x") == 500
    assert len(store_files(tmp_path)) == 1
    log.close()


def test_remove_deletes_the_directory(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    log = Log(directory, SMALL)
    log.append_batch(values(50))
    log.remove()
    assert not directory.exists()


def test_sync_in_a_thread_while_appending_keeps_every_record(tmp_path: Path) -> None:
    log = Log(tmp_path, LogConfig(max_store_bytes=4096, max_index_bytes=12 * 1000))
    stop = threading.Event()

    def group_commit() -> None:
        while not stop.is_set():
            log.sync()

    thread = threading.Thread(target=group_commit)
    thread.start()
    data = values(3000, seed=7)
    for i in range(0, 3000, 10):
        log.append_batch(data[i : i + 10])
    stop.set()
    thread.join()
    log.sync()
    crash(log)
    log = Log(tmp_path, LogConfig(max_store_bytes=4096, max_index_bytes=12 * 1000))
    assert log.read_batch(0, 10_000, 10**9) == data
    log.close()


def test_single_appends_read_back_at_once_while_another_thread_syncs(tmp_path: Path) -> None:
    config = LogConfig(max_store_bytes=8192, max_index_bytes=12 * 1000)
    log = Log(tmp_path, config)
    stop = threading.Event()

    def group_commit() -> None:
        while not stop.is_set():
            log.sync()

    thread = threading.Thread(target=group_commit)
    thread.start()
    data = values(4000, seed=9)
    try:
        for value in data:
            offset = log.append(value)
            assert log.read(offset) == value
    finally:
        stop.set()
        thread.join()
    log.close()
    log = Log(tmp_path, config)
    assert log.read_batch(0, 10_000, 10**9) == data
    log.close()


# -- crash recovery and bad files ------------------------------------------------------------


def test_crash_loses_only_unflushed_records(tmp_path: Path) -> None:
    log = Log(tmp_path, SMALL)
    data = values(30)
    log.append_batch(data[:20])
    log.flush()
    log.append_batch(data[20:])
    crash(log)
    assert any(p.stat().st_size == 96 for p in index_files(tmp_path))  # left oversized
    log = Log(tmp_path, SMALL)
    assert log.next_offset in range(20, 31)
    assert [log.read(i) for i in range(log.next_offset)] == data[: log.next_offset]
    assert log.append(b"after") == log.highest_offset
    log.close()


def test_torn_store_tail_is_trimmed_on_open(tmp_path: Path) -> None:
    log = Log(tmp_path)
    data = [bytes([i]) * 100 for i in range(10)]
    log.append_batch(data)
    log.flush()
    crash(log)
    (store,) = store_files(tmp_path)
    os.truncate(store, 5 * (HEADER_SIZE + 100) + 37)
    log = Log(tmp_path)
    assert log.next_offset == 5
    assert store.stat().st_size == 5 * (HEADER_SIZE + 100)
    assert log.append(b"next") == 5
    assert log.read_batch(0, 10, 10**6) == [*data[:5], b"next"]
    log.close()


def test_corrupt_byte_in_a_synced_segment_is_reported_not_trimmed(tmp_path: Path) -> None:
    log = Log(tmp_path)
    data = [bytes([i]) * 100 for i in range(10)]
    log.append_batch(data)
    log.close()
    (store,) = store_files(tmp_path)
    position = 4 * (HEADER_SIZE + 100)
    flipped(str(store), position + HEADER_SIZE + 50)
    log = Log(tmp_path)
    assert log.next_offset == 10
    assert log.read(3) == data[3]
    assert log.read(5) == data[5]
    with pytest.raises(CorruptRecord) as info:
        log.read(4)
    assert (info.value.path, info.value.position) == (str(store), position)
    with pytest.raises(CorruptRecord):
        log.read_batch(2, 5, 10**6)
    log.close()


def test_corrupt_length_field_is_reported(tmp_path: Path) -> None:
    log = Log(tmp_path)
    log.append_batch([b"a" * 10, b"b" * 10, b"c" * 10])
    log.close()
    (store,) = store_files(tmp_path)
    flipped(str(store), HEADER_SIZE + 10 + 2)  # inside the second record's length
    log = Log(tmp_path)
    assert log.read(0) == b"a" * 10
    with pytest.raises(CorruptRecord):
        log.read(1)
    with pytest.raises(CorruptRecord):
        log.read_batch(1, 5, 10**6)
    log.close()


def test_corrupt_middle_record_found_while_rebuilding_the_index_is_kept(tmp_path: Path) -> None:
    log = Log(tmp_path)
    log.append_batch([b"a" * 10, b"b" * 10, b"c" * 10])
    log.close()
    (store,) = store_files(tmp_path)
    (index,) = index_files(tmp_path)
    index.unlink()
    flipped(str(store), HEADER_SIZE + 10 + HEADER_SIZE + 4)
    log = Log(tmp_path)
    assert log.next_offset == 3
    with pytest.raises(CorruptRecord):
        log.read(1)
    assert log.read(2) == b"c" * 10
    log.close()


@pytest.mark.parametrize("damage", ["missing", "garbage", "empty", "zeros"])
def test_bad_index_is_rebuilt_from_the_store(tmp_path: Path, damage: str) -> None:
    config = LogConfig(max_store_bytes=1000, max_index_bytes=12 * 50)
    log = Log(tmp_path, config)
    data = values(120, seed=3)
    log.append_batch(data)
    log.close()
    rng = random.Random(5)
    for index in index_files(tmp_path):
        if damage == "missing":
            index.unlink()
        elif damage == "garbage":
            index.write_bytes(rng.randbytes(index.stat().st_size + 7))
        elif damage == "empty":
            index.write_bytes(b"")
        else:
            index.write_bytes(bytes(600))
    log = Log(tmp_path, config)
    assert log.next_offset == 120
    assert log.read_batch(0, 1000, 10**9) == data
    log.close()


def test_rebuilt_index_of_a_closed_segment_keeps_trailing_empty_records(tmp_path: Path) -> None:
    config = LogConfig(max_store_bytes=100, max_index_bytes=12 * 100)
    log = Log(tmp_path, config)
    data = [b"x" * 60, b"", b"", b"", b"y" * 60]
    log.append_batch(data)
    assert log.segment_count == 2
    log.close()
    for index in index_files(tmp_path):
        index.unlink()
    log = Log(tmp_path, config)
    assert log.read_batch(0, 100, 1000) == data
    log.close()


def test_orphan_index_and_foreign_files_are_ignored(tmp_path: Path) -> None:
    log = Log(tmp_path, SMALL)
    log.append_batch(values(10))
    log.close()
    (tmp_path / "00000000000000099999.index").write_bytes(bytes(24))
    (tmp_path / "README").write_text("not a segment")
    log = Log(tmp_path, SMALL)
    assert log.next_offset == 10
    assert not (tmp_path / "00000000000000099999.index").exists()
    log.close()


def test_missing_records_in_a_closed_segment_raise_corrupt_record(tmp_path: Path) -> None:
    log = Log(tmp_path, SMALL)
    data = [b"r" * 20] * 40
    log.append_batch(data)
    log.close()
    first = store_files(tmp_path)[0]
    os.truncate(first, first.stat().st_size - 5)
    log = Log(tmp_path, SMALL)
    assert log.next_offset == 40
    assert log.read(0) == data[0]
    broken = next(o for o in range(40) if o + 1 == log._segments[1].base_offset)
    with pytest.raises(CorruptRecord) as info:
        log.read(broken)
    assert info.value.path == str(first)
    log.close()


def test_config_rejects_index_size_not_a_multiple_of_an_entry() -> None:
    with pytest.raises(ValueError):
        LogConfig(max_index_bytes=100)
    with pytest.raises(ValueError):
        LogConfig(max_store_bytes=0)
    with pytest.raises(ValueError):
        LogConfig(initial_offset=-1)


def test_closed_log_refuses_use(tmp_path: Path) -> None:
    log = Log(tmp_path)
    log.append(b"a")
    log.close()
    with pytest.raises(LogClosed):
        log.read(0)
    with pytest.raises(LogClosed):
        log.append(b"b")
    log.close()  # idempotent


def test_flush_makes_records_visible_to_other_file_descriptors(tmp_path: Path) -> None:
    log = Log(tmp_path)
    log.append_batch([bytearray(b"from a bytearray"), memoryview(b"from a view")])
    (store,) = store_files(tmp_path)
    assert store.read_bytes() == b""
    log.flush()
    with open(store, "rb") as f:
        assert list(iter_records(f)) == [b"from a bytearray", b"from a view"]
    log.close()


def test_a_directory_can_be_opened_by_one_log_at_a_time(tmp_path: Path) -> None:
    log = Log(tmp_path)
    with pytest.raises(LogInUse):
        Log(tmp_path)
    log.close()
    Log(tmp_path).close()


def test_closed_segments_are_synced_when_the_log_rolls(tmp_path: Path) -> None:
    log = Log(tmp_path, SMALL)
    data = values(60)
    log.append_batch(data)
    rolled_into = log._segments[-1].base_offset
    crash(log)
    log = Log(tmp_path, SMALL)
    assert log.next_offset >= rolled_into
    assert [log.read(i) for i in range(rolled_into)] == data[:rolled_into]
    log.close()


def test_removed_segments_are_freed_in_the_background_not_by_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compaction runs on the event loop, and freeing a deleted 64 MiB file takes ~16 ms
    inside its last close: the segments' names go at once, and their descriptors are
    closed by the background closer, never by the thread that compacted."""
    log = Log(tmp_path, SMALL)
    data = values(100)
    log.append_batch(data)
    watch = ReleaseWatch(tmp_path, monkeypatch)
    before = len(store_files(tmp_path))
    log.truncate_before(50)
    assert len(store_files(tmp_path)) < before and len(index_files(tmp_path)) < before
    watch.wait_all_closed()
    assert watch.closed_by, "no deleted segment file was closed"
    assert set(watch.closed_by) == {"dcl-closer"}, f"closed by {set(watch.closed_by)}"
    assert [log.read(i) for i in range(log.lowest_offset, 100)] == data[log.lowest_offset :]
    log.close()
