"""The leader's reconciliation of Raft membership with gossip, as a pure decision."""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from dcl.agent.membership import Action, ActionKind, RaftView, plan
from dcl.membership import Member, MemberState

SELF = "n0"


def member(name: str, state: MemberState = MemberState.ALIVE, rpc_addr: str | None = None
           ) -> Member:
    tags = {"rpc_addr": rpc_addr or f"127.0.0.1:{8400 + int(name[1:])}"}
    return Member(name, ("127.0.0.1", 9400 + int(name[1:])), tags, state, 1)


def view(voters: set[str], learners: set[str] | None = None, caught_up: set[str] | None = None,
         addresses: dict[str, str] | None = None) -> RaftView:
    learners = learners or set()
    if addresses is None:
        addresses = {n: f"127.0.0.1:{8400 + int(n[1:])}" for n in voters | learners}
    return RaftView(frozenset(voters), frozenset(learners), frozenset(caught_up or ()),
                    addresses)


def test_an_alive_member_unknown_to_raft_is_added_as_a_learner_with_its_address() -> None:
    actions = plan(view({SELF}), [member(SELF), member("n1")], SELF)
    assert actions == [Action(ActionKind.ADD_LEARNER, "n1", "127.0.0.1:8401")]


def test_a_caught_up_learner_is_promoted_and_a_lagging_one_is_not() -> None:
    raft = view({SELF}, {"n1", "n2"}, caught_up={"n1"})
    actions = plan(raft, [member(SELF), member("n1"), member("n2")], SELF)
    assert actions == [Action(ActionKind.PROMOTE, "n1", "127.0.0.1:8401")]


def test_duplicate_join_of_an_existing_voter_is_a_no_op() -> None:
    raft = view({SELF, "n1", "n2"})
    assert plan(raft, [member(SELF), member("n1"), member("n1"), member("n2")], SELF) == []


def test_failed_and_left_members_are_removed_first() -> None:
    raft = view({SELF, "n1", "n2"}, {"n3"})
    members = [member(SELF), member("n1", MemberState.DEAD), member("n2", MemberState.LEFT),
               member("n3", MemberState.DEAD), member("n4")]
    actions = plan(raft, members, SELF)
    assert actions == [
        Action(ActionKind.REMOVE, "n1"), Action(ActionKind.REMOVE, "n2"),
        Action(ActionKind.REMOVE, "n3"), Action(ActionKind.ADD_LEARNER, "n4", "127.0.0.1:8404"),
    ]


def test_a_node_never_removes_itself_even_when_gossip_says_it_failed_or_left() -> None:
    raft = view({SELF, "n1"})
    for state in (MemberState.DEAD, MemberState.LEFT):
        assert plan(raft, [member(SELF, state), member("n1")], SELF) == []


def test_gone_members_unknown_to_raft_and_raft_members_unknown_to_gossip_are_left_alone() -> None:
    raft = view({SELF, "n1"})  # n1 joined through Admin.Join; gossip never heard of it
    assert plan(raft, [member(SELF), member("n5", MemberState.DEAD)], SELF) == []


def test_suspect_members_are_neither_added_promoted_nor_removed() -> None:
    raft = view({SELF, "n1"}, {"n2"}, caught_up={"n2"})
    members = [member(SELF), member("n1", MemberState.SUSPECT),
               member("n2", MemberState.SUSPECT), member("n3", MemberState.SUSPECT)]
    assert plan(raft, members, SELF) == []


def test_a_member_without_an_rpc_address_is_not_added() -> None:
    m = Member("n1", ("127.0.0.1", 9401), {}, MemberState.ALIVE, 1)
    assert plan(view({SELF}), [member(SELF), m], SELF) == []


def test_a_changed_rpc_address_is_recorded_in_the_address_book() -> None:
    raft = view({SELF, "n1"}, addresses={SELF: "127.0.0.1:8400", "n1": "127.0.0.1:1"})
    assert plan(raft, [member(SELF), member("n1")], SELF) == [
        Action(ActionKind.RECORD_ADDRESS, "n1", "127.0.0.1:8401")]


_names = st.sampled_from([f"n{i}" for i in range(6)])
_states = st.sampled_from(list(MemberState))


@given(voters=st.sets(_names), learners=st.sets(_names), caught=st.sets(_names),
       gossip=st.dictionaries(_names, _states))
def test_plan_is_consistent_with_both_views(
    voters: set[str], learners: set[str], caught: set[str], gossip: dict[str, MemberState]
) -> None:
    voters = voters | {SELF}
    learners = learners - voters
    raft = view(voters, learners, caught & learners)
    members = [member(n, s) for n, s in gossip.items()]
    actions = plan(raft, members, SELF)
    targets = [a.node_id for a in actions if a.kind is not ActionKind.RECORD_ADDRESS]
    assert SELF not in [a.node_id for a in actions]
    assert len(targets) == len(set(targets)), "at most one membership change per node"
    for a in actions:
        state = gossip[a.node_id]
        if a.kind is ActionKind.REMOVE:
            assert a.node_id in voters | learners
            assert state in (MemberState.DEAD, MemberState.LEFT)
        elif a.kind is ActionKind.ADD_LEARNER:
            assert a.node_id not in voters | learners and state is MemberState.ALIVE
        elif a.kind is ActionKind.PROMOTE:
            assert a.node_id in learners and a.node_id in caught and state is MemberState.ALIVE
    # Applying the plan's changes leaves nothing more to do (the plan is a fixed point).
    removed = {a.node_id for a in actions if a.kind is ActionKind.REMOVE}
    added = {a.node_id for a in actions if a.kind is ActionKind.ADD_LEARNER}
    promoted = {a.node_id for a in actions if a.kind is ActionKind.PROMOTE}
    after = view((voters | promoted) - removed, (learners | added) - promoted - removed)
    assert [a for a in plan(after, members, SELF) if a.kind is not ActionKind.ADD_LEARNER] == []


def test_a_failure_verdict_that_raft_contradicts_does_not_remove_a_voter() -> None:
    """Gossip says DEAD but the leader still hears the peer over Raft (e.g. UDP blocked):
    keep it, or a gossip fault would shrink the cluster to one copy of the data. A
    deliberate LEAVE is honoured either way."""
    raft = dataclasses.replace(view({SELF, "n1", "n2", "n3"}), responsive=frozenset({"n1", "n2"}))
    members = [member(SELF), member("n1", MemberState.DEAD), member("n2", MemberState.LEFT),
               member("n3", MemberState.DEAD)]
    assert plan(raft, members, SELF) == [
        Action(ActionKind.REMOVE, "n2"), Action(ActionKind.REMOVE, "n3")]
