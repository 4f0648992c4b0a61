"""Leader election (Raft §5.2, §5.4.1) and restart from persisted state."""

from __future__ import annotations

import random

import pytest

from dcl.errors import NotLeader
from dcl.raft.core import RaftNode
from dcl.raft.types import (
    Config,
    EntryType,
    HardState,
    RequestVote,
    Role,
    VoteResponse,
)
from tests.unit.raft.cluster import Cluster, role_of, with_config

NO_PREVOTE = with_config(pre_vote=False, check_quorum=False)


def test_bootstrap_writes_identical_committed_conf_entries_at_term_1() -> None:
    c = Cluster(["a", "b", "c"])
    for n in c.nodes.values():
        assert n.term == 1
        assert n.commit_index == 3
        assert n.voters == {"a", "b", "c"}
        assert [e.type for e in n.entries(1, 4)] == [EntryType.CONF_CHANGE] * 3
        assert n.role is Role.FOLLOWER
    c.stabilize()
    assert c.storage["a"].hard_state == HardState(1, None, 3)
    assert len(c.storage["a"].entries) == 3


def test_election_timeout_is_randomized_in_election_tick_to_twice() -> None:
    class Fixed:
        def __init__(self, value: int) -> None:
            self.value = value
            self.calls: list[tuple[int, int]] = []

        def randint(self, a: int, b: int) -> int:
            self.calls.append((a, b))
            return self.value

    rng = Fixed(17)
    n = RaftNode("a", Config(election_tick=10, pre_vote=False), rng, bootstrap_voters=["a", "b"])
    assert rng.calls[-1] == (10, 19)
    for _ in range(16):
        n.tick()
    assert n.role is Role.FOLLOWER
    n.tick()
    assert role_of(n) is Role.CANDIDATE


def test_follower_becomes_candidate_and_requests_votes_after_timeout() -> None:
    c = Cluster(["a", "b", "c"], config=NO_PREVOTE)
    c.stabilize()
    a = c.nodes["a"]
    c.tick("a", 20)
    assert a.role is Role.CANDIDATE
    assert a.term == 2
    assert a.vote == "a"
    out = c.take("a")
    assert {(type(m), m.dst, m.term) for m in out} == {(RequestVote, "b", 2), (RequestVote, "c", 2)}


def test_candidate_with_majority_becomes_leader_and_appends_noop() -> None:
    c = Cluster(["a", "b", "c"], config=NO_PREVOTE)
    a = c.elect("a")
    assert a.term == 2
    assert a.leader_id == "a"
    noop = a.entry(4)
    assert noop is not None
    assert noop.type is EntryType.NOOP and noop.term == 2
    assert all(n.commit_index == 4 for n in c.nodes.values())
    assert all(n.leader_id == "a" for n in c.nodes.values())


def test_node_votes_at_most_once_per_term() -> None:
    c = Cluster(["a", "b", "c"], config=NO_PREVOTE)
    c.stabilize()
    b = c.nodes["b"]
    b.step(RequestVote(2, "a", "b", 3, 1))
    b.step(RequestVote(2, "c", "b", 3, 1))
    out = c.take("b")
    assert [(m.dst, m.granted) for m in out if isinstance(m, VoteResponse)] == [
        ("a", True),
        ("c", False),
    ]
    assert c.storage["b"].hard_state.vote == "a"


def test_voter_rejects_candidate_with_less_up_to_date_log() -> None:
    c = Cluster(["a", "b", "c"], config=NO_PREVOTE)
    c.elect("a")
    c.nodes["a"].propose(b"x")
    c.stabilize()
    b = c.nodes["b"]
    # Candidate c' with an older last term.
    b.step(RequestVote(5, "c", "b", 10, 1))
    out = c.take("b")
    assert [m.granted for m in out if isinstance(m, VoteResponse)] == [False]
    # Same last term but shorter log.
    b.step(RequestVote(6, "c", "b", 4, 2))
    out = c.take("b")
    assert [m.granted for m in out if isinstance(m, VoteResponse)] == [False]
    # Same last term, at least as long: granted.
    b.step(RequestVote(7, "c", "b", 5, 2))
    out = c.take("b")
    assert [m.granted for m in out if isinstance(m, VoteResponse)] == [True]


def test_node_with_higher_term_message_steps_down_to_follower() -> None:
    c = Cluster(["a", "b", "c"], config=NO_PREVOTE)
    a = c.elect("a")
    a.step(VoteResponse(9, "b", "a", False))
    assert a.role is Role.FOLLOWER
    assert a.term == 9
    assert a.vote is None


def test_candidate_steps_down_when_majority_rejects() -> None:
    c = Cluster(["a", "b", "c"], config=NO_PREVOTE)
    c.stabilize()
    a = c.nodes["a"]
    c.tick("a", 20)
    assert a.role is Role.CANDIDATE
    a.step(VoteResponse(a.term, "b", "a", False))
    a.step(VoteResponse(a.term, "c", "a", False))
    assert role_of(a) is Role.FOLLOWER


def test_split_votes_are_resolved_by_later_elections() -> None:
    c = Cluster(["a", "b", "c", "d", "e"], config=NO_PREVOTE, seed=7)
    for _ in range(200):
        c.tick()
        c.stabilize()
        if c.leader() is not None:
            break
    leader = c.leader()
    assert leader is not None
    assert sum(n.role is Role.LEADER for n in c.nodes.values()) == 1


def test_single_node_cluster_elects_itself_and_commits_after_persist() -> None:
    c = Cluster(["a"])
    a = c.nodes["a"]
    c.tick("a", 20)
    assert a.role is Role.LEADER
    _term, index = a.propose(b"x")
    assert a.commit_index < index  # not persisted yet
    c.stabilize()
    assert a.commit_index == index
    assert c.fsm("a") == [b"x"]


def test_propose_on_follower_raises_not_leader_with_hint() -> None:
    c = Cluster(["a", "b", "c"])
    c.elect("a")
    with pytest.raises(NotLeader) as err:
        c.nodes["b"].propose(b"x")
    assert err.value.leader_id == "a"


def test_restart_restores_term_vote_log_and_commit() -> None:
    c = Cluster(["a", "b", "c"], config=NO_PREVOTE)
    c.elect("a")
    for i in range(5):
        c.nodes["a"].propose(b"%d" % i)
    c.stabilize()
    b = c.crash("b")
    assert b.term == 2
    assert b.last_index == 9
    assert b.commit_index >= 4
    assert b.role is Role.FOLLOWER
    assert b.voters == {"a", "b", "c"}
    c.tick("a", 1)
    c.stabilize()
    assert c.fsm("b") == [b"0", b"1", b"2", b"3", b"4"]


def test_restarted_node_does_not_vote_twice_in_a_term() -> None:
    c = Cluster(["a", "b", "c"], config=NO_PREVOTE)
    c.stabilize()
    b = c.nodes["b"]
    b.step(RequestVote(2, "a", "b", 3, 1))
    c.process("b")
    b = c.crash("b")
    b.step(RequestVote(2, "c", "b", 3, 1))
    out = c.take("b")
    assert [m.granted for m in out if isinstance(m, VoteResponse)] == [False]


def test_crash_before_persist_loses_unsent_vote_safely() -> None:
    c = Cluster(["a", "b", "c"], config=NO_PREVOTE)
    c.stabilize()
    b = c.nodes["b"]
    b.step(RequestVote(2, "a", "b", 3, 1))
    # Crash before the Ready was processed: neither the vote nor its response exist.
    b = c.crash("b")
    assert b.vote is None and b.term == 1
    b.step(RequestVote(2, "c", "b", 3, 1))
    out = c.take("b")
    assert [m.granted for m in out if isinstance(m, VoteResponse)] == [True]


def test_rng_is_the_only_randomness_source() -> None:
    def run(seed: int) -> list[str]:
        c = Cluster(["a", "b", "c"], seed=seed)
        out = []
        for _ in range(100):
            c.tick()
            c.stabilize()
            out.append("".join(n.role.value[0] for n in c.nodes.values()))
        return out

    assert run(3) == run(3)
    assert random.Random(3).randint(0, 9) == random.Random(3).randint(0, 9)


def test_status_reports_leader_view_with_progress() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    s = a.status()
    assert (s.id, s.role, s.term, s.leader_id, s.commit_index) == ("a", Role.LEADER, 2, "a", 4)
    assert (s.first_index, s.last_index, s.last_term, s.applied_index) == (1, 4, 2, 4)
    assert set(s.progress) == {"b", "c"}
    assert all(p.match == 4 for p in s.progress.values())
    assert c.nodes["b"].status().progress == {}
