"""Segment: a store and index pair named by base offset; full at either limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from dcl.errors import OffsetOutOfRange
from dcl.storage.segment import Segment, parse_segment_file, segment_name


def test_files_are_named_by_zero_padded_base_offset(tmp_path: Path) -> None:
    segment = Segment(tmp_path, 42, 1024, 120)
    segment.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00000000000000000042.index",
        "00000000000000000042.store",
    ]
    assert parse_segment_file(segment_name(42) + ".store") == (42, ".store")
    assert parse_segment_file("42.index") is None  # not canonical: ignored, never opened
    assert parse_segment_file("42.store.tmp") is None
    assert parse_segment_file("notes.txt") is None


def test_append_assigns_offsets_from_base(tmp_path: Path) -> None:
    segment = Segment(tmp_path, 100, 1024, 120)
    assert [segment.append(b"r%d" % i) for i in range(3)] == [100, 101, 102]
    assert segment.read(101) == b"r1"
    assert segment.next_offset == 103
    with pytest.raises(OffsetOutOfRange):
        segment.read(103)
    with pytest.raises(OffsetOutOfRange):
        segment.read(99)
    segment.close()


def test_full_when_index_reaches_its_maximum(tmp_path: Path) -> None:
    segment = Segment(tmp_path, 0, 10**6, 12 * 3)
    assert segment.append_batch([b"a"] * 5, 0) == 3
    assert segment.is_full()
    segment.close()


def test_full_when_store_reaches_its_maximum(tmp_path: Path) -> None:
    segment = Segment(tmp_path, 0, 100, 12 * 100)
    # Each frame is 12 + 20 bytes: the fourth record starts at 96 < 100, so it still fits.
    assert segment.append_batch([b"x" * 20] * 10, 0) == 4
    assert segment.is_full()
    segment.close()


def test_reopen_recovers_offsets_and_records(tmp_path: Path) -> None:
    segment = Segment(tmp_path, 7, 10**6, 12 * 100)
    segment.append_batch([b"v%d" % i for i in range(10)], 0)
    segment.sync()
    segment.close()
    segment = Segment(tmp_path, 7, 10**6, 12 * 100)
    assert segment.next_offset == 17
    assert segment.read(16) == b"v9"
    segment.close()
