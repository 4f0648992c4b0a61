"""LogFsm snapshots built step by step while the node keeps applying (as the driver does).

The state is captured when `snapshot_steps()` is called; entries applied between steps
append past the captured end and must not leak into the snapshot, or a follower restoring
it would hold records its Raft log also replays (offsets twice).
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcl.errors import CorruptRecord
from dcl.raft.types import Entry, EntryType, Snapshot, SnapshotMeta
from dcl.server.replicated import LogFsm, encode_address_cmd, encode_records_cmd


def records(fsm: LogFsm) -> list[bytes]:
    return [fsm.log.read(o) for o in range(fsm.log.lowest_offset, fsm.log.next_offset)]


def test_a_stepwise_snapshot_holds_the_state_of_its_call_not_what_is_applied_meanwhile(
    tmp_path: Path,
) -> None:
    fsm = LogFsm(tmp_path / "node")
    fsm.apply([Entry(1, 1, EntryType.NORMAL, encode_address_cmd("a", "host-a:1"))])
    for index in range(2, 5):  # 3 x 4000 records: more than one build step
        values = [f"{index}-{i}".encode() for i in range(4000)]
        fsm.apply([Entry(1, index, EntryType.NORMAL, encode_records_cmd(values))])
    before = records(fsm)

    steps = fsm.snapshot_steps()
    assert next(steps) is None, "expected a step before the end"
    fsm.apply([Entry(1, 5, EntryType.NORMAL, encode_records_cmd([b"later"] * 5000)),
               Entry(1, 6, EntryType.NORMAL, encode_address_cmd("b", "host-b:2"))])
    *_, data = steps
    assert data is not None

    follower = LogFsm(tmp_path / "follower")
    follower.restore(Snapshot(SnapshotMeta(4, 1, frozenset({"a"})), data))
    assert records(follower) == before
    assert follower.addresses == {"a": "host-a:1"}
    assert follower.applied_index == 4
    assert not (tmp_path / "node" / "snapshot.build").exists()
    follower.close()
    fsm.close()


def test_a_build_closed_midway_leaves_no_scratch_file(tmp_path: Path) -> None:
    fsm = LogFsm(tmp_path / "node")
    fsm.apply([Entry(1, 1, EntryType.NORMAL, encode_records_cmd([b"x" * 10] * 9000))])
    steps = fsm.snapshot_steps()
    assert next(steps) is None
    assert (tmp_path / "node" / "snapshot.build").exists()
    steps.close()  # the driver cancels a build when the leader's snapshot arrives
    assert not (tmp_path / "node" / "snapshot.build").exists()
    fsm.close()


def _snapshot_of(
    tmp_path: Path, name: str, count: int, size: int
) -> tuple[Snapshot, dict[int, bytes]]:
    """A snapshot of `count` records of `size` bytes, mapped from a file as a stored one is,
    and a sample of its records by offset."""
    fsm = LogFsm(tmp_path / name)
    for start in range(0, count, 10_000):
        stop = min(count, start + 10_000)
        values = [i.to_bytes(4, "big") * (size // 4) for i in range(start, stop)]
        fsm.apply([Entry(1, 2 + start // 10_000, EntryType.NORMAL, encode_records_cmd(values))])
    *_, data = fsm.snapshot_steps()
    assert data is not None
    sample = {o: fsm.log.read(o) for o in range(0, count, max(1, count // 50))}
    sample[count - 1] = fsm.log.read(count - 1)
    fsm.close()
    path = tmp_path / f"{name}.snap"
    path.write_bytes(data)
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    return Snapshot(SnapshotMeta(100, 1, frozenset({"a"})), memoryview(mapped)), sample


def test_restoring_a_large_snapshot_does_not_copy_the_log_onto_the_heap(tmp_path: Path) -> None:
    """64 MiB of records restored from a mapped snapshot: the heap grows by a run of
    records at a time, not by the log's size (a catching-up node must not need RAM for
    its whole log)."""
    snapshot, sample = _snapshot_of(tmp_path, "leader", 64 * 1024, 1024)
    follower = LogFsm(tmp_path / "follower")
    tracemalloc.start()
    try:
        follower.restore(snapshot)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 24 << 20, f"restore peaked at {peak >> 20} MiB of heap for 64 MiB of records"
    assert follower.log.lowest_offset == 0 and follower.log.next_offset == 64 * 1024
    assert {o: follower.log.read(o) for o in sample} == sample
    assert follower.applied_index == 100
    follower.close()


def test_a_malformed_snapshot_is_refused_before_the_log_is_reset(tmp_path: Path) -> None:
    """A snapshot cut short inside its last record raises CorruptRecord and leaves the
    node's state as it was (nothing half-restored)."""
    whole, sample = _snapshot_of(tmp_path, "leader", 100, 100)
    cut = Snapshot(whole.meta, bytes(whole.data[:-10]))
    fsm = LogFsm(tmp_path / "node")
    fsm.apply([Entry(1, 1, EntryType.NORMAL, encode_records_cmd([b"mine"]))])
    mine = records(fsm)
    with pytest.raises(CorruptRecord, match="past the end"):
        fsm.restore(cut)
    assert records(fsm) == mine and fsm.applied_index == 1
    fsm.restore(whole)
    assert fsm.log.next_offset == 100 and fsm.applied_index == 100
    assert {o: fsm.log.read(o) for o in sample} == sample
    fsm.close()


@pytest.mark.parametrize("damage", ["short header", "book past the end", "empty record"])
def test_a_snapshot_with_a_bad_header_or_record_is_refused_whole(
    tmp_path: Path, damage: str
) -> None:
    """Every malformed snapshot is a CorruptRecord, and the node keeps its records and its
    address book: nothing is replaced until the whole snapshot checked out."""
    whole, _ = _snapshot_of(tmp_path, "leader", 10, 100)
    data = bytes(whole.data)
    (first, _) = struct.unpack_from(">QI", data, 0)
    bad = {
        "short header": data[:7],
        "book past the end": struct.pack(">QI", first, len(data)) + data[12:],
        "empty record": data + b"\0\0\0\0",
    }[damage]
    fsm = LogFsm(tmp_path / "node")
    fsm.apply([Entry(1, 1, EntryType.NORMAL, encode_address_cmd("me", "host-me:1")),
               Entry(1, 2, EntryType.NORMAL, encode_records_cmd([b"mine"]))])
    mine = records(fsm)
    with pytest.raises(CorruptRecord):
        fsm.restore(Snapshot(whole.meta, bad))
    assert records(fsm) == mine and fsm.addresses == {"me": "host-me:1"}
    assert fsm.applied_index == 2
    fsm.close()


def _apply_batches(fsm: LogFsm, batches: int, per_batch: int, size: int) -> None:
    """Entries 2.. of `per_batch` records of `size` bytes each, as every node applies them."""
    for b in range(batches):
        values = [(b * per_batch + i).to_bytes(4, "big") * (size // 4) for i in range(per_batch)]
        fsm.apply([Entry(1, 2 + b, EntryType.NORMAL, encode_records_cmd(values))])


def _leader_snapshot(tmp_path: Path, batches: int) -> tuple[Snapshot, list[bytes]]:
    """The leader's snapshot after `_apply_batches` of 1 MiB each, and its records."""
    leader = LogFsm(tmp_path / "leader")
    _apply_batches(leader, batches, 1024, 1024)
    *_, data = leader.snapshot_steps()
    assert data is not None
    expected = records(leader)
    leader.close()
    return Snapshot(SnapshotMeta(batches + 1, 1, frozenset({"a"})), bytes(data)), expected


def test_a_node_holding_a_prefix_keeps_it_and_appends_the_rest_a_run_per_step(
    tmp_path: Path,
) -> None:
    """The usual install: a node applied the first entries and fell behind the leader's
    compaction. Its records stay readable at every step (readers share the log), its files
    are not rewritten, and no step appends more than about 1 MiB."""
    snapshot, expected = _leader_snapshot(tmp_path, 40)  # 40 MiB

    node = LogFsm(tmp_path / "node")
    _apply_batches(node, 10, 1024, 1024)
    node.checkpoint()
    held = records(node)
    first_store = next((tmp_path / "node" / "commitlog").glob("*.store"))
    inode = first_store.stat().st_ino

    appending = 0
    grown = node.log.next_offset
    for _ in node.restore_steps(snapshot):
        assert node.log.next_offset >= grown, "readers saw the log shrink"
        assert node.log.next_offset - grown <= 1100, "a step appended more than about 1 MiB"
        appending += node.log.next_offset > grown
        grown = node.log.next_offset
        assert [node.log.read(o) for o in range(0, len(held), 997)] == held[::997]
        assert node.applied_index == 11, "applied index moved before the restore finished"
    assert appending >= 29, f"30 MiB appended in {appending} steps"
    assert records(node) == expected and node.applied_index == 41
    assert first_store.stat().st_ino == inode, "the prefix the node held was rewritten"
    node.close()


def test_a_log_that_disagrees_with_the_snapshot_is_replaced_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A node whose last record differs from the snapshot's at that offset (it cannot after
    committed applies, but a bug or a copied directory can) is not patched: its log is reset
    to the snapshot's, and the disagreement is logged."""
    whole, sample = _snapshot_of(tmp_path, "leader", 3000, 100)
    node = LogFsm(tmp_path / "node")
    node.apply([Entry(1, 2, EntryType.NORMAL, encode_records_cmd([b"other"] * 100))])
    with caplog.at_level("ERROR", logger="dcl.server.replicated"):
        node.restore(whole)
    assert node.log.next_offset == 3000 and node.applied_index == 100
    assert {o: node.log.read(o) for o in sample} == sample
    assert "disagrees with the leader's snapshot" in caplog.text
    node.close()


@pytest.mark.parametrize("held", ["a prefix", "records that disagree"])
def test_a_restore_cut_short_by_a_crash_is_cut_back_and_done_again(
    tmp_path: Path, held: str
) -> None:
    """Records a restore appended are not vouched for until its end: with checkpoints taken
    between steps (the agent takes one every 2 s, off the loop), a crash after a few steps
    reopens on a consistent state: the old one while the log is kept, nothing applied once
    it was reset. Restoring the same snapshot again ends exactly on the leader's state."""
    snapshot, expected = _leader_snapshot(tmp_path, 40)

    node = LogFsm(tmp_path / "node")
    if held == "a prefix":
        _apply_batches(node, 4, 1024, 1024)
        reopens_at = (5, 4 * 1024)
    else:
        node.apply([Entry(1, 2, EntryType.NORMAL, encode_records_cmd([b"other"] * 100))])
        reopens_at = (0, 0)
    node.checkpoint()
    steps = node.restore_steps(snapshot)
    for _ in range(7):  # 5 checking the framing, then 2 appending
        next(steps)
        node.checkpoint()
    assert node.log.next_offset > reopens_at[1], "the crash should come after some appends"
    node.log.flush()
    node.close()  # crash: the restore never finished

    node = LogFsm(tmp_path / "node")
    assert (node.applied_index, node.log.next_offset) == reopens_at
    node.restore(snapshot)
    assert records(node) == expected and node.applied_index == 41
    node.close()
    node = LogFsm(tmp_path / "node")
    assert node.applied_index == 41 and records(node) == expected
    node.close()


def test_a_restore_updates_the_address_book_its_holders_read(tmp_path: Path) -> None:
    """The Raft transport and the membership reconciler hold the FSM's address dict (the
    transport its `get`): a restore must change that dict, or after it the node dials no
    peer it learns of, such as a new leader."""
    leader = LogFsm(tmp_path / "leader")
    leader.apply([Entry(1, 1, EntryType.NORMAL, encode_address_cmd("n1", "host-1:1")),
                  Entry(1, 2, EntryType.NORMAL, encode_address_cmd("n2", "host-2:2"))])
    *_, data = leader.snapshot_steps()
    assert data is not None
    leader.close()
    node = LogFsm(tmp_path / "node")
    node.addresses["n1"] = "host-1:1"  # learned from the leader's first message
    address_of = node.addresses.get
    node.restore(Snapshot(SnapshotMeta(2, 1, frozenset({"n1", "n2"})), bytes(data)))
    node.apply([Entry(1, 3, EntryType.NORMAL, encode_address_cmd("n3", "host-3:3"))])
    assert [address_of(n) for n in ("n1", "n2", "n3")] == ["host-1:1", "host-2:2", "host-3:3"]
    node.close()


_batches = st.lists(st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=6),
                    min_size=0, max_size=12)


@settings(max_examples=60, deadline=None)
@given(leader_batches=_batches, held=st.integers(min_value=0, max_value=14),
       diverge=st.booleans(), extra=_batches)
def test_any_node_state_ends_on_the_snapshot_and_a_held_prefix_stays_readable(
    leader_batches: list[list[bytes]], held: int, diverge: bool, extra: list[list[bytes]]
) -> None:
    """Model: whatever a node held (a prefix of the leader's entries, a prefix then an entry
    of its own, or more entries than the snapshot), a restore ends with exactly the
    snapshot's records and applied index. When it held a true prefix, every record it held
    reads back unchanged at every step (readers share the log)."""
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        root = Path(d)
        leader = LogFsm(root / "leader")
        for i, values in enumerate(leader_batches):
            leader.apply([Entry(1, 2 + i, EntryType.NORMAL, encode_records_cmd(values))])
        expected = records(leader)
        *_, data = leader.snapshot_steps()
        assert data is not None
        snapshot = Snapshot(SnapshotMeta(len(leader_batches) + 1, 1, frozenset({"a"})),
                            bytes(data))
        leader.close()

        node = LogFsm(root / "node")
        mine = (leader_batches + extra)[:held]
        if diverge and mine:
            mine = [*mine[:-1], [b"not the leader's " + v for v in mine[-1]]]
        for i, values in enumerate(mine):
            node.apply([Entry(1, 2 + i, EntryType.NORMAL, encode_records_cmd(values))])
        before = records(node)
        true_prefix = before == expected[: len(before)]
        with pytest.MonkeyPatch.context() as patch:  # steps of a few records, to look between
            patch.setattr("dcl.server.replicated._RESTORE_RUN_BYTES", 64)
            for _ in node.restore_steps(snapshot):
                if true_prefix:
                    assert records(node)[: len(before)] == before
        assert records(node) == expected
        assert node.applied_index == len(leader_batches) + 1
        node.close()
