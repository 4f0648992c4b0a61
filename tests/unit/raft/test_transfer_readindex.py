"""Leadership transfer (thesis §3.10) and ReadIndex linearizable reads (thesis §6.4)."""

from __future__ import annotations

import pytest

from dcl.errors import NotLeader
from dcl.raft.types import (
    AppendEntries,
    Config,
    Heartbeat,
    Mutations,
    ProposalDropped,
    ReadState,
    RequestVote,
    Role,
    TimeoutNow,
)
from tests.unit.raft.cluster import Cluster, with_config


def test_transfer_to_up_to_date_follower_sends_timeout_now_and_target_wins() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    a.transfer_leadership("b")
    out = c.take("a")
    assert TimeoutNow(2, "a", "b") in out
    c.queue.extend(out)
    c.stabilize()
    b = c.nodes["b"]
    assert b.role is Role.LEADER and b.term == 3
    assert a.role is Role.FOLLOWER and a.leader_id == "b"
    # The target skipped pre-vote and voters honoured it despite their leader lease.
    assert any(isinstance(m, RequestVote) and m.transfer and not m.pre_vote for m in c.sent)


def test_transfer_catches_target_up_before_timeout_now() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    c.isolate("b")
    a.propose_batch([b"1", b"2"])
    c.stabilize()
    c.heal()
    a.transfer_leadership("b")
    out = c.take("a")
    assert not any(isinstance(m, TimeoutNow) for m in out)
    assert any(isinstance(m, AppendEntries) and m.dst == "b" for m in out)
    c.queue.extend(out)
    c.stabilize()
    assert c.nodes["b"].role is Role.LEADER
    assert c.fsm("b")[:2] == [b"1", b"2"]


def test_leader_refuses_proposals_during_transfer() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    c.isolate("b")
    a.transfer_leadership("b")
    with pytest.raises(ProposalDropped):
        a.propose(b"x")


def test_transfer_is_aborted_after_an_election_timeout() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    c.isolate("b")
    a.transfer_leadership("b")
    assert a.transferee == "b"
    for _ in range(10):
        c.tick("a")
        c.stabilize()
    assert a.transferee is None
    assert a.role is Role.LEADER
    a.propose(b"x")


def test_transfer_to_non_voter_is_rejected() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    with pytest.raises(Exception, match="non-voter"):
        a.transfer_leadership("zz")


def test_read_index_waits_for_a_quorum_heartbeat_round() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    a.propose(b"x")
    c.stabilize()
    a.read_index(7)
    out = c.take("a")
    hbs = [m for m in out if isinstance(m, Heartbeat)]
    assert len(hbs) == 2 and all(m.context == 1 for m in hbs)
    assert not c.read_states["a"]
    # One acknowledgement (plus the leader itself) is a quorum of three.
    c.nodes["b"].step(hbs[0] if hbs[0].dst == "b" else hbs[1])
    for m in c.take("b"):
        a.step(m)
    c.process("a")
    assert c.read_states["a"] == [ReadState(7, 5)]


def test_read_index_before_first_commit_in_term_waits_for_it() -> None:
    c = Cluster(["a", "b", "c"])
    c.drop = lambda m: isinstance(m, AppendEntries)
    a = c.elect("a")
    a.read_index(1)
    c.stabilize()
    assert not c.read_states["a"]
    c.drop = lambda m: False
    c.tick("a")
    c.stabilize()
    assert c.read_states["a"] == [ReadState(1, 4)]


def test_read_index_on_partitioned_leader_never_answers() -> None:
    c = Cluster(["a", "b", "c"], config=with_config(check_quorum=False))
    a = c.elect("a")
    c.isolate("a")
    a.read_index(1)
    for _ in range(5):
        c.tick("a")
        c.stabilize()
    assert not c.read_states["a"]


def test_read_index_mutation_answers_without_quorum() -> None:
    cfg = Config(mutations=Mutations(read_index_without_quorum=True))
    c = Cluster(["a", "b", "c"], config=cfg)
    a = c.elect("a")
    c.isolate("a")
    a.read_index(1)
    c.stabilize()
    assert c.read_states["a"] == [ReadState(1, 4)]


def test_read_index_on_follower_raises_not_leader_with_hint() -> None:
    c = Cluster(["a", "b", "c"])
    c.elect("a")
    with pytest.raises(NotLeader) as err:
        c.nodes["b"].read_index(1)
    assert err.value.leader_id == "a"


def test_single_voter_read_index_is_immediate() -> None:
    c = Cluster(["a"])
    c.tick("a", 20)
    c.stabilize()
    c.nodes["a"].read_index(3)
    c.stabilize()
    assert c.read_states["a"] == [ReadState(3, 2)]
