"""RaftStorage on real files: round trips, conflicting suffixes, snapshots, crash recovery.

Crashes are simulated by copying the storage directory while it is open (what a killed process
leaves in the page cache) and cutting the copy's active store file anywhere after the last
synced size (what a power loss may leave of unsynced writes).
"""

from __future__ import annotations

import gc
import os
import random
import shutil
import threading
from pathlib import Path

import pytest

from dcl.errors import CorruptRecord, InvalidRequest
from dcl.raft.core import RaftNode
from dcl.raft.storage import RaftStorage
from dcl.raft.types import (
    Config,
    Entry,
    EntryType,
    HardState,
    Heartbeat,
    InstallSnapshot,
    Snapshot,
    SnapshotMeta,
)
from dcl.storage import LogInUse
from tests.unit.storage.helpers import ReleaseWatch

SMALL = 256  # bytes per segment: forces many segments


def make(lo: int, hi: int, term: int = 1) -> list[Entry]:
    """Entries [lo, hi) with varied types and payload sizes (including empty)."""
    types = (EntryType.NORMAL, EntryType.NOOP, EntryType.CONF_CHANGE)
    return [Entry(term, i, types[i % 3], bytes([i % 256]) * (i % 7)) for i in range(lo, hi)]


def active_store(directory: Path) -> Path:
    return sorted((directory / "log").glob("*.store"))[-1]


def snap(index: int, term: int, data: bytes = b"state") -> Snapshot:
    meta = SnapshotMeta(index, term, frozenset({"a", "b", "ñode"}), frozenset({"l"}))
    return Snapshot(meta, data)


def test_fresh_store_is_empty(tmp_path: Path) -> None:
    with RaftStorage(tmp_path) as s:
        assert s.load() == (HardState(), None, [])
        assert (s.first_index, s.last_index) == (1, 0)
    assert {p.name for p in tmp_path.iterdir()} >= {"log", "state", "snapshot"}


def test_entries_round_trip_across_segments_and_reopen(tmp_path: Path) -> None:
    entries = [*make(1, 200), Entry(2, 200, EntryType.NORMAL, b"x" * 1000)]
    with RaftStorage(tmp_path, max_segment_bytes=SMALL) as s:
        s.append(entries[:50])
        s.append(entries[50:])
        assert s.last_index == 200
        assert s.entries(1, 201) == entries
    with RaftStorage(tmp_path, max_segment_bytes=SMALL) as s:
        assert len(list((tmp_path / "log").glob("*.store"))) > 1
        _, snapshot, loaded = s.load()
        assert loaded == entries and snapshot is None
        assert s.term(200) == 2 and s.term(1) == 1


def test_append_replaces_conflicting_suffix_across_reopen(tmp_path: Path) -> None:
    with RaftStorage(tmp_path, max_segment_bytes=SMALL) as s:
        s.append(make(1, 100, term=1))
        s.sync()
        s.append(make(40, 45, term=2))  # cuts 40..99, also whole later segments
        assert s.last_index == 44
    with RaftStorage(tmp_path, max_segment_bytes=SMALL) as s:
        assert s.load()[2] == make(1, 40, term=1) + make(40, 45, term=2)
        s.append(make(45, 50, term=2))
        s.append(make(1, 3, term=3))  # replace everything
        assert s.load()[2] == make(1, 3, term=3)
    with RaftStorage(tmp_path, max_segment_bytes=SMALL) as s:
        assert s.load()[2] == make(1, 3, term=3)


def test_append_rejects_gaps_and_non_consecutive(tmp_path: Path) -> None:
    with RaftStorage(tmp_path) as s:
        s.append([])
        with pytest.raises(InvalidRequest):
            s.append(make(2, 3))
        with pytest.raises(InvalidRequest):
            s.append([Entry(1, 1), Entry(1, 3)])
        s.save_snapshot(snap(10, 2))
        with pytest.raises(InvalidRequest):
            s.append(make(10, 12))
        s.append(make(11, 12))
        assert s.last_index == 11


@pytest.mark.parametrize("seed", range(8))
def test_crash_keeps_synced_entries(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    live, copy = tmp_path / "live", tmp_path / "copy"
    s = RaftStorage(live)
    synced = make(1, 60, term=1)
    s.append(synced[:30])
    s.append(synced[30:])
    s.sync()
    synced_size = active_store(live).stat().st_size
    unsynced = make(60, 120, term=2)
    s.append(unsynced)
    s._log.flush()  # the unsynced bytes reach the file, as they may before a power loss
    shutil.copytree(live, copy)
    s.close()
    store = active_store(copy)
    cut = rng.randint(synced_size, store.stat().st_size)
    os.truncate(store, cut)

    with RaftStorage(copy) as r:
        _, _, loaded = r.load()
        assert loaded[:59] == synced
        assert loaded[59:] == unsynced[: len(loaded) - 59]  # a clean prefix of the rest
        r.append(make(r.last_index + 1, r.last_index + 3, term=3))  # the log is writable again
    with RaftStorage(copy) as r:
        assert r.load()[2][-1].term == 3


def test_crash_with_buffered_appends_loses_only_unsynced(tmp_path: Path) -> None:
    live, copy = tmp_path / "live", tmp_path / "copy"
    with RaftStorage(live, max_segment_bytes=SMALL) as s:
        s.append(make(1, 80))
        s.sync()
        s.append(make(80, 90, term=2))  # buffered in the process: lost by kill -9
        shutil.copytree(live, copy)
    with RaftStorage(copy, max_segment_bytes=SMALL) as r:
        assert r.load()[2][:79] == make(1, 80)


def test_sync_from_another_thread_while_appending(tmp_path: Path) -> None:
    stop = threading.Event()
    with RaftStorage(tmp_path, max_segment_bytes=4096) as s:

        def syncer() -> None:
            while not stop.is_set():
                s.sync()

        thread = threading.Thread(target=syncer)
        thread.start()
        try:
            for lo in range(1, 2001, 50):
                s.append(make(lo, lo + 50))
        finally:
            stop.set()
            thread.join()
        s.sync()
    with RaftStorage(tmp_path, max_segment_bytes=4096) as s:
        assert s.load()[2] == make(1, 2001)


def test_hard_state_durable_at_once_when_term_or_vote_changes(tmp_path: Path) -> None:
    live, copy = tmp_path / "live", tmp_path / "copy"
    s = RaftStorage(live)
    s.set_hard_state(HardState(3, "node-b", 0))
    s.set_hard_state(HardState(3, "node-b", 7))  # commit only: not written yet
    shutil.copytree(live, copy)  # crash now
    with RaftStorage(copy) as r:
        assert r.load()[0] == HardState(3, "node-b", 0)
    s.set_hard_state(HardState(4, None, 9))
    s.close()  # the lagging commit is written on close
    with RaftStorage(live) as r:
        assert r.load()[0] == HardState(4, None, 9)
        r.set_hard_state(HardState(4, "", 9))  # the empty id is a vote, distinct from None
    with RaftStorage(live) as r:
        assert r.load()[0] == HardState(4, "", 9)


def test_commit_never_below_snapshot_index(tmp_path: Path) -> None:
    with RaftStorage(tmp_path) as s:
        s.set_hard_state(HardState(2, "a", 3))
        s.append(make(1, 20, term=2))
        s.save_snapshot(snap(15, 2))
        assert s.load()[0] == HardState(2, "a", 15)
    with RaftStorage(tmp_path) as s:
        assert s.load()[0] == HardState(2, "a", 15)


def test_snapshot_with_matching_entry_keeps_the_entries_after_it(tmp_path: Path) -> None:
    with RaftStorage(tmp_path, max_segment_bytes=SMALL) as s:
        s.append(make(1, 100, term=1) + make(100, 150, term=2))
        s.sync()
        s.save_snapshot(snap(120, 2, b"x" * 5000))
        assert (s.first_index, s.last_index) == (121, 149)
        assert s._log.lowest_offset <= 121  # whole segments only
        assert s.term(120) == 2
    with RaftStorage(tmp_path, max_segment_bytes=SMALL) as s:
        _, snapshot, entries = s.load()
        assert snapshot == snap(120, 2, b"x" * 5000)
        assert entries == make(121, 150, term=2)
        s.append(make(150, 152, term=3))
        assert s.load()[2][-1] == make(150, 152, term=3)[-1]


@pytest.mark.parametrize("case", ["term_mismatch", "log_too_short"])
def test_snapshot_not_in_log_resets_it(tmp_path: Path, case: str) -> None:
    index, term = (50, 3) if case == "term_mismatch" else (500, 1)
    with RaftStorage(tmp_path, max_segment_bytes=SMALL) as s:
        s.append(make(1, 100, term=1))
        s.save_snapshot(snap(index, term))
        assert (s.first_index, s.last_index) == (index + 1, index)
        assert s.load()[2] == []
        s.append(make(index + 1, index + 4, term=4))
        # The log starts right after the snapshot: the snapshot gives the term before it.
        assert s.retained(index, 5, 1 << 20) == (term, make(index + 1, index + 4, term=4))
    with RaftStorage(tmp_path, max_segment_bytes=SMALL) as s:
        _, snapshot, entries = s.load()
        assert snapshot is not None and snapshot.meta.index == index
        assert entries == make(index + 1, index + 4, term=4)
        assert s._log.lowest_offset == index + 1


@pytest.mark.parametrize(
    ("index", "term", "expected"),
    [(5, 1, list(range(6, 40))), (20, 9, []), (300, 1, [])],
)
def test_crash_between_snapshot_write_and_log_cut(
    tmp_path: Path, index: int, term: int, expected: list[int]
) -> None:
    """The snapshot file is durable before the log is touched; a crash right there (simulated
    by planting the snapshot file next to the uncut log) is completed on the next open."""
    other = tmp_path / "other"
    with RaftStorage(other) as o:
        o.save_snapshot(snap(index, term))
    target = tmp_path / "target"
    with RaftStorage(target, max_segment_bytes=SMALL) as s:
        s.append(make(1, 40, term=1))
    shutil.copy(other / "snapshot" / "snapshot", target / "snapshot" / "snapshot")
    with RaftStorage(target, max_segment_bytes=SMALL) as s:
        _, snapshot, entries = s.load()
        assert snapshot is not None and snapshot.meta.index == index
        assert [e.index for e in entries] == expected
        assert s.last_index == (39 if expected else index)
    with RaftStorage(target, max_segment_bytes=SMALL) as s:  # idempotent
        assert [e.index for e in s.load()[2]] == expected


def test_log_reset_interrupted_after_removing_segments(tmp_path: Path) -> None:
    """Log.reset is not atomic: if its directory ends up without segments, the log reopens
    right after the snapshot."""
    with RaftStorage(tmp_path) as s:
        s.append(make(1, 10))
        s.save_snapshot(snap(30, 2))
    for f in (tmp_path / "log").iterdir():
        f.unlink()
    with RaftStorage(tmp_path) as s:
        assert (s.first_index, s.last_index) == (31, 30)
        assert s.load()[2] == []


def test_a_snapshot_written_in_a_thread_leaves_the_log_alone_until_adopted(
    tmp_path: Path,
) -> None:
    """write_snapshot runs in an executor thread while the loop keeps appending and syncing
    (a snapshot is written in the background); only adopt_snapshot, on the loop, cuts the
    log. A restart in between finishes the cut, as after any snapshot write."""
    with RaftStorage(tmp_path, max_segment_bytes=SMALL) as s:
        s.append(make(1, 100))
        s.sync()
        written = snap(60, 1, os.urandom(5 << 19))  # 2.5 MiB: past two flush steps
        writer = threading.Thread(target=s.write_snapshot, args=(written,))
        writer.start()
        for i in range(100, 400, 10):  # the loop goes on meanwhile
            s.append(make(i, i + 10))
            s.sync()
        writer.join()
        assert s.snapshot_index == 0 and s.first_index == 1  # not adopted: log whole
        assert s.entries(1, 2) == make(1, 2)
        with pytest.raises(InvalidRequest):
            s.write_snapshot(snap(59, 1))  # never older than the one written
        with pytest.raises(InvalidRequest):
            s.adopt_snapshot(snap(70, 1))  # only the one written
    with RaftStorage(tmp_path, max_segment_bytes=SMALL) as s:
        _, snapshot, entries = s.load()
        assert snapshot == written
        assert entries == make(61, 400)
    with RaftStorage(tmp_path, max_segment_bytes=SMALL) as s:
        s.write_snapshot(snap(200, 1))
        s.adopt_snapshot(snap(200, 1))
        assert s.first_index == 201 and s.load()[2] == make(201, 400)


def test_older_snapshot_rejected(tmp_path: Path) -> None:
    with RaftStorage(tmp_path) as s:
        s.save_snapshot(snap(10, 1))
        with pytest.raises(InvalidRequest):
            s.save_snapshot(snap(9, 1))


def test_compact_drops_segments_but_never_past_the_snapshot(tmp_path: Path) -> None:
    with RaftStorage(tmp_path, max_segment_bytes=SMALL) as s:
        s.append(make(1, 200))
        segments = s._log.segment_count
        s.compact(150)  # no snapshot: nothing may go
        assert s._log.lowest_offset == 1 and s._log.segment_count == segments
        s.save_snapshot(snap(100, 1))
        s.compact(100)
        assert s._log.lowest_offset <= 101
    with RaftStorage(tmp_path, max_segment_bytes=SMALL) as s:
        assert s.load()[2] == make(101, 200)


@pytest.mark.parametrize("name", ["state/hard_state", "snapshot/snapshot"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_state_or_snapshot_file_detected(tmp_path: Path, name: str, damage: str) -> None:
    with RaftStorage(tmp_path) as s:
        s.set_hard_state(HardState(1, "a", 0))
        s.save_snapshot(snap(5, 1, b"payload"))
    path = tmp_path / name
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
    else:
        del raw[len(raw) // 2 :]
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptRecord):
        RaftStorage(tmp_path)
    # The failed open released the directory lock.
    path.unlink()
    RaftStorage(tmp_path).close()


def test_the_held_snapshot_is_read_from_its_file_and_outlives_a_replacement(
    tmp_path: Path,
) -> None:
    """The stored snapshot is held as a mapping of its file (a snapshot holds the whole
    commit log: it must not stay on the heap), and whoever still holds an older one, such as
    a leader streaming it to a follower, keeps reading intact bytes after a newer one lands."""
    data = os.urandom(1 << 20)
    with RaftStorage(tmp_path) as s:
        s.save_snapshot(snap(5, 1, data))
        held = s.snapshot
        assert held is not None and isinstance(held.data, memoryview) and held.data == data
        s.save_snapshot(snap(9, 1, b"newer"))
        assert held.data == data and len(held.data) == len(data)
        assert s.snapshot == snap(9, 1, b"newer")
    with RaftStorage(tmp_path) as s:
        assert s.snapshot == snap(9, 1, b"newer")
        assert isinstance(s.snapshot.data, memoryview)



def test_a_replaced_snapshot_is_freed_in_the_background_once_let_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replaced snapshot file stays readable for its holders; when the last one lets
    go, its blocks (as large as the commit log: ~100 ms to free 400 MB) are freed by the
    background closer, not by the thread that dropped it (the event loop)."""
    watch = ReleaseWatch(tmp_path, monkeypatch)
    with RaftStorage(tmp_path) as s:
        s.save_snapshot(snap(5, 1, os.urandom(1 << 20)))
        held = s.snapshot
        s.save_snapshot(snap(9, 1, b"newer"))
        assert held is not None and len(held.data) == 1 << 20
        assert watch.still_open() >= 1, "the replaced file should stay open for its holder"
        del held
        gc.collect()
        watch.wait_all_closed()
    closers = {thread for path, thread in watch.closed if path == "snapshot/snapshot"}
    assert closers == {"dcl-closer"}, f"the replaced snapshot closed by {closers or 'nobody'}"


def test_a_snapshot_dropped_partway_is_freed_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partly received snapshot dropped (a new term, a newer snapshot) can be hundreds of
    MB: its spool file is deleted at once and freed by the background closer."""
    watch = ReleaseWatch(tmp_path, monkeypatch)
    with RaftStorage(tmp_path) as s:
        spool = s.snapshot_spool
        spool.restart(os.urandom(1 << 20))
        spool.extend(os.urandom(1 << 20))
        spool.close()
        assert not list((tmp_path / "snapshot").glob("incoming*"))
        watch.wait_all_closed()
    assert set(watch.closed_by) == {"dcl-closer"}, f"closed by {set(watch.closed_by)}"

def test_leftover_temp_files_are_removed(tmp_path: Path) -> None:
    RaftStorage(tmp_path).close()
    (tmp_path / "state" / "hard_state.tmp").write_bytes(b"torn")
    (tmp_path / "snapshot" / "snapshot.tmp").write_bytes(b"torn")
    with RaftStorage(tmp_path) as s:
        assert s.load() == (HardState(), None, [])
    assert not list(tmp_path.glob("*/*.tmp"))


def test_second_open_refused(tmp_path: Path) -> None:
    with RaftStorage(tmp_path), pytest.raises(LogInUse):
        RaftStorage(tmp_path)


def test_closed_storage_refuses_use(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    s.close()
    s.close()
    with pytest.raises(InvalidRequest):
        s.append(make(1, 2))


def test_load_feeds_raft_node(tmp_path: Path) -> None:
    with RaftStorage(tmp_path) as s:
        s.append([Entry(2, i, EntryType.NORMAL, b"p") for i in range(1, 30)])
        s.save_snapshot(snap(10, 2))
        s.set_hard_state(HardState(2, "a", 12))
    with RaftStorage(tmp_path) as s:
        hs, snapshot, entries = s.load()
    node = RaftNode(
        "a", Config(), random.Random(0), hard_state=hs, snapshot=snapshot, entries=entries
    )
    status = node.status()
    assert (status.first_index, status.last_index, status.commit_index) == (11, 29, 12)
    assert status.voters == frozenset({"a", "b", "ñode"})


def test_snapshot_at_last_entry_empties_the_log(tmp_path: Path) -> None:
    with RaftStorage(tmp_path, max_segment_bytes=SMALL) as s:
        s.append(make(1, 60, term=2))
        s.save_snapshot(snap(59, 2))
        assert (s.first_index, s.last_index) == (60, 59)
        s.append(make(60, 62, term=3))
    with RaftStorage(tmp_path, max_segment_bytes=SMALL) as s:
        assert s.load()[2] == make(60, 62, term=3)


def test_gap_between_snapshot_and_log_is_refused(tmp_path: Path) -> None:
    """A log starting after snapshot index + 1 lost entries: refuse rather than guess."""
    older = tmp_path / "older"
    with RaftStorage(older) as o:
        o.save_snapshot(snap(50, 1))
    target = tmp_path / "target"
    with RaftStorage(target) as s:
        s.save_snapshot(snap(100, 1))
        s.append(make(101, 110))
    shutil.copy(older / "snapshot" / "snapshot", target / "snapshot" / "snapshot")
    with pytest.raises(CorruptRecord):
        RaftStorage(target)


def test_the_snapshot_spool_assembles_on_disk_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """The spool a follower receives a snapshot into: chunks go to a scratch file, `take`
    hands back the whole (mapped, the file already unlinked), a restart drops a partial
    one, and a scratch file left by a crash is removed when the storage is next opened."""
    with RaftStorage(tmp_path / "raft") as storage:
        spool = storage.snapshot_spool
        scratch = tmp_path / "raft" / "snapshot" / "incoming.tmp"
        spool.restart(b"abandoned")
        assert scratch.exists() and len(spool) == 9
        spool.restart(b"")  # the leader started over (or sent another snapshot)
        assert not scratch.exists() and len(spool) == 0
        spool.restart(b"first,")
        for i in range(1000):
            spool.extend(b"%d," % i)
        whole = spool.take()
        assert bytes(whole) == b"first," + b"".join(b"%d," % i for i in range(1000))
        assert not scratch.exists() and len(spool) == 0
        assert spool.take() == b""
        spool.restart(b"left by a crash")
        os.link(scratch, tmp_path / "kept")  # what a crash would leave behind
    os.rename(tmp_path / "kept", scratch)
    with RaftStorage(tmp_path / "raft"):
        assert not scratch.exists()


def test_a_partly_received_snapshot_is_dropped_when_the_term_moves_on(tmp_path: Path) -> None:
    """A follower got the first chunk of a snapshot, then its leader was replaced. The
    chunks are keyed by term, so that transfer can never complete: its scratch file (up to
    a commit log's worth of disk) goes at once, not when some later snapshot arrives."""
    with RaftStorage(tmp_path / "raft") as storage:
        node = RaftNode("f", Config(election_tick=10), random.Random(1),
                        spool=storage.snapshot_spool)
        scratch = tmp_path / "raft" / "snapshot" / "incoming.tmp"
        meta = SnapshotMeta(50, 1, frozenset({"a", "f"}))
        node.step(InstallSnapshot(1, "a", "f", meta, 0, b"x" * 1000, False))
        assert scratch.exists() and len(storage.snapshot_spool) == 1000
        node.step(Heartbeat(2, "b", "f", 0, 0))  # a new leader, in a new term
        assert not scratch.exists() and len(storage.snapshot_spool) == 0


# -- retention: log kept below the snapshot for followers briefly behind ----------------------


def covered_spans(directory: Path, index: int) -> list[tuple[int, int, int]]:
    """(base, next, bytes) of the segments a snapshot at `index` covers whole, newest first."""
    with RaftStorage(directory, max_segment_bytes=SMALL, retain_bytes=1 << 30) as s:
        return [span for span in reversed(s._log.segment_spans()) if span[1] <= index + 1]


@pytest.mark.parametrize(("keep", "slack"), [(0, 0), (1, 0), (3, 0), (3, -1)])
def test_retention_keeps_the_newest_whole_segments_within_retain_bytes(
    tmp_path: Path, keep: int, slack: int
) -> None:
    """`keep` segments' bytes (`slack` -1: one byte short of them) stay below the snapshot."""
    probe = tmp_path / "probe"
    with RaftStorage(probe, max_segment_bytes=SMALL) as s:
        s.append(make(1, 200))
    covered = covered_spans(probe, 150)
    assert len(covered) > 4
    retain = sum(size for _, _, size in covered[:keep]) + slack
    kept = keep if slack == 0 else keep - 1
    data = tmp_path / "data"
    with RaftStorage(data, max_segment_bytes=SMALL, retain_bytes=retain) as s:
        s.append(make(1, 200))
        s.sync()
        s.save_snapshot(snap(150, 1))
        lowest = s._log.lowest_offset
        if kept:
            assert lowest == covered[kept - 1][0]
        else:
            assert lowest > covered[0][0] and lowest <= 151
        assert s.first_index == 151 and s.load()[2] == make(151, 200)
        assert lowest > 1 and s.retained(0, 5, 1 << 20) is None, "the log's start is gone"
        assert s.retained(lowest - 1, 5, 1 << 20) is None
        expected = (1, make(lowest + 1, lowest + 6)) if retain else None  # 0: off
        assert s.retained(lowest, 5, 1 << 20) == expected
    with RaftStorage(data, max_segment_bytes=SMALL, retain_bytes=retain) as s:
        assert s._log.lowest_offset == lowest, "reopening keeps what retention kept"
        assert s.load()[2] == make(151, 200)


def test_retained_entries_read_back_with_the_term_before_them(tmp_path: Path) -> None:
    with RaftStorage(tmp_path, max_segment_bytes=SMALL) as s:
        s.append(make(1, 100, term=1) + make(100, 200, term=2))
        s.sync()
        s.save_snapshot(snap(150, 2))
        assert s._log.lowest_offset == 1, "the default retention keeps this small log whole"
        assert s.retained(98, 5, 1 << 20) == (1, make(99, 100, term=1) + make(100, 104, term=2))
        assert s.retained(0, 2, 1 << 20) == (0, make(1, 3, term=1)), "from the very start"
        one = s.retained(120, 100, 1)
        assert one == (2, make(121, 122, term=2)), "at least one entry, whatever max_bytes"
        assert s.retained(199, 5, 1 << 20) is None, "nothing after the last entry"
    assert s.retained(98, 5, 1 << 20) is None, "closed storage answers nothing"


def test_damaged_retained_entries_are_not_sent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A damaged segment below the snapshot costs the follower a snapshot, nothing more."""
    with RaftStorage(tmp_path, max_segment_bytes=SMALL) as s:
        s.append(make(1, 200))
        s.sync()
        s.save_snapshot(snap(150, 1))
    first = sorted((tmp_path / "log").glob("*.store"))[0]
    raw = bytearray(first.read_bytes())
    raw[-1] ^= 0xFF
    first.write_bytes(bytes(raw))
    with RaftStorage(tmp_path, max_segment_bytes=SMALL) as s:
        base = int(first.stem)
        answers = [s.retained(prev, 50, 1 << 20) for prev in range(base, base + 5)]
        assert None in answers
        assert "retained raft entries unreadable" in caplog.text
        assert s.load()[2] == make(151, 200), "entries after the snapshot are untouched"


def test_retained_entries_are_served_while_a_snapshot_is_written_in_the_background(
    tmp_path: Path,
) -> None:
    """The driver compacts the core, then writes the snapshot in a thread and adopts it
    later: meanwhile the log is uncut, and entries up to the new snapshot come from it."""
    with RaftStorage(tmp_path, max_segment_bytes=SMALL, retain_bytes=1) as s:
        s.append(make(1, 200))
        s.sync()
        s.save_snapshot(snap(50, 1))
        lowest = s._log.lowest_offset
        assert 1 < lowest <= 51
        s.write_snapshot(snap(150, 1))  # written, not adopted: the log is still whole
        assert s.retained(lowest, 3, 1 << 20) == (1, make(lowest + 1, lowest + 4))
        assert s.retained(140, 3, 1 << 20) == (1, make(141, 144))
        s.adopt_snapshot(snap(150, 1))
        # 1 byte of retention holds no whole segment: only the one holding 151 stays.
        expected = (1, make(141, 144)) if s._log.lowest_offset <= 140 else None
        assert s.retained(140, 3, 1 << 20) == expected
        assert s._log.lowest_offset > lowest, "adopting cut the log to the new snapshot"
