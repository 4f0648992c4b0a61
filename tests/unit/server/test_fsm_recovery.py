"""LogFsm on damaged files: the commit log comes back whole from the node's own Raft state.

Each test builds a node's data the way the driver does (append + fsync to the Raft log, apply
to the FSM, checkpoint, snapshot and compact now and then), stops it, damages the files on
disk, reopens, and compares the commit log with the one before the damage: every offset, every
stored byte. Real files, no mocks; the driver's part on restart (restore the Raft snapshot if
the FSM is behind it, re-apply committed entries) is done by `restart`, as RaftDriver does.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dcl.api.log.v1 import log_pb2
from dcl.errors import CorruptRecord
from dcl.raft.storage import RaftStorage
from dcl.raft.types import Entry, EntryType, HardState, Snapshot, SnapshotMeta
from dcl.server.replicated import LogFsm, encode_address_cmd, encode_records_cmd
from dcl.storage import LogConfig

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def tmp_path(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs where there is one: the same files and system calls, but these
    tests' hundreds of fsyncs then cost nothing (tests/integration runs on the real disk)."""
    if not os.path.isdir("/dev/shm"):
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(prefix="dcl-fsm-", dir="/dev/shm"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)

#: Small segments so both logs roll many times and compaction drops whole Raft segments.
SEGMENT = 2048
TERM = 3


@dataclass
class NodeFiles:
    root: Path

    @property
    def commitlog(self) -> Path:
        return self.root / "fsm" / "commitlog"

    def stores(self) -> list[Path]:
        return sorted(self.commitlog.glob("*.store"))

    def indexes(self) -> list[Path]:
        return sorted(self.commitlog.glob("*.index"))

    def raft_stores(self) -> list[Path]:
        return sorted((self.root / "raft" / "log").glob("*.store"))


def open_node(root: Path) -> tuple[LogFsm, RaftStorage]:
    fsm = LogFsm(root / "fsm", LogConfig(max_store_bytes=SEGMENT))
    # No log kept below the snapshot: compaction must really drop Raft segments here.
    storage = RaftStorage(root / "raft", max_segment_bytes=SEGMENT, retain_bytes=0)
    return fsm, storage


def restart(root: Path) -> tuple[LogFsm, RaftStorage]:
    """Open as the agent does (FSM, Raft storage, FSM.recover), then do the driver's part."""
    fsm, storage = open_node(root)
    fsm.recover(storage)
    replay(fsm, storage)
    return fsm, storage


def replay(fsm: LogFsm, storage: RaftStorage) -> None:
    """RaftDriver on restart: restore a newer snapshot, then apply committed entries."""
    hard_state, snapshot, _ = storage.load()
    if snapshot is not None and snapshot.meta.index > fsm.applied_index:
        fsm.restore(snapshot)
    fsm.apply(storage.entries(fsm.applied_index + 1, hard_state.commit + 1))


def write_node(root: Path, seed: int, *, entries: int = 60, snapshot_every: int = 0) -> None:
    """Entries of 1..12 records (some address entries between), applied and committed."""
    rng = random.Random(seed)
    fsm, storage = open_node(root)
    fsm.recover(storage)
    batch: list[Entry] = []
    first = storage.last_index + 1
    last = storage.last_index + entries
    for index in range(first, last + 1):
        if index % 17 == 0:
            data = encode_address_cmd(f"node-{index}", f"127.0.0.1:{index}")
        else:
            data = encode_records_cmd(
                [rng.randbytes(rng.randrange(1, 60)) for _ in range(rng.randrange(1, 13))])
        batch.append(Entry(TERM, index, EntryType.NORMAL, data))
        if index % 10 and index != last:
            continue
        storage.append(batch)  # group commit: persist before apply, as the driver does
        storage.sync()
        fsm.apply(batch)
        batch = []
        if snapshot_every and index % snapshot_every == 0:
            fsm.checkpoint()  # as RaftDriver._maybe_snapshot: FSM durable, then compact
            meta = SnapshotMeta(index, TERM, frozenset({"n"}))
            storage.save_snapshot(Snapshot(meta, fsm.snapshot_data()))
    storage.set_hard_state(HardState(TERM, "n", last))
    fsm.checkpoint()
    fsm.close()
    storage.close()


def read_all(fsm: LogFsm) -> list[bytes]:
    log = fsm.log
    return log.read_batch(log.lowest_offset, 1 << 20, 1 << 30) if log.next_offset else []


def snapshot_of(root: Path) -> tuple[list[bytes], int, dict[str, str]]:
    """Every stored record, the applied index and the address book of a stopped node."""
    fsm, storage = restart(root)
    try:
        assert fsm.log.verify() is None
        return read_all(fsm), fsm.applied_index, dict(fsm.addresses)
    finally:
        stop(fsm, storage)


def stop(fsm: LogFsm, storage: RaftStorage) -> None:
    """As the agent stops: checkpoint the FSM, then close both."""
    fsm.checkpoint()
    fsm.close()
    storage.close()


def assert_same_as(root: Path, expected: tuple[list[bytes], int, dict[str, str]]) -> None:
    records, applied, addresses = expected
    fsm, storage = restart(root)
    try:
        got = read_all(fsm)
        assert len(got) == len(records)
        for offset, (a, b) in enumerate(zip(got, records, strict=True)):
            assert a == b, f"offset {offset} differs"
            assert log_pb2.Record.FromString(a).offset == offset
        assert fsm.applied_index == applied
        assert fsm.addresses == addresses
        assert fsm.log.verify() is None
    finally:
        stop(fsm, storage)
    # And a second restart finds nothing to repair (the repair was made durable).
    assert snapshot_of(root) == expected


def cut(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def zero(path: Path, position: int, size: int) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        f.write(bytes(size))


# -- fault 1: the commit log's store tail cut at a random byte -------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_a_cut_commit_log_tail_is_rebuilt_from_the_raft_log(
    tmp_path: Path, seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    write_node(tmp_path, seed)
    expected = snapshot_of(tmp_path)
    files = NodeFiles(tmp_path)
    active = files.stores()[-1]
    cut(active, random.Random(seed).randrange(active.stat().st_size))
    assert_same_as(tmp_path, expected)
    assert "source=raft log from index" in caplog.text, "only the lost entries re-applied"


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("entries", [80, 85])  # the snapshot is at, or before, the checkpoint
def test_a_cut_below_the_compacted_raft_log_is_rebuilt_from_the_raft_snapshot(
    tmp_path: Path, seed: int, entries: int, caplog: pytest.LogCaptureFixture
) -> None:
    write_node(tmp_path, seed, entries=entries, snapshot_every=10)
    files = NodeFiles(tmp_path)
    assert int(files.raft_stores()[0].stem) > 1, "the raft log was compacted"
    expected = snapshot_of(tmp_path)
    # Lose every commit-log segment but the first, and most of that one: the records lost
    # come before the Raft log's first entry, so only the snapshot holds them.
    stores = files.stores()
    for path in stores[1:]:
        path.unlink()
    cut(stores[0], random.Random(seed).randrange(stores[0].stat().st_size // 2))
    assert_same_as(tmp_path, expected)
    assert "source=raft snapshot at index 80" in caplog.text


def test_a_raft_snapshot_newer_than_the_checkpoint_is_restored_not_contradicted(
    tmp_path: Path,
) -> None:
    """A crash after a snapshot was installed but before the FSM recorded it, then damage."""
    write_node(tmp_path, 8, entries=70, snapshot_every=10)
    checkpoint = tmp_path / "fsm" / "fsm.checkpoint"
    older = checkpoint.read_bytes()
    write_node(tmp_path, 9, entries=15, snapshot_every=10)  # raft snapshot at 80
    expected = snapshot_of(tmp_path)
    checkpoint.write_bytes(older)  # the FSM says: applied 70
    for path in NodeFiles(tmp_path).stores()[1:]:
        path.unlink()
    assert_same_as(tmp_path, expected)


def test_without_recover_the_driver_replays_everything(tmp_path: Path) -> None:
    write_node(tmp_path, 1)
    expected = snapshot_of(tmp_path)
    active = NodeFiles(tmp_path).stores()[-1]
    cut(active, active.stat().st_size // 2)
    fsm, storage = open_node(tmp_path)
    assert fsm.applied_index == 0, "behind its checkpoint, the FSM vouches for nothing"
    fsm.checkpoint()  # must not record the inconsistent state
    replay(fsm, storage)
    assert (read_all(fsm), fsm.applied_index, fsm.addresses) == expected
    fsm.close()
    storage.close()


# -- fault 2: an index file left oversized (zero-filled tail) ----------------------------------


def test_oversized_zero_filled_indexes_change_nothing(tmp_path: Path) -> None:
    write_node(tmp_path, 2)
    expected = snapshot_of(tmp_path)
    for index in NodeFiles(tmp_path).indexes():
        with open(index, "ab") as f:
            f.write(bytes(12 * 1000 + 5))
    assert_same_as(tmp_path, expected)


# -- fault 3: a zeroed block in a sealed (closed) segment --------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("compacted", [False, True])
def test_a_zeroed_block_in_a_sealed_store_is_found_at_open_and_rebuilt(
    tmp_path: Path, seed: int, compacted: bool
) -> None:
    write_node(tmp_path, seed, entries=80, snapshot_every=10 if compacted else 0)
    expected = snapshot_of(tmp_path)
    rng = random.Random(seed)
    sealed = NodeFiles(tmp_path).stores()[:-1]
    target = rng.choice(sealed)
    size = target.stat().st_size
    zero(target, rng.randrange(size), rng.randrange(1, 512))
    assert_same_as(tmp_path, expected)


def test_a_zeroed_block_in_a_sealed_index_is_rebuilt_from_its_store(tmp_path: Path) -> None:
    write_node(tmp_path, 3)
    expected = snapshot_of(tmp_path)
    index = NodeFiles(tmp_path).indexes()[1]
    zero(index, 24, 48)
    assert_same_as(tmp_path, expected)


def test_damage_found_at_open_is_verified_again_after_the_repair(tmp_path: Path) -> None:
    """The verified-segment stamps skip only files unchanged since they were verified."""
    write_node(tmp_path, 4)
    expected = snapshot_of(tmp_path)  # verifies and stamps every sealed segment
    target = NodeFiles(tmp_path).stores()[0]
    zero(target, 100, 40)  # after the stamps were taken
    assert_same_as(tmp_path, expected)


@pytest.mark.parametrize("snapshot_every", [0, 10])
def test_missing_first_segments_are_rebuilt_not_skipped(
    tmp_path: Path, snapshot_every: int
) -> None:
    write_node(tmp_path, 11, entries=80, snapshot_every=snapshot_every)
    expected = snapshot_of(tmp_path)
    files = NodeFiles(tmp_path)
    for path in files.stores()[:2] + files.indexes()[:2]:
        path.unlink()  # the log would otherwise open starting at the third segment's base
    assert_same_as(tmp_path, expected)


def test_damage_found_while_running_is_verified_and_rebuilt_at_the_next_open(
    tmp_path: Path,
) -> None:
    """Bit rot leaves a file's stamp alone (no write through the file system; here the
    write's new ctime would give it away, so the test checks the stamps are dropped)."""
    write_node(tmp_path, 12)
    expected = snapshot_of(tmp_path)
    stamps = tmp_path / "fsm" / "fsm.verified"
    fsm, storage = restart(tmp_path)
    assert stamps.exists()
    zero(NodeFiles(tmp_path).stores()[1], 50, 30)
    with pytest.raises(CorruptRecord):
        fsm.snapshot_data()
    assert not stamps.exists(), "the next open must verify every segment"
    stop(fsm, storage)
    assert_same_as(tmp_path, expected)


def test_an_unreadable_checkpoint_rebuilds_the_whole_commit_log(tmp_path: Path) -> None:
    write_node(tmp_path, 5, snapshot_every=10)
    expected = snapshot_of(tmp_path)
    checkpoint = tmp_path / "fsm" / "fsm.checkpoint"
    zero(checkpoint, 0, 4)
    assert_same_as(tmp_path, expected)


# -- fault 4: a damaged Raft log ---------------------------------------------------------------


def test_a_zeroed_block_in_a_sealed_raft_segment_refuses_to_start_naming_the_file(
    tmp_path: Path,
) -> None:
    write_node(tmp_path, 6)
    target = NodeFiles(tmp_path).raft_stores()[1]
    zero(target, 40, 64)
    fsm, storage = open_node(tmp_path)
    try:
        with pytest.raises(CorruptRecord) as info:
            storage.load()  # what RaftDriver does first
        assert info.value.path == str(target)
    finally:
        fsm.close()
        storage.close()


def test_a_damaged_raft_log_stops_a_commit_log_rebuild_too(tmp_path: Path) -> None:
    write_node(tmp_path, 7)
    files = NodeFiles(tmp_path)
    zero(files.raft_stores()[-2], 40, 64)
    cut(files.stores()[0], 10)  # the rebuild must read the damaged Raft segment
    for path in files.stores()[1:]:
        path.unlink()
    fsm, storage = open_node(tmp_path)
    try:
        with pytest.raises(CorruptRecord):
            fsm.recover(storage)
        fsm.checkpoint()
    finally:
        fsm.close()
        storage.close()


def test_a_raft_log_cut_below_what_was_applied_refuses_to_start(tmp_path: Path) -> None:
    """Applied entries were fsynced (and acknowledged) first: only damage removes them."""
    write_node(tmp_path, 10)
    active = NodeFiles(tmp_path).raft_stores()[-1]
    cut(active, active.stat().st_size // 3)
    fsm, storage = open_node(tmp_path)
    try:
        with pytest.raises(CorruptRecord, match="lost entries it acknowledged"):
            fsm.recover(storage)
    finally:
        stop(fsm, storage)
