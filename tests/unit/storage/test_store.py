"""Store: framed records in an append-only file, checksummed on read."""

from __future__ import annotations

import os
import random
import threading
import zlib
from pathlib import Path

import pytest

from dcl.errors import CorruptRecord
from dcl.storage.store import BUFFER_LIMIT, HEADER_SIZE, Store, encode_record
from tests.unit.storage.helpers import flipped


def test_append_returns_bytes_written_and_position(tmp_path: Path) -> None:
    store = Store(tmp_path / "0.store")
    assert store.append(b"hello") == (HEADER_SIZE + 5, 0)
    assert store.append(b"") == (HEADER_SIZE, HEADER_SIZE + 5)
    assert store.append(b"world") == (HEADER_SIZE + 5, 2 * HEADER_SIZE + 5)
    assert store.read(0) == b"hello"
    assert store.read(HEADER_SIZE + 5) == b""
    assert store.read(2 * HEADER_SIZE + 5) == b"world"
    store.close()


def test_frame_layout_is_length_crc_payload(tmp_path: Path) -> None:
    store = Store(tmp_path / "0.store")
    store.append(b"abc")
    store.close()
    raw = (tmp_path / "0.store").read_bytes()
    assert raw[:8] == (3).to_bytes(8, "big")
    assert raw == encode_record(b"abc")
    assert raw[8:12] == zlib.crc32(b"abc").to_bytes(4, "big")


def test_writes_are_buffered_until_flush(tmp_path: Path) -> None:
    path = tmp_path / "0.store"
    store = Store(path)
    store.append(b"x" * 100)
    assert path.stat().st_size == 0
    assert store.size == HEADER_SIZE + 100
    store.flush()
    assert path.stat().st_size == HEADER_SIZE + 100
    store.close()


def test_read_sees_unflushed_appends(tmp_path: Path) -> None:
    store = Store(tmp_path / "0.store")
    _, position = store.append(b"fresh")
    assert store.read(position) == b"fresh"
    store.close()


def test_reopen_keeps_records(tmp_path: Path) -> None:
    store = Store(tmp_path / "0.store")
    positions = [store.append(bytes([i]) * i)[1] for i in range(20)]
    store.sync()
    store.close()
    store = Store(tmp_path / "0.store")
    assert [store.read(p) for p in positions] == [bytes([i]) * i for i in range(20)]
    store.close()


def test_corrupt_payload_byte_raises_corrupt_record_naming_file_and_position(
    tmp_path: Path,
) -> None:
    path = tmp_path / "0.store"
    store = Store(path)
    store.append(b"a" * 10)
    _, position = store.append(b"b" * 10)
    store.append(b"c" * 10)
    store.close()
    flipped(str(path), position + HEADER_SIZE + 3)
    store = Store(path)
    assert store.read(0) == b"a" * 10
    with pytest.raises(CorruptRecord) as info:
        store.read(position)
    assert info.value.path == str(path)
    assert info.value.position == position
    store.close()


def test_truncated_record_raises_corrupt_record(tmp_path: Path) -> None:
    path = tmp_path / "0.store"
    store = Store(path)
    store.append(b"z" * 50)
    store.close()
    os.truncate(path, 30)
    store = Store(path)
    with pytest.raises(CorruptRecord):
        store.read(0)
    store.close()


def test_sync_from_another_thread_while_appending_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "0.store"
    store = Store(path)
    stop = threading.Event()

    def syncer() -> None:
        while not stop.is_set():
            store.sync()

    thread = threading.Thread(target=syncer)
    thread.start()
    positions = [store.append(i.to_bytes(4, "big") * 8)[1] for i in range(5000)]
    stop.set()
    thread.join()
    store.close()
    store = Store(path)
    assert [store.read(p) for p in positions] == [i.to_bytes(4, "big") * 8 for i in range(5000)]
    assert store.size == 5000 * (HEADER_SIZE + 32)
    store.close()


def test_large_and_small_appends_interleave_in_order(tmp_path: Path) -> None:
    path = tmp_path / "0.store"
    store = Store(path)
    rng = random.Random(11)
    payloads = [rng.randbytes(rng.choice([10, 1000, BUFFER_LIMIT + 5])) for _ in range(40)]
    positions = [store.append(p)[1] for p in payloads]
    assert [store.read(p) for p in positions] == payloads
    store.close()
    assert path.stat().st_size == sum(HEADER_SIZE + len(p) for p in payloads)
    store = Store(path)
    assert [store.read(p) for p in positions] == payloads
    store.close()
