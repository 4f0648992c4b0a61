"""LogFsm snapshots built step by step while the node keeps applying (as the driver does).

The state is captured when `snapshot_steps()` is called; entries applied between steps
append past the captured end and must not leak into the snapshot, or a follower restoring
it would hold records its Raft log also replays (offsets twice).
"""

from __future__ import annotations

from pathlib import Path

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
