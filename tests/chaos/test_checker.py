"""The chaos checker on hand-built histories: each kind of violation must be reported (a checker
that cannot fail proves nothing), and a clean history must pass."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest

from tests.chaos.checker import NodeLog, check
from tests.chaos.disk import cut_store_tail, oversize_index, zero_block
from tests.chaos.history import FAILED, OK, UNKNOWN


def produce(values: list[str], outcome: str = OK, offset: int | None = None,
            invoke: float = 1.0, complete: float = 1.1) -> dict[str, Any]:
    return {"type": "op", "f": "produce", "process": "p0", "batch": len(values) > 1,
            "values": values, "invoke": invoke, "complete": complete, "outcome": outcome,
            "offset": offset if outcome == OK else None, "error": ""}


def read(offset: int, records: list[list[Any]], mode: str = "consume",
         node: str = "n1") -> dict[str, Any]:
    return {"type": "op", "f": "read", "mode": mode, "process": "r0", "node": node,
            "offset": offset, "invoke": 2.0, "complete": 2.1, "outcome": OK,
            "records": records, "error": ""}


def nemesis(fault: str, phase: str, time: float, fault_id: int = 1) -> dict[str, Any]:
    return {"type": "nemesis", "fault": fault, "phase": phase, "time": time, "id": fault_id,
            "nodes": ["n1"]}


#: a, then b+c as one batch, all acknowledged; d's outcome unknown (it landed).
HISTORY = [produce(["a"], offset=0), produce(["b", "c"], offset=1),
           produce(["d"], UNKNOWN), produce(["x"], FAILED)]
GOOD: list[str | None] = ["a", "b", "c", "d"]


def logs(*per_node: Sequence[str | None]) -> dict[str, NodeLog]:
    return {f"n{i}": NodeLog(list(values)) for i, values in enumerate(per_node)}


def kinds(report: Any) -> set[str]:
    return {v.kind for v in report.violations}


def test_a_clean_history_has_no_violations() -> None:
    history = [*HISTORY, read(1, [[1, "b"]]), read(0, [[0, "a"], [1, "b"], [2, "c"]], "stream")]
    report = check(history, logs(GOOD, GOOD, GOOD[:3]))  # a lagging node's prefix is fine
    assert report.violations == []
    assert report.acked_values == 3
    assert report.final_length == 4


def test_an_acknowledged_value_missing_from_a_node_is_lost() -> None:
    report = check(HISTORY, logs(GOOD, ["a", "b"]))
    assert kinds(report) == {"lost"}
    assert "'c'" in report.violations[0].detail


def test_an_acknowledged_value_at_another_offset_is_lost() -> None:
    report = check(HISTORY, logs(["a", "c", "b", "d"]))
    assert kinds(report) == {"lost"}


def test_a_value_appearing_twice_is_a_duplicate() -> None:
    assert kinds(check(HISTORY, logs([*GOOD, "d"]))) == {"duplicate"}
    assert kinds(check(HISTORY, logs([*GOOD, "a"]))) == {"duplicate"}


def test_a_read_of_a_value_the_final_log_does_not_hold_there_is_dirty() -> None:
    assert kinds(check([*HISTORY, read(2, [[2, "zz"]])], logs(GOOD))) == {"dirty_read"}
    assert kinds(check([*HISTORY, read(9, [[9, "a"]])], logs(GOOD))) == {"dirty_read"}


def test_nodes_holding_different_values_at_one_offset_diverge() -> None:
    report = check(HISTORY, logs(GOOD, ["a", "b", "c", "x9"]))
    assert "divergent" in kinds(report)


def test_a_definitely_rejected_or_unknown_value_in_the_log_is_a_phantom() -> None:
    assert kinds(check(HISTORY, logs([*GOOD, "x"]))) == {"phantom"}
    assert kinds(check(HISTORY, logs([*GOOD, "never-sent"]))) == {"phantom"}


def test_two_acks_for_one_offset_are_reported() -> None:
    history = [*HISTORY, produce(["e"], offset=2)]
    assert kinds(check(history, logs(GOOD))) == {"double_ack", "lost"}  # e is nowhere


def test_records_served_at_the_wrong_offset_are_reported() -> None:
    assert kinds(check([*HISTORY, read(1, [[2, "c"]])], logs(GOOD))) == {"stream_gap"}
    assert kinds(check([*HISTORY, read(0, [[0, "a"], [2, "c"]], "stream")],
                       logs(GOOD))) == {"stream_gap"}
    bad = {"n0": NodeLog(GOOD, ["record at position 2 says offset 3"])}
    assert kinds(check(HISTORY, bad)) == {"non_dense"}


def test_a_refused_range_is_counted_not_lost_but_other_nodes_must_hold_it() -> None:
    report = check(HISTORY, logs(GOOD, ["a", None, None, "d"]))
    assert report.violations == []
    assert report.refused == {"n0": 0, "n1": 2}


def test_an_acknowledged_value_every_node_refuses_is_lost() -> None:
    report = check(HISTORY, logs(["a", None, "c", "d"], ["a", None, "c", "d"]))
    assert kinds(report) == {"lost"}


def test_offsets_retention_dropped_are_neither_lost_nor_refused_but_kept_ones_are_checked() -> None:
    cut = {"n0": NodeLog([None, None, "c", "d"], first=2), "n1": NodeLog(list(GOOD))}
    report = check(HISTORY, cut)
    assert report.violations == []
    assert report.refused == {"n0": 0, "n1": 0}
    assert report.first_offsets == {"n0": 2}
    # Every node cut below an acked offset: nothing left to check there, and no loss.
    assert check(HISTORY, {"n0": NodeLog([None, None, "c", "d"], first=2)}).violations == []
    # But a kept offset must still hold its acknowledged value, and a value kept after a cut
    # must not differ from another node's.
    lost = {"n0": NodeLog([None, None, "x9", "d"], first=2), "n1": NodeLog(list(GOOD))}
    assert kinds(check(HISTORY, lost)) == {"lost", "divergent", "phantom"}
    refused = {"n0": NodeLog([None, None, None, "d"], first=2),
               "n1": NodeLog(["a", "b", None, "d"])}
    assert kinds(check(HISTORY, refused)) == {"lost"}


def test_a_node_that_is_not_a_member_is_not_checked() -> None:
    nodes = logs(GOOD)
    nodes["gone"] = NodeLog([], member=False)
    assert check(HISTORY, nodes).violations == []


def test_recovery_and_failover_are_measured_from_the_history() -> None:
    history = [
        nemesis("kill_leader", "start", 10.0), nemesis("kill_leader", "stop", 12.0),
        produce(["a"], offset=0, invoke=9.0, complete=9.1),
        produce(["b"], UNKNOWN, invoke=9.9, complete=11.0),
        produce(["c"], FAILED, invoke=10.2, complete=10.4),
        produce(["d"], offset=1, invoke=10.5, complete=10.8),
        produce(["e"], offset=2, invoke=12.5, complete=12.75),
    ]
    report = check(history, logs(["a", "d", "e"]))
    assert report.violations == []
    assert report.failovers == [pytest.approx(0.8)]
    (window,) = report.windows
    assert window["during"] == {"ok": 1, "failed": 1, "unknown": 0}
    assert window["recovery"] == 0.75
    assert report.faults == {"kill_leader": 1}


# --------------------------------------------------------------------------- disk faults


def _segment(directory: Any, base: int, records: list[bytes]) -> None:
    import struct
    import zlib

    directory.mkdir(parents=True, exist_ok=True)
    store, index, pos = bytearray(), bytearray(), 0
    for i, payload in enumerate(records):
        index += struct.pack(">IQ", i, pos)
        frame = struct.pack(">QI", len(payload), zlib.crc32(payload)) + payload
        store += frame
        pos += len(frame)
    (directory / f"{base:020d}.store").write_bytes(bytes(store))
    (directory / f"{base:020d}.index").write_bytes(bytes(index))


def test_the_store_tail_is_cut_only_past_the_checkpoint(tmp_path: Any) -> None:
    import json
    import struct
    import zlib

    commitlog = tmp_path / "fsm" / "commitlog"
    _segment(commitlog, 0, [b"r%d" % i for i in range(10)])
    _segment(commitlog, 10, [b"s%d" % i for i in range(10)])
    body = json.dumps({"applied": 5, "next_offset": 14, "addresses": {}}).encode()
    (tmp_path / "fsm" / "fsm.checkpoint").write_bytes(struct.pack(">I", zlib.crc32(body)) + body)
    synced = 4 * (12 + 2)
    for seed in range(20):
        (commitlog / f"{10:020d}.store").write_bytes(b"".join(
            struct.pack(">QI", 2, zlib.crc32(b"s%d" % i)) + b"s%d" % i for i in range(10)))
        detail = cut_store_tail(tmp_path, random.Random(seed))
        assert detail is not None and detail["synced"] == synced
        assert synced <= (commitlog / f"{10:020d}.store").stat().st_size < 140


def test_zero_block_touches_only_closed_segments_and_oversize_appends(tmp_path: Any) -> None:
    commitlog = tmp_path / "fsm" / "commitlog"
    _segment(commitlog, 0, [b"r%03d" % i for i in range(20)])
    assert zero_block(tmp_path, random.Random(1)) is None  # only the active segment: nothing
    _segment(commitlog, 20, [b"s%03d" % i for i in range(20)])
    detail = zero_block(tmp_path, random.Random(1))
    assert detail is not None and "00000000000000000000" in detail["file"]
    before = sum(p.stat().st_size for p in commitlog.glob("*.index"))
    grown = oversize_index(tmp_path, random.Random(3))
    assert grown is not None and grown["appended"] > 0
    assert sum(p.stat().st_size for p in commitlog.glob("*.index")) == before + grown["appended"]
