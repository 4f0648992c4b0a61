"""Index: mmap of 12-byte entries, grown while open and trimmed on close."""

from __future__ import annotations

from pathlib import Path

from dcl.storage.index import ENTRY, ENTRY_SIZE, Index


def test_file_is_grown_while_open_and_trimmed_on_close(tmp_path: Path) -> None:
    path = tmp_path / "0.index"
    index = Index(path, 12 * 100)
    assert path.stat().st_size == 12 * 100
    for i in range(3):
        index.write(i, i * 20)
    index.close()
    assert path.stat().st_size == 3 * ENTRY_SIZE
    raw = path.read_bytes()
    assert [ENTRY.unpack_from(raw, i * 12) for i in range(3)] == [(0, 0), (1, 20), (2, 40)]


def test_valid_prefix_stops_at_zero_fill(tmp_path: Path) -> None:
    index = Index(tmp_path / "0.index", 12 * 1000)
    for i in range(300):
        index.write(i, i * 13)
    assert index.valid_prefix(store_size=300 * 13) == 300
    index.close()


def test_valid_prefix_drops_entries_pointing_past_the_store(tmp_path: Path) -> None:
    index = Index(tmp_path / "0.index", 12 * 100)
    for i in range(50):
        index.write(i, i * 10)
    assert index.valid_prefix(store_size=200) == 20
    index.close()


def test_valid_prefix_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "0.index"
    path.write_bytes(bytes(range(256)) * 10)
    index = Index(path, 12 * 100)
    assert index.valid_prefix(store_size=10**9) == 0
    index.close()


def test_valid_prefix_is_zero_for_an_empty_store(tmp_path: Path) -> None:
    index = Index(tmp_path / "0.index", 12 * 10)
    index.write(0, 0)
    assert index.valid_prefix(store_size=0) == 0
    index.close()


def test_set_entries_zeroes_stale_entries(tmp_path: Path) -> None:
    path = tmp_path / "0.index"
    index = Index(path, 12 * 20_000)
    for i in range(15_000):
        index.write(i, i)
    index.set_entries(10)
    assert index.entries == 10
    assert index.mm[10 * 12 :].count(0) == len(index.mm) - 10 * 12
    index.close()
    assert path.stat().st_size == 10 * ENTRY_SIZE


def test_reopen_of_trimmed_index_grows_it_again(tmp_path: Path) -> None:
    path = tmp_path / "0.index"
    index = Index(path, 12 * 10)
    index.write(0, 0)
    index.write(1, 5)
    index.close()
    index = Index(path, 12 * 10)
    assert index.capacity == 10
    assert index.valid_prefix(store_size=6) == 2
    index.close()
