"""Commit-log retention (`LogFsm.enforce_retention`): which segments go, what a reader then
gets, that snapshots in progress are not cut under, and that a restart neither mistakes a
cut for lost segments nor rebuilds records at shifted offsets.

Real files on tmpfs (see test_fsm_recovery), small segments so the log rolls often.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dcl.api.log.v1 import log_pb2
from dcl.errors import OffsetOutOfRange
from dcl.raft.types import Entry, EntryType, Snapshot, SnapshotMeta
from dcl.server.replicated import LogFsm, Retention, encode_records_cmd
from dcl.storage import LogConfig
from tests.unit.server import test_fsm_recovery as recovery
from tests.unit.server.test_fsm_recovery import (
    SEGMENT,
    NodeFiles,
    read_all,
    restart,
    snapshot_of,
    stop,
    write_node,
    zero,
)

pytestmark = pytest.mark.timeout(30)

tmp_path = recovery.tmp_path  # its tmpfs fixture, for every test here


def open_fsm(root: Path, retention: Retention | None = None, name: str = "fsm") -> LogFsm:
    return LogFsm(root / name, LogConfig(max_store_bytes=SEGMENT), retention=retention)


def fill(fsm: LogFsm, entries: int = 80, per_entry: int = 10, size: int = 40) -> None:
    """`entries` Raft entries of `per_entry` records of `size` bytes (by default about 24
    segments), then a checkpoint (retention cuts only what one vouches for)."""
    first = fsm.applied_index + 1
    for index in range(first, first + entries):
        values = [f"{index:04d}-{i:02d}".encode().ljust(size, b".") for i in range(per_entry)]
        fsm.apply([Entry(1, index, EntryType.NORMAL, encode_records_cmd(values))])
    fsm.checkpoint()


def assert_serves_from(fsm: LogFsm, lowest: int, next_offset: int) -> None:
    """The log holds exactly [lowest, next_offset), each record at its own offset."""
    assert (fsm.log.lowest_offset, fsm.log.next_offset) == (lowest, next_offset)
    for offset, raw in enumerate(read_all(fsm), start=lowest):
        assert log_pb2.Record.FromString(raw).offset == offset
    if lowest:
        with pytest.raises(OffsetOutOfRange, match=rf"holds \[{lowest}, {next_offset}\)"):
            fsm.log.read(lowest - 1)


def test_size_retention_keeps_at_least_the_limit_and_drops_the_oldest_segments(
    tmp_path: Path,
) -> None:
    fsm = open_fsm(tmp_path, Retention(max_bytes=10 * SEGMENT))
    fill(fsm)
    before = fsm.log.segment_spans()
    end = fsm.log.next_offset
    assert len(before) > 20

    dropped = fsm.enforce_retention()

    spans = fsm.log.segment_spans()
    kept = sum(size for _, _, size in spans)
    assert dropped == sum(size for _, _, size in before) - kept > 0
    assert kept >= 10 * SEGMENT, "fewer bytes kept than the limit"
    assert kept - spans[0][2] < 10 * SEGMENT, "a segment more than needed was kept"
    assert spans == before[len(before) - len(spans):], "only the oldest whole segments go"
    assert_serves_from(fsm, spans[0][0], end)
    assert fsm.enforce_retention() == 0, "nothing more to drop at the same size"
    fsm.close()


def test_age_retention_drops_segments_whose_newest_record_is_older_but_never_the_active_one(
    tmp_path: Path,
) -> None:
    fsm = open_fsm(tmp_path, Retention(max_age_seconds=60))
    fill(fsm)
    stores = NodeFiles(tmp_path).stores()
    now = time.time()
    for path in stores[:5]:
        os.utime(path, (now - 120, now - 120))
    end = fsm.log.next_offset
    sixth_base = fsm.log.segment_spans()[5][0]

    assert fsm.enforce_retention(now) > 0
    assert_serves_from(fsm, sixth_base, end)

    # Everything old: every sealed segment goes, the active one (the log's end) stays.
    assert fsm.enforce_retention(now + 3600) > 0
    assert fsm.log.segment_count == 1
    assert fsm.log.next_offset == end
    fsm.apply([Entry(1, fsm.applied_index + 1, EntryType.NORMAL, encode_records_cmd([b"n"]))])
    assert log_pb2.Record.FromString(fsm.log.read(end)).offset == end
    fsm.close()


def test_no_limit_drops_nothing(tmp_path: Path) -> None:
    fsm = open_fsm(tmp_path)
    fill(fsm)
    assert fsm.enforce_retention(time.time() + 10**9) == 0
    assert fsm.log.lowest_offset == 0
    fsm.close()


def test_a_snapshot_build_or_restore_in_progress_holds_retention_back(
    tmp_path: Path,
) -> None:
    fsm = open_fsm(tmp_path, Retention(max_bytes=4 * SEGMENT))
    fill(fsm, entries=100, per_entry=60, size=200)  # 1.3 MB: steps to build and to restore
    end = fsm.log.next_offset
    steps = fsm.snapshot_steps()
    assert next(steps) is None, "expected a build step"
    assert fsm.enforce_retention() == 0, "cut under a snapshot being built"
    *_, data = steps
    del steps
    assert data is not None

    # A node holding (and vouching for) the first entries: it keeps them and appends.
    later = open_fsm(tmp_path, Retention(max_bytes=SEGMENT), name="later")
    fill(later, entries=10, per_entry=60, size=200)
    restore = later.restore_steps(Snapshot(SnapshotMeta(100, 1, frozenset({"a"})), data))
    next(restore)
    assert later.enforce_retention() == 0, "cut under a restore in progress"
    for _ in restore:
        pass
    del restore
    assert later.enforce_retention() == 0, "cut before the restore was checkpointed"
    later.checkpoint()
    assert_serves_from(later, 0, end)
    assert later.enforce_retention() > 0

    # Once built, retention goes on; the next snapshot starts at the cut, and so does a
    # node restoring it.
    assert fsm.enforce_retention() > 0
    lowest = fsm.log.lowest_offset
    fresh = LogFsm(tmp_path / "fresh")
    fresh.restore(Snapshot(SnapshotMeta(100, 1, frozenset({"a"})), fsm.snapshot_data()))
    assert_serves_from(fresh, lowest, end)
    for node in (fsm, later, fresh):
        node.close()


def test_a_restart_after_a_cut_keeps_the_log_and_its_applied_index(tmp_path: Path) -> None:
    """The cut is not yet in any checkpoint (a crash right after it): the node must not take
    the missing head segments for lost ones and rebuild the whole log. Nor may the cut reach
    records applied after the last checkpoint: the restart re-applies those entries, at
    offsets the log must still hold."""
    fsm = open_fsm(tmp_path, Retention(max_bytes=8 * SEGMENT))
    fill(fsm, entries=20)
    vouched = fsm.log.next_offset
    for index in range(21, 81):  # applied after the checkpoint
        values = [(b"%04d-late" % index).ljust(40, b".")] * 10
        fsm.apply([Entry(1, index, EntryType.NORMAL, encode_records_cmd(values))])
    assert fsm.enforce_retention() > 0
    lowest = fsm.log.lowest_offset
    assert lowest <= vouched, "cut past what the checkpoint vouches for"
    assert fsm.log.segment_spans()[1][0] > vouched, "the cut was not held back by the checkpoint"
    fsm.close()  # no checkpoint after the cut

    again = open_fsm(tmp_path)
    assert again.applied_index == 20, "the log was taken for damaged and rebuilt"
    assert_serves_from(again, lowest, vouched)  # the rest is re-applied from Raft
    again.close()


def test_without_the_retention_record_a_missing_head_is_still_rebuilt(tmp_path: Path) -> None:
    fsm = open_fsm(tmp_path, Retention(max_bytes=8 * SEGMENT))
    fill(fsm)
    assert fsm.enforce_retention() > 0
    fsm.close()
    (tmp_path / "fsm" / "fsm.retained").write_bytes(b"\0" * 8)  # damaged: vouches for nothing

    again = open_fsm(tmp_path)
    assert (again.applied_index, again.log.lowest_offset, again.log.next_offset) == (0, 0, 0)
    again.close()


def test_a_damaged_log_after_a_cut_is_rebuilt_at_the_same_offsets_from_the_raft_log(
    tmp_path: Path,
) -> None:
    """No Raft snapshot: the rebuild replays the Raft log from its start, whose first entry
    made offset 0, wherever retention had moved the log's first offset to."""
    write_node(tmp_path, 21, entries=120)
    expected, applied, _ = snapshot_of(tmp_path)
    fsm = open_fsm(tmp_path, Retention(max_bytes=6 * SEGMENT))
    assert fsm.enforce_retention() > 0
    fsm.close()
    (tmp_path / "fsm" / "fsm.checkpoint").write_bytes(b"\0" * 8)  # vouches for nothing

    fsm, storage = restart(tmp_path)
    assert fsm.applied_index == applied
    got = read_all(fsm)
    assert fsm.log.lowest_offset == 0 and got == expected
    stop(fsm, storage)


@pytest.mark.parametrize(("seed", "kept"), [(22, 1), *((30 + seed, 0) for seed in range(6))])
def test_a_damaged_segment_after_a_cut_is_rebuilt_even_when_the_cut_split_an_entry(
    tmp_path: Path, seed: int, kept: int
) -> None:
    """Damage in the `kept`-th segment left after a cut is rebuilt from the Raft log. Entries
    span segments, so a cut can fall inside one: damage in the first kept segment then makes
    the rebuild start at that entry's first record, below where the log started (the node
    used to refuse to start)."""
    write_node(tmp_path, seed, entries=120)
    expected, applied, _ = snapshot_of(tmp_path)
    fsm = open_fsm(tmp_path, Retention(max_bytes=10 * SEGMENT))
    assert fsm.enforce_retention() > 0
    lowest = fsm.log.lowest_offset
    fsm.checkpoint()
    fsm.close()
    zero(NodeFiles(tmp_path).stores()[kept], 0 if kept == 0 else 40, 30)

    fsm, storage = restart(tmp_path)
    assert fsm.applied_index == applied
    assert fsm.log.lowest_offset == lowest if kept else fsm.log.lowest_offset <= lowest
    assert read_all(fsm) == expected[fsm.log.lowest_offset:]
    stop(fsm, storage)


@pytest.mark.parametrize("follower_cut", [True, False],
                         ids=["follower-cut-more", "leader-cut-more"])
def test_a_node_whose_cut_differs_from_the_snapshots_keeps_its_log_on_restore(
    tmp_path: Path, follower_cut: bool
) -> None:
    """Each node cuts its own head: a follower behind the leader whose records are a prefix
    of the snapshot's keeps them and appends the rest, whichever started first; readers
    never see its log shrink."""
    leader = open_fsm(tmp_path, Retention(max_bytes=10 * SEGMENT), name="leader")
    follower = open_fsm(tmp_path, Retention(max_bytes=10 * SEGMENT), name="follower")
    fill(leader, entries=40)
    fill(follower, entries=40)
    (follower if follower_cut else leader).enforce_retention()
    fill(leader, entries=40)
    assert leader.log.lowest_offset != follower.log.lowest_offset
    kept = follower.log.lowest_offset
    held = follower.log.next_offset
    lows = []
    for _ in follower.restore_steps(Snapshot(SnapshotMeta(80, 1, frozenset({"a"})),
                                             leader.snapshot_data())):
        lows.append(follower.log.lowest_offset)
    assert set(lows) <= {kept}, "the follower's log was reset"
    assert_serves_from(follower, kept, leader.log.next_offset)
    assert read_all(follower)[held - kept:] == read_all(leader)[held - leader.log.lowest_offset:]
    leader.close()
    follower.close()


def test_a_restore_that_replaces_the_log_drops_the_old_cut_record(tmp_path: Path) -> None:
    """The record vouches for a cut of the old log only: kept, it would let a head later
    lost from the new log pass for a cut."""
    follower = open_fsm(tmp_path, Retention(max_bytes=10 * SEGMENT), name="follower")
    fill(follower)
    assert follower.enforce_retention() > 0
    assert (tmp_path / "follower" / "fsm.retained").exists()
    leader = open_fsm(tmp_path, name="leader")
    fill(leader, size=41)  # other records at the same offsets: not a prefix
    follower.restore(Snapshot(SnapshotMeta(80, 1, frozenset({"a"})), leader.snapshot_data()))
    assert not (tmp_path / "follower" / "fsm.retained").exists()
    assert_serves_from(follower, 0, leader.log.next_offset)
    assert read_all(follower) == read_all(leader)
    leader.close()
    follower.close()
