"""Log compaction and InstallSnapshot streamed in chunks (Raft §7, thesis §5)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dcl.errors import InvalidRequest
from dcl.raft.core import RetainedEntries
from dcl.raft.types import (
    AppendEntries,
    AppendResponse,
    ConfChange,
    ConfChangeType,
    Config,
    Entry,
    InstallSnapshot,
    ProgressState,
    Snapshot,
    SnapshotMeta,
    SnapshotResponse,
)
from tests.unit.raft.cluster import Cluster, fsm_snapshot, with_config


def compact(c: Cluster, nid: str) -> Snapshot:
    n = c.nodes[nid]
    st = c.storage[nid]
    n.compact(n.applied_index, fsm_snapshot(st.fsm))
    snap = n.snapshot
    assert snap is not None
    st.snapshot = snap
    st.entries = [e for e in st.entries if e.index > snap.meta.index]
    return snap


def test_compact_drops_entries_and_records_membership_at_index() -> None:
    c = Cluster(["a", "b", "c"], joiners=["d"])
    a = c.elect("a")
    a.propose_batch([b"1", b"2"])
    c.stabilize()
    snap = compact(c, "a")
    assert snap.meta == SnapshotMeta(6, 2, frozenset("abc"), frozenset())
    assert a.first_index == 7
    assert a.term_at(6) == 2 and a.term_at(5) is None and a.entry(6) is None
    a.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "d"))
    c.stabilize()
    assert a.learners == {"d"}


def test_compact_beyond_applied_is_refused() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    a.propose(b"x")
    with pytest.raises(InvalidRequest):
        a.compact(a.last_index, b"")


def test_lagging_follower_receives_snapshot_in_chunks_then_entries() -> None:
    c = Cluster(["a", "b", "c"], config=with_config(snapshot_chunk_size=4))
    a = c.elect("a")
    c.isolate("c")
    a.propose_batch([b"one", b"two", b"three"])
    c.stabilize()
    snap = compact(c, "a")
    a.propose(b"four")
    c.stabilize()
    c.heal()
    c.tick("a")
    c.stabilize()
    chunks = [m for m in c.sent if isinstance(m, InstallSnapshot)]
    assert len(chunks) == -(-len(snap.data) // 4)
    assert all(len(m.data) <= 4 for m in chunks)
    assert [m.offset for m in chunks] == list(range(0, len(snap.data), 4))
    assert [m.done for m in chunks][-1] is True and not any(m.done for m in chunks[:-1])
    assert c.installed["c"] == [snap]
    assert c.fsm("c") == [b"one", b"two", b"three", b"four"]
    cn = c.nodes["c"]
    assert cn.first_index == snap.meta.index + 1
    assert a.progress()["c"].state is ProgressState.REPLICATE
    assert a.progress()["c"].match == a.last_index


def test_a_held_snapshot_may_be_swapped_for_an_identical_copy_only() -> None:
    """The driver swaps the core's snapshot for the storage's file-mapped copy; a copy of
    another snapshot must never replace it, and a follower gets the same bytes either way."""
    c = Cluster(["a", "b", "c"], config=with_config(snapshot_chunk_size=4))
    a = c.elect("a")
    c.isolate("c")
    a.propose_batch([b"one", b"two"])
    c.stabilize()
    snap = compact(c, "a")
    other = SnapshotMeta(snap.meta.index - 1, snap.meta.term, snap.meta.voters)
    a.use_snapshot_copy(Snapshot(other, snap.data))
    a.use_snapshot_copy(Snapshot(snap.meta, b"short"))
    assert a.snapshot is snap
    copy = Snapshot(snap.meta, memoryview(bytes(snap.data)))
    a.use_snapshot_copy(copy)
    assert a.snapshot is copy
    c.heal()
    c.tick("a")
    c.stabilize()
    assert c.installed["c"] == [snap]
    assert c.fsm("c") == [b"one", b"two"]


def test_lost_snapshot_chunk_is_resent_on_heartbeat() -> None:
    c = Cluster(["a", "b", "c"], config=with_config(snapshot_chunk_size=3))
    a = c.elect("a")
    c.isolate("c")
    a.propose_batch([b"abc", b"def"])
    c.stabilize()
    compact(c, "a")
    c.heal()
    dropped: list[InstallSnapshot] = []

    def drop_second_chunk(m: object) -> bool:
        if isinstance(m, InstallSnapshot) and m.offset == 3 and not dropped:
            dropped.append(m)
            return True
        return False

    c.drop = drop_second_chunk
    c.tick("a")
    c.stabilize()
    assert dropped
    assert a.progress()["c"].state is ProgressState.SNAPSHOT
    c.tick("a")
    c.stabilize()
    assert c.fsm("c") == [b"abc", b"def"]


def test_follower_only_installs_after_the_last_chunk() -> None:
    c = Cluster(["a", "b", "c"])
    c.elect("a")
    b = c.nodes["b"]
    meta = SnapshotMeta(50, 2, frozenset("abc"))
    b.step(InstallSnapshot(2, "a", "b", meta, 0, b"ab", False))
    rd = b.ready()
    assert rd.snapshot is None
    assert rd.messages == (SnapshotResponse(2, "b", "a", 50, 2),)
    b.advance(rd)
    b.step(InstallSnapshot(2, "a", "b", meta, 5, b"zz", False))  # out of order
    assert b.ready().messages == (SnapshotResponse(2, "b", "a", 50, 2),)
    b.step(InstallSnapshot(2, "a", "b", meta, 2, b"cd", True))
    rd = b.ready()
    assert rd.snapshot == Snapshot(meta, b"abcd")
    assert rd.messages == (SnapshotResponse(2, "b", "a", 50, 0, True),)
    assert b.commit_index == 50 and b.last_index == 50 and b.first_index == 51
    b.advance(rd)


def test_snapshot_already_covered_by_commit_is_acknowledged_not_installed() -> None:
    c = Cluster(["a", "b", "c"])
    c.elect("a")
    b = c.nodes["b"]
    meta = SnapshotMeta(3, 1, frozenset("abc"))
    b.step(InstallSnapshot(2, "a", "b", meta, 0, b"", True))
    rd = b.ready()
    assert rd.snapshot is None
    assert rd.messages == (SnapshotResponse(2, "b", "a", 3, 0, True),)


def test_restart_from_snapshot_and_log_suffix() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    a.propose_batch([b"1", b"2"])
    c.stabilize()
    compact(c, "b")
    a.propose(b"3")
    c.stabilize()
    b = c.crash("b")
    assert b.first_index == 7
    assert b.voters == {"a", "b", "c"}
    assert b.last_index == 7
    c.tick("a")
    c.stabilize()
    assert c.fsm("b") == [b"1", b"2", b"3"]


# -- entries retained below the snapshot (RaftStorage's retention) ---------------------------


def retained_source(kept: list[Entry], asked: list[int]) -> RetainedEntries:
    """What RaftStorage.retained answers from a log that still holds `kept`."""
    def retained(prev: int, max_entries: int, max_bytes: int) -> tuple[int, list[Entry]] | None:
        asked.append(prev)
        by_index = {e.index: e for e in kept}
        if prev not in by_index or prev + 1 not in by_index:
            return None
        stop = prev + 1 + max_entries
        return by_index[prev].term, [by_index[i] for i in range(prev + 1, stop) if i in by_index]

    return retained


def leader_compacted_past_c(
    source: Callable[[list[Entry]], RetainedEntries], config: Config | None = None
) -> tuple[Cluster, Snapshot]:
    """a leads, c missed five entries, a compacted past them and kept its log on disk
    (`source(kept)` reads it, as RaftStorage.retained would)."""
    c = Cluster(["a", "b", "c"], config=config)
    kept: list[Entry] = []
    c.crash("a", source(kept))  # a fresh start, with the source
    c.elect("a")
    c.isolate("c")
    c.nodes["a"].propose_batch([b"1", b"2", b"3", b"4", b"5"])
    c.stabilize()
    kept.extend(c.storage["a"].entries)
    snap = compact(c, "a")
    assert c.nodes["c"].last_index < snap.meta.index
    return c, snap


def test_a_follower_behind_the_snapshot_gets_retained_entries_not_the_snapshot() -> None:
    asked: list[int] = []
    c, snap = leader_compacted_past_c(
        lambda kept: retained_source(kept, asked),
        with_config(max_entries_per_msg=2, max_inflight_retained=1))
    a = c.nodes["a"]
    a.propose(b"6")
    c.heal()
    c.tick("a")
    c.stabilize()
    assert not [m for m in c.sent if isinstance(m, InstallSnapshot)]
    assert c.installed["c"] == []
    assert c.fsm("c") == [b"1", b"2", b"3", b"4", b"5", b"6"]
    assert asked and min(asked) < snap.meta.index
    from_disk = [m for m in c.sent if isinstance(m, AppendEntries) and m.dst == "c"
                 and m.entries and m.entries[0].index <= snap.meta.index]
    assert from_disk and all(len(m.entries) <= 2 for m in from_disk)
    assert all(m.entries[-1].index <= snap.meta.index for m in from_disk), \
        "storage serves only up to the snapshot; the rest comes from memory"
    assert a.progress()["c"].match == a.last_index


@pytest.mark.parametrize("answer", ["none", "wrong-start", "beyond-snapshot", "empty"])
def test_a_retained_source_that_cannot_help_falls_back_to_the_snapshot(answer: str) -> None:
    def source(kept: list[Entry]) -> RetainedEntries:
        def retained(
            prev: int, max_entries: int, max_bytes: int
        ) -> tuple[int, list[Entry]] | None:
            # Right term for `prev`: the only defect is the one under test.
            term = next(e.term for e in kept if e.index == prev)
            after = [e for e in kept if e.index > prev]
            if answer == "none":
                return None
            if answer == "wrong-start":
                return term, after[1:]
            if answer == "beyond-snapshot":
                last = after[-1]
                return term, [*after, Entry(last.term, last.index + 1, last.type, b"?")]
            return term, []
        return retained

    c, snap = leader_compacted_past_c(source)
    c.heal()
    c.tick("a")
    c.stabilize()
    assert c.installed["c"] and c.installed["c"][-1].meta.index >= snap.meta.index
    assert c.fsm("c") == [b"1", b"2", b"3", b"4", b"5"]


def test_lost_answers_to_a_full_retained_pipeline_are_recovered_by_a_heartbeat() -> None:
    """The pipeline from storage holds fewer appends than the one from memory; when the
    answers to all of them are lost, the next heartbeat answer must still free a slot."""
    asked: list[int] = []
    c, snap = leader_compacted_past_c(
        lambda kept: retained_source(kept, asked),
        with_config(max_entries_per_msg=1, max_inflight_retained=2))
    a = c.nodes["a"]
    lost: list[AppendResponse] = []

    def lose_acks_after_the_probe(m: object) -> bool:
        if isinstance(m, AppendResponse) and m.src == "c" and not m.reject and (
            a.progress()["c"].state is ProgressState.REPLICATE
        ):
            lost.append(m)
            return True
        return False

    c.drop = lose_acks_after_the_probe
    c.heal()
    c.tick("a")
    c.stabilize()
    pr = a.progress()["c"]
    assert lost and pr.state is ProgressState.REPLICATE and pr.inflight == 2
    assert pr.match < snap.meta.index, "stuck behind the snapshot, reading from storage"
    c.drop = lambda m: False
    c.tick("a")  # one heartbeat round
    c.stabilize()
    assert c.installed["c"] == []
    assert c.fsm("c") == [b"1", b"2", b"3", b"4", b"5"]
