"""Each fault-injection flag breaks exactly the rule it names (used to test the simulator)."""

from __future__ import annotations

from dcl.raft.types import (
    AppendEntries,
    AppendResponse,
    Config,
    Entry,
    Mutations,
    RequestVote,
    VoteResponse,
)
from tests.unit.raft.cluster import Cluster


def mutated(**flags: bool) -> Config:
    return Config(election_tick=10, mutations=Mutations(**flags))


def test_all_mutations_are_off_by_default() -> None:
    m = Mutations()
    assert not any(getattr(m, f) for f in m.__dataclass_fields__)


def test_skip_log_up_to_date_check_grants_vote_to_stale_candidate() -> None:
    c = Cluster(["a", "b", "c"], config=mutated(skip_log_up_to_date_check=True))
    c.elect("a")
    c.tick("b", 20)
    c.take("b")
    c.nodes["b"].step(RequestVote(9, "c", "b", 1, 1))
    out = c.take("b")
    assert [m.granted for m in out if isinstance(m, VoteResponse)] == [True]


def test_skip_persist_vote_leaves_vote_out_of_hard_state() -> None:
    c = Cluster(["a", "b", "c"], config=mutated(skip_persist_vote=True))
    c.stabilize()
    c.nodes["b"].step(RequestVote(2, "a", "b", 3, 1))
    c.process("b")
    assert c.nodes["b"].vote == "a"
    assert c.storage["b"].hard_state.vote is None


def test_skip_term_check_on_append_accepts_mismatched_prev_term() -> None:
    c = Cluster(["a", "b", "c"], config=mutated(skip_term_check_on_append=True))
    c.elect("a")
    b = c.nodes["b"]
    b.step(AppendEntries(2, "a", "b", 4, 1, (Entry(2, 5),), 4))
    assert b.last_index == 5


def test_count_unpersisted_self_commits_before_the_leader_fsync() -> None:
    c = Cluster(["a", "b", "c"], config=mutated(count_unpersisted_self=True))
    a = c.elect("a")
    _, index = a.propose(b"x")
    a.step(AppendResponse(2, "b", "a", index))
    assert a.commit_index == index
