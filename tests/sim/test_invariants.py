"""The checker itself: each invariant fires on a hand-made history that breaks it, and stays
quiet on the legal look-alikes that a naive check would flag."""

from __future__ import annotations

from tests.sim.invariants import InvariantChecker, LogEntry
from tests.sim.node import decode_state, encode_state


def entry(index: int, term: int, data: bytes = b"x", kind: str = "normal") -> LogEntry:
    return LogEntry(index, term, kind, data)


def test_two_leaders_in_one_term_break_election_safety() -> None:
    checker = InvariantChecker()
    checker.check_leader_role("n1", 3)
    checker.check_leader_role("n2", 4)
    assert checker.ok
    checker.check_leader_role("n2", 3)
    assert "election safety" in checker.violations[0]


def test_same_index_and_term_with_different_data_breaks_log_matching() -> None:
    checker = InvariantChecker()
    checker.on_persist("n1", [entry(1, 1, b"a"), entry(2, 1, b"b")], 0)
    checker.on_persist("n2", [entry(1, 1, b"a"), entry(2, 1, b"b")], 0)
    assert checker.ok
    checker.on_persist("n3", [entry(2, 1, b"other")], 1)
    assert "log matching" in checker.violations[0]


def test_same_entry_after_a_different_predecessor_breaks_log_matching() -> None:
    checker = InvariantChecker()
    checker.on_persist("n1", [entry(5, 3)], 2)
    checker.on_persist("n2", [entry(5, 3)], 1)
    assert "log matching" in checker.violations[0]


def test_different_payloads_applied_at_one_position_break_state_machine_safety() -> None:
    checker = InvariantChecker()
    checker.on_applied_state("n1", 1, [b"a", b"b"], 1)
    checker.on_applied_state("n2", 1, [b"a"], 1)
    assert checker.ok
    checker.on_applied_state("n2", 2, [b"c"], 1)
    assert "state-machine safety" in checker.violations[0]


def test_acknowledged_write_replaced_is_reported_lost() -> None:
    checker = InvariantChecker()
    checker.on_acknowledged(4, b"w")
    checker.on_applied_state("n1", 4, [b"w"], 2)
    assert checker.ok
    checker.on_applied_state("n2", 4, [b"not-w"], 2)
    assert any("lost acknowledged write" in v for v in checker.violations)


def test_leader_missing_an_earlier_committed_entry_breaks_completeness() -> None:
    checker = InvariantChecker()
    checker.on_committed("n1", [entry(1, 1, b"a"), entry(2, 2, b"b")], 2)
    checker.on_became_leader("n2", 3, {1: (1, b"a"), 2: (2, b"b")}, 0)
    assert checker.ok
    checker.on_became_leader("n3", 4, {1: (1, b"a")}, 0)
    assert "leader completeness" in checker.violations[0]


def test_late_leader_of_an_older_term_need_not_hold_newer_commits() -> None:
    """A candidate whose vote grants arrive late wins an old term; entries committed in later
    terms are not owed to it."""
    checker = InvariantChecker()
    checker.on_committed("n1", [entry(7, 5, b"new")], 5)
    checker.on_became_leader("n2", 4, {}, 0)
    assert checker.ok


def test_compacted_committed_entries_do_not_count_as_missing() -> None:
    checker = InvariantChecker()
    checker.on_committed("n1", [entry(1, 1), entry(2, 1)], 1)
    checker.on_became_leader("n2", 2, {}, 2)
    assert checker.ok


def test_commit_index_going_back_is_reported_unless_the_node_restarted() -> None:
    checker = InvariantChecker()
    checker.check_commit("n1", 5)
    checker.on_restart("n1", 2)
    checker.check_commit("n1", 2)
    assert checker.ok
    checker.check_commit("n1", 1)
    assert "went back" in checker.violations[0]


def test_read_index_below_an_acknowledged_write_is_not_linearizable() -> None:
    checker = InvariantChecker()
    checker.on_acknowledged(10, b"w")
    checker.on_read_issued(1, "n1", 0)
    checker.on_read_state(1, "n1", 10)
    assert checker.ok
    checker.on_read_issued(2, "n1", 0)
    checker.on_read_state(2, "n1", 9)
    assert "linearizable read" in checker.violations[0]


def test_leader_proposing_a_change_while_another_is_uncommitted_is_reported() -> None:
    checker = InvariantChecker()
    inherited = [entry(5, 2, kind="conf"), entry(6, 2, kind="conf")]
    checker.check_pending_conf("n1", 3, 4, inherited)
    assert checker.ok, "inherited changes may still be committed elsewhere"
    checker.check_pending_conf("n1", 3, 4, [*inherited, entry(7, 3, kind="conf")])
    assert "membership" in checker.violations[0]


def test_snapshot_state_round_trips() -> None:
    state = [b"", b"\x00abc", b"\x02\x00\x00\x02n1" * 3]
    assert decode_state(encode_state(state)) == state
