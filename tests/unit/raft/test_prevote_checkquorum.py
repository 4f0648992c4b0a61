"""Pre-vote (thesis §9.6) and check-quorum / leader lease (thesis §6.2, §4.2.3)."""

from __future__ import annotations

from dcl.raft.types import RequestVote, Role, VoteResponse
from tests.unit.raft.cluster import Cluster, role_of, with_config


def test_pre_candidate_does_not_increment_term() -> None:
    c = Cluster(["a", "b", "c"])
    c.stabilize()
    a = c.nodes["a"]
    c.tick("a", 20)
    assert a.role is Role.PRE_CANDIDATE
    assert a.term == 1
    assert a.vote is None
    out = c.take("a")
    assert {(m.dst, m.term, m.pre_vote) for m in out if isinstance(m, RequestVote)} == {
        ("b", 2, True),
        ("c", 2, True),
    }


def test_pre_vote_quorum_starts_a_real_election() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    assert a.term == 2
    # Voters did not change term for the pre-vote, only for the real vote.
    assert [m.term for m in c.sent if isinstance(m, VoteResponse) and m.pre_vote] == [2, 2]


def test_partitioned_node_with_pre_vote_does_not_bump_terms_or_disrupt() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    c.isolate("c")
    for _ in range(100):
        c.tick()
        c.stabilize()
    cn = c.nodes["c"]
    assert cn.term == 2  # stuck in pre-vote: never bumped its term
    assert cn.role is Role.PRE_CANDIDATE
    c.heal()
    for _ in range(5):
        c.tick()
        c.stabilize()
    assert a.role is Role.LEADER and a.term == 2
    assert role_of(cn) is Role.FOLLOWER and cn.leader_id == "a"


def test_without_pre_vote_partitioned_node_disrupts_the_leader_on_rejoin() -> None:
    c = Cluster(["a", "b", "c"], config=with_config(pre_vote=False, check_quorum=False))
    a = c.elect("a")
    c.isolate("c")
    for _ in range(40):
        c.tick("c")
        c.stabilize()
    assert c.nodes["c"].term > 2
    c.heal()
    c.tick("a")
    c.stabilize()
    assert a.role is Role.FOLLOWER


def test_pre_vote_rejected_for_stale_log() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    a.propose(b"x")
    c.stabilize()
    b = c.nodes["b"]
    c.tick("b", 20)  # lease expired
    c.take("b")
    b.step(RequestVote(3, "c", "b", 4, 2, pre_vote=True))
    out = c.take("b")
    assert [(m.granted, m.term) for m in out if isinstance(m, VoteResponse)] == [(False, b.term)]


def test_leader_steps_down_when_it_cannot_reach_a_quorum() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    c.isolate("a")
    for _ in range(9):
        c.tick("a")
        c.stabilize()
    assert a.role is Role.LEADER
    for _ in range(12):
        c.tick("a")
        c.stabilize()
    assert role_of(a) is Role.FOLLOWER
    assert a.term == 2


def test_leader_with_quorum_stays_leader_under_check_quorum() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    c.isolate("c")
    for _ in range(50):
        c.tick()
        c.stabilize()
    assert a.role is Role.LEADER
    assert a.term == 2


def test_follower_in_lease_ignores_vote_requests_with_higher_term() -> None:
    c = Cluster(["a", "b", "c"])
    c.elect("a")
    b = c.nodes["b"]
    b.step(RequestVote(9, "c", "b", 100, 9))
    assert b.term == 2
    assert c.take("b") == []
    # After an election timeout without hearing from the leader, it is considered.
    c.tick("b", 10)
    c.take("b")
    b.step(RequestVote(9, "c", "b", 100, 9))
    assert b.term == 9


def test_heard_recently_survives_a_window_reset_and_lapses_two_windows_after_silence() -> None:
    c = Cluster(["a", "b", "c"])  # election_tick 10: check-quorum windows of 10 ticks
    a = c.elect("a")
    for _ in range(10):  # exactly one window boundary passes; b answered before it
        c.tick()
        c.stabilize()
    assert a.progress()["b"].heard_recently
    c.isolate("b")
    for _ in range(10):  # the next window: b silent, but heard in the previous one
        c.tick()
        c.stabilize()
    assert a.progress()["b"].heard_recently and not a.progress()["b"].recent_active
    for _ in range(10):
        c.tick()
        c.stabilize()
    assert not a.progress()["b"].heard_recently
    assert a.progress()["c"].heard_recently and a.role is Role.LEADER
