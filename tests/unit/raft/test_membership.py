"""Single-server membership changes with learners (thesis §4.1, §4.2.1, §4.2.2)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dcl.raft.types import (
    AppendEntries,
    ConfChange,
    ConfChangeType,
    Entry,
    EntryType,
    InvalidConfChange,
    ProposalDropped,
    RequestVote,
    Role,
)
from tests.unit.raft.cluster import Cluster, role_of

ADD_LEARNER = ConfChangeType.ADD_LEARNER
PROMOTE = ConfChangeType.PROMOTE_LEARNER
REMOVE = ConfChangeType.REMOVE_NODE


def test_conf_change_encoding_round_trips() -> None:
    cc = ConfChange(PROMOTE, "node-é")
    assert ConfChange.decode(cc.encode()) == cc


def test_learner_receives_the_log_but_does_not_count_for_commit() -> None:
    c = Cluster(["a", "b", "c"], joiners=["d"])
    a = c.elect("a")
    a.propose_conf_change(ConfChange(ADD_LEARNER, "d"))
    assert a.learners == {"d"}  # effective when appended, before commit
    c.stabilize()
    d = c.nodes["d"]
    assert d.role is Role.LEARNER
    assert d.learners == {"d"} and d.voters == {"a", "b", "c"}
    a.propose(b"x")
    c.stabilize()
    assert c.fsm("d") == [b"x"]
    # With b and c down, a and the learner d are no quorum.
    c.isolate("b")
    c.isolate("c")
    _, index = a.propose(b"y")
    c.stabilize()
    assert a.commit_index < index
    assert d.last_index == index


def test_learner_never_campaigns() -> None:
    c = Cluster(["a", "b", "c"], joiners=["d"])
    a = c.elect("a")
    a.propose_conf_change(ConfChange(ADD_LEARNER, "d"))
    c.stabilize()
    c.isolate("d")
    c.tick("d", 100)
    assert c.nodes["d"].role is Role.LEARNER
    assert not [m for m in c.queue if isinstance(m, RequestVote)]


def test_promoted_learner_becomes_voter_and_counts_for_quorum() -> None:
    c = Cluster(["a", "b", "c"], joiners=["d"])
    a = c.elect("a")
    a.propose_conf_change(ConfChange(ADD_LEARNER, "d"))
    c.stabilize()
    a.propose_conf_change(ConfChange(PROMOTE, "d"))
    c.stabilize()
    assert a.voters == {"a", "b", "c", "d"} and not a.learners
    assert c.nodes["d"].role is Role.FOLLOWER
    c.isolate("c")
    c.isolate("b")
    _, index = a.propose(b"x")
    c.stabilize()
    assert a.commit_index < index  # 2 of 4 is not a quorum
    c.heal()
    c.isolate("c")
    c.tick("a")
    c.stabilize()
    assert a.commit_index == index  # a, b, d


def test_leader_refuses_a_second_change_while_one_is_uncommitted() -> None:
    c = Cluster(["a", "b", "c"], joiners=["d", "e"])
    a = c.elect("a")
    a.propose_conf_change(ConfChange(ADD_LEARNER, "d"))
    with pytest.raises(ProposalDropped):
        a.propose_conf_change(ConfChange(ADD_LEARNER, "e"))
    c.stabilize()
    a.propose_conf_change(ConfChange(ADD_LEARNER, "e"))


def test_leader_refuses_conf_change_before_committing_in_its_term() -> None:
    c = Cluster(["a", "b", "c"], joiners=["d"])
    c.drop = lambda m: isinstance(m, AppendEntries)  # the no-op never replicates
    a = c.elect("a")
    with pytest.raises(ProposalDropped):
        a.propose_conf_change(ConfChange(ADD_LEARNER, "d"))
    c.drop = lambda m: False
    c.tick("a")
    c.stabilize()
    a.propose_conf_change(ConfChange(ADD_LEARNER, "d"))


def test_invalid_conf_changes_are_rejected() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    with pytest.raises(InvalidConfChange):
        a.propose_conf_change(ConfChange(PROMOTE, "b"))
    with pytest.raises(InvalidConfChange):
        a.propose_conf_change(ConfChange(ADD_LEARNER, "b"))
    with pytest.raises(InvalidConfChange):
        a.propose_conf_change(ConfChange(REMOVE, "zz"))


def test_removed_follower_stops_receiving_and_cannot_campaign_once_it_knows() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    a.propose_conf_change(ConfChange(REMOVE, "c"))
    c.stabilize()
    assert a.voters == {"a", "b"}
    cn = c.nodes["c"]
    assert cn.role is Role.LEARNER  # it appended its own removal
    a.propose(b"x")
    c.stabilize()
    assert c.fsm("c") == []
    assert "c" not in a.progress()
    c.tick("c", 100)
    assert not [m for m in c.queue if m.src == "c"]


def test_removing_the_leader_steps_it_down_after_the_change_commits() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    _, index = a.propose_conf_change(ConfChange(REMOVE, "a"))
    assert a.role is Role.LEADER  # still leads while the change is uncommitted
    c.stabilize()
    assert a.commit_index >= index
    assert role_of(a) is Role.LEARNER
    for _ in range(40):
        c.tick()
        c.stabilize()
    leader = c.leader()
    assert leader is not None and leader.id in {"b", "c"}
    assert leader.voters == {"b", "c"}


def test_truncated_conf_change_reverts_membership() -> None:
    c = Cluster(["a", "b", "c"])
    c.elect("a")
    b = c.nodes["b"]
    cc = ConfChange(ADD_LEARNER, "d").encode()
    b.step(AppendEntries(2, "a", "b", 4, 2, (Entry(2, 5, EntryType.CONF_CHANGE, cc),), 4))
    assert b.learners == {"d"}
    b.step(AppendEntries(3, "c", "b", 4, 2, (Entry(3, 5, EntryType.NOOP),), 4))
    assert b.learners == frozenset()
    assert b.voters == {"a", "b", "c"}


def test_membership_is_rebuilt_from_log_on_restart() -> None:
    c = Cluster(["a", "b", "c"], joiners=["d"])
    a = c.elect("a")
    a.propose_conf_change(ConfChange(ADD_LEARNER, "d"))
    c.stabilize()
    a.propose_conf_change(ConfChange(PROMOTE, "d"))
    c.stabilize()
    a.propose_conf_change(ConfChange(REMOVE, "b"))
    c.stabilize()
    for nid in ["a", "d"]:
        n = c.crash(nid)
        assert n.voters == {"a", "c", "d"}
        assert n.learners == frozenset()


@given(
    kind=st.sampled_from(list(ConfChangeType)),
    node=st.text(min_size=0, max_size=40),
)
def test_conf_change_encoding_round_trips_for_any_id(kind: ConfChangeType, node: str) -> None:
    cc = ConfChange(kind, node)
    assert ConfChange.decode(cc.encode()) == cc
    entry = Entry(7, 9, EntryType.CONF_CHANGE, cc.encode())
    decoded = Entry.decode(7, 9, entry.encode())
    assert decoded == entry
    assert decoded.encode()[0] == EntryType.CONF_CHANGE


@given(st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), max_size=12), st.data())
def test_membership_replay_matches_a_set_model(ids: list[str], data: st.DataObject) -> None:
    """Replaying conf-change entries on restart gives the same sets as a plain model."""
    from dcl.raft.core import RaftNode
    from dcl.raft.types import Config

    voters, learners = {"a"}, set()
    entries = []
    for i, node in enumerate(ids):
        kind = data.draw(st.sampled_from(list(ConfChangeType)))
        if kind is ConfChangeType.ADD_LEARNER:
            if node not in voters:
                learners.add(node)
        elif kind in (ConfChangeType.PROMOTE_LEARNER, ConfChangeType.ADD_VOTER):
            voters.add(node)
            learners.discard(node)
        else:
            voters.discard(node)
            learners.discard(node)
        entries.append(Entry(1, i + 2, EntryType.CONF_CHANGE, ConfChange(kind, node).encode()))
    boot = Entry(1, 1, EntryType.CONF_CHANGE, ConfChange(ConfChangeType.ADD_VOTER, "a").encode())

    class Rng:
        def randint(self, a: int, b: int) -> int:
            return a

    n = RaftNode("a", Config(), Rng(), entries=[boot, *entries])
    assert n.voters == voters
    assert n.learners == learners
