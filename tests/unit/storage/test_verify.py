"""`Log.verify`: the full check that finds damage recovery does not look for.

Recovery reads only the active segment's tail; a zeroed block in a sealed segment is left for
reads to report. `verify` reads everything and names the lowest offset that does not read back
intact, so a caller can cut there and rebuild. The property: every record below that offset
reads back as written (and `None` means every record does).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from dcl.errors import DclError, InvalidRequest
from dcl.storage import Log, LogConfig
from tests.unit.storage.helpers import flipped

CONFIG = LogConfig(max_store_bytes=600, max_index_bytes=12 * 30)
#: As the Raft log and the commit log are opened: twelve zero bytes are never a record. With
#: empty records allowed, a zeroed frame header found by walking a store (where the index was
#: lost too) is indistinguishable from an empty record.
NO_EMPTY = dataclasses.replace(CONFIG, empty_records=False)


def write_log(directory: Path, data: list[bytes], config: LogConfig = CONFIG) -> None:
    log = Log(directory, config)
    log.append_batch(data)
    log.close()


def zero_block(path: Path, position: int, size: int) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        f.write(bytes(size))


def assert_intact_below(log: Log, data: list[bytes], bad: int | None) -> None:
    end = log.next_offset if bad is None else bad
    for offset in range(log.lowest_offset, end):
        assert log.read(offset) == data[offset]
    if bad is None:
        assert log.read_batch(log.lowest_offset, len(data), 1 << 20) == data[: log.next_offset]


def test_an_undamaged_log_verifies_clean(tmp_path: Path) -> None:
    data = [bytes([i % 251]) * (i % 40) for i in range(200)]
    write_log(tmp_path, data)
    with Log(tmp_path, CONFIG) as log:
        assert log.segment_count > 3
        assert log.verify() is None


def test_a_zeroed_block_in_a_sealed_store_is_found_at_its_first_record(tmp_path: Path) -> None:
    data = [b"%04d" % i * 5 for i in range(100)]  # 20-byte records, 32-byte frames
    write_log(tmp_path, data)
    stores = sorted(tmp_path.glob("*.store"))
    zero_block(stores[1], 40, 50)  # frames 1..2 of the second segment
    with Log(tmp_path, CONFIG) as log:
        base = int(stores[1].stem)
        assert log.verify() == base + 1
        assert_intact_below(log, data, base + 1)


def test_a_zeroed_tail_of_a_sealed_store_is_reported_where_records_go_missing(
    tmp_path: Path,
) -> None:
    data = [b"%04d" % i * 5 for i in range(100)]
    write_log(tmp_path, data)
    stores = sorted(tmp_path.glob("*.store"))
    size = stores[0].stat().st_size
    zero_block(stores[0], size - 40, 40)
    with Log(tmp_path, CONFIG) as log:
        bad = log.verify()
        assert bad is not None and bad < int(stores[1].stem)
        assert_intact_below(log, data, bad)


def test_skipped_sealed_segments_are_those_unchanged_since_their_stamp(tmp_path: Path) -> None:
    data = [b"%04d" % i * 5 for i in range(100)]
    write_log(tmp_path, data)
    with Log(tmp_path, CONFIG) as log:
        stamps = log.sealed_stamps()
        assert len(stamps) == log.segment_count - 1
    stores = sorted(tmp_path.glob("*.store"))
    zero_block(stores[2], 0, 12)  # a write: the stamp changes, so the segment is read again
    with Log(tmp_path, CONFIG) as log:
        assert log.verify(stamps) == int(stores[2].stem)


def test_truncating_a_segment_with_a_broken_tail_makes_it_appendable(tmp_path: Path) -> None:
    data = [b"%04d" % i * 5 for i in range(100)]
    write_log(tmp_path, data)
    stores = sorted(tmp_path.glob("*.store"))
    size = stores[0].stat().st_size
    zero_block(stores[0], size - 20, 20)
    with Log(tmp_path, CONFIG) as log:
        bad = log.verify()
        assert bad is not None
        log.truncate_after(bad - 1)
        assert log.next_offset == bad
        log.append_batch(data[bad:])
        assert log.verify() is None
        assert_intact_below(log, data, None)
    with Log(tmp_path, CONFIG) as log:
        assert log.verify() is None
        assert log.next_offset == len(data)


@pytest.mark.parametrize("seed", range(60))
def test_records_below_the_verified_offset_read_back_as_written(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    data = [rng.randbytes(rng.randrange(1, 50)) for _ in range(rng.randrange(20, 120))]
    write_log(tmp_path, data, NO_EMPTY)
    files = sorted(p for p in tmp_path.iterdir() if p.stat().st_size)
    for _ in range(rng.randrange(1, 4)):
        target = rng.choice(files)
        if rng.random() < 0.5:
            flipped(str(target), rng.randrange(target.stat().st_size))
        else:
            at = rng.randrange(target.stat().st_size)
            zero_block(target, at, rng.randrange(1, 64))
    try:
        log = Log(tmp_path, NO_EMPTY)
    except DclError:
        return  # opening may refuse (a typed DclError; test_damage covers which)
    with log:
        assert_intact_below(log, data, log.verify())


def test_a_log_without_empty_records_refuses_to_store_one(tmp_path: Path) -> None:
    with Log(tmp_path, NO_EMPTY) as log:
        with pytest.raises(InvalidRequest):
            log.append(b"")
        with pytest.raises(InvalidRequest):
            log.append_batch([b"a", b""])
        assert log.next_offset == 0


def test_a_zeroed_header_in_the_active_tail_is_not_taken_for_an_empty_record(
    tmp_path: Path,
) -> None:
    data = [b"%04d" % i * 5 for i in range(10)]  # one segment: the active one
    write_log(tmp_path, data, NO_EMPTY)
    (store,) = tmp_path.glob("*.store")
    (index,) = tmp_path.glob("*.index")
    index.write_bytes(index.read_bytes()[: 12 * 7])  # the index lost its last entries
    zero_block(store, 7 * 32, 12)  # and record 7's header is zeroed
    with Log(tmp_path, NO_EMPTY) as log:
        assert log.next_offset == 7  # cut before the damage: nothing else passes for a record
        assert log.verify() is None
        assert_intact_below(log, data, None)
