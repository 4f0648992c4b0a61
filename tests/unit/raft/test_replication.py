"""Log replication and commitment (Raft §5.3, §5.4.2), flow control, batching, persistence."""

from __future__ import annotations

from collections.abc import Sequence

from dcl.raft.core import RaftNode
from dcl.raft.types import (
    AppendEntries,
    AppendResponse,
    Config,
    Entry,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    Mutations,
    ProgressState,
    Role,
)
from tests.unit.raft.cluster import Cluster, with_config


def appends(msgs: Sequence[object]) -> list[AppendEntries]:
    return [m for m in msgs if isinstance(m, AppendEntries)]


def test_leader_replicates_and_commits_on_quorum_then_followers_apply() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    term, index = a.propose(b"hello")
    c.stabilize()
    assert (term, index) == (2, 5)
    assert all(n.commit_index == 5 for n in c.nodes.values())
    assert all(c.fsm(i) == [b"hello"] for i in "abc")


def test_commit_needs_a_majority_of_voters() -> None:
    c = Cluster(["a", "b", "c", "d", "e"])
    a = c.elect("a")
    c.partition(["a", "b"], ["c", "d", "e"])
    a.propose(b"x")
    c.stabilize()
    assert a.commit_index == 6  # five bootstrap entries and the no-op
    c.heal()
    c.tick("a")
    c.stabilize()
    assert a.commit_index == 7


def test_follower_rejects_append_with_mismatched_prev_term() -> None:
    c = Cluster(["a", "b", "c"])
    c.elect("a")
    b = c.nodes["b"]
    b.step(AppendEntries(2, "a", "b", 4, 1, (Entry(2, 5),), 4))
    out = c.take("b")
    assert out == [AppendResponse(2, "b", "a", 4, True, 3, 1)]
    assert b.last_index == 4


def test_follower_rejects_append_beyond_its_log_with_hint_of_last_index() -> None:
    c = Cluster(["a", "b", "c"])
    c.elect("a")
    b = c.nodes["b"]
    b.step(AppendEntries(2, "a", "b", 9, 2, (Entry(2, 10),), 4))
    (resp,) = c.take("b")
    assert isinstance(resp, AppendResponse)
    assert resp.reject and resp.index == 9 and resp.hint_index == 4 and resp.hint_term == 2


def test_follower_truncates_conflicting_suffix_and_appends_leaders_entries() -> None:
    c = Cluster(["a", "b", "c"])
    c.elect("a")
    b = c.nodes["b"]
    # Uncommitted entries from a deposed leader at term 2...
    b.step(AppendEntries(2, "a", "b", 4, 2, (Entry(2, 5, data=b"old"), Entry(2, 6)), 4))
    c.process("b")
    # ...replaced by a term-3 leader's entry at index 5.
    b.step(AppendEntries(3, "c", "b", 4, 2, (Entry(3, 5, data=b"new"),), 4))
    rd = b.ready()
    assert rd.entries == (Entry(3, 5, data=b"new"),)
    assert b.last_index == 5
    b.advance(rd)


def test_duplicate_old_append_does_not_truncate_matching_log() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    a.propose(b"1")
    a.propose(b"2")
    c.stabilize()
    b = c.nodes["b"]
    old = AppendEntries(2, "a", "b", 4, 2, (Entry(2, 5, data=b"1"),), 4)
    b.step(old)
    assert b.last_index == 6
    out = c.take("b")
    assert [m.index for m in out if isinstance(m, AppendResponse)] == [6]  # commit index


def test_follower_ack_rides_in_the_same_ready_as_the_entries_it_acknowledges() -> None:
    c = Cluster(["a", "b", "c"])
    c.elect("a")
    b = c.nodes["b"]
    b.step(AppendEntries(2, "a", "b", 4, 2, (Entry(2, 5, data=b"x"),), 4))
    rd = b.ready()
    assert rd.entries == (Entry(2, 5, data=b"x"),)
    assert rd.messages == (AppendResponse(2, "b", "a", 5),)


def test_leader_counts_itself_only_after_its_entries_are_persisted() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    _, index = a.propose(b"x")
    rd = a.ready()  # entries handed to the driver, AppendEntries sent before the fsync
    for m in rd.messages:
        c.nodes[m.dst].step(m)
    # Only b acknowledges; a has not advanced (fsync not done): no quorum yet.
    c.process("b")
    for m in [m for m in c.queue if m.src == "b"]:
        a.step(m)
    c.queue.clear()
    assert a.commit_index == index - 1
    a.advance(rd)
    assert a.commit_index == index


def test_leader_commits_only_current_term_entries_by_counting() -> None:
    # Figure 8: an entry from an old term is replicated on a majority but must not be
    # committed by counting; it commits only with an entry of the leader's term.
    cfg = Config(election_tick=10, pre_vote=False, check_quorum=False)
    n = RaftNode(
        "a",
        cfg,
        _Rng(),
        hard_state=HardState(3, "a", 3),
        entries=[*_boot(), Entry(2, 4, data=b"old")],
    )
    for _ in range(30):
        n.tick()
        if n.role is not Role.FOLLOWER:
            break
    from dcl.raft.types import VoteResponse

    n.step(VoteResponse(4, "b", "a", True))
    assert n.role is Role.LEADER
    rd = n.ready()
    n.advance(rd)
    # b acknowledges the old entry only (index 4), not the term-4 no-op at 5.
    n.step(AppendResponse(4, "b", "a", 4))
    assert n.commit_index == 3
    n.step(AppendResponse(4, "b", "a", 5))
    assert n.commit_index == 5


def test_commit_previous_term_mutation_breaks_the_rule() -> None:
    cfg = Config(
        election_tick=10,
        pre_vote=False,
        check_quorum=False,
        mutations=Mutations(commit_previous_term_by_counting=True),
    )
    n = RaftNode("a", cfg, _Rng(), hard_state=HardState(3, "a", 3), entries=[*_boot(), Entry(2, 4)])
    for _ in range(30):
        n.tick()
        if n.role is not Role.FOLLOWER:
            break
    from dcl.raft.types import VoteResponse

    n.step(VoteResponse(4, "b", "a", True))
    n.advance(n.ready())
    n.step(AppendResponse(4, "b", "a", 4))
    assert n.commit_index == 4


def test_many_proposals_share_one_append_per_follower() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    for i in range(50):
        a.propose(b"%d" % i)
    msgs = appends(c.take("a"))
    assert len(msgs) == 2
    assert all(len(m.entries) == 50 for m in msgs)


def test_append_messages_respect_max_entries_and_bytes() -> None:
    c = Cluster(["a", "b"], config=with_config(max_entries_per_msg=4, max_bytes_per_msg=10))
    a = c.elect("a")
    a.propose_batch([b"12345"] * 5)
    msgs = appends(c.take("a"))
    assert [len(m.entries) for m in msgs] == [2, 2, 1]
    c2 = Cluster(["a", "b"], config=with_config(max_entries_per_msg=4))
    a2 = c2.elect("a")
    a2.propose_batch([b"x"] * 10)
    assert [len(m.entries) for m in appends(c2.take("a"))] == [4, 4, 2]


def test_replicate_state_pipelines_up_to_the_inflight_limit() -> None:
    c = Cluster(["a", "b"], config=with_config(max_entries_per_msg=1, max_inflight_msgs=3))
    a = c.elect("a")
    assert a.progress()["b"].state is ProgressState.REPLICATE
    a.propose_batch([b"x"] * 5)
    msgs = appends(c.take("a"))
    assert len(msgs) == 3
    assert a.progress()["b"].inflight == 3
    b = c.nodes["b"]
    b.step(msgs[0])
    for m in c.take("b"):
        a.step(m)
    assert len(appends(c.take("a"))) == 1


def test_probe_state_sends_one_append_until_response() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    c.isolate("b")
    a.propose(b"x")
    c.stabilize()
    # b missed the append; a rejection moves it to probe.
    a.step(AppendResponse(2, "b", "a", 5, True, 4, 2))
    pr = a.progress()["b"]
    assert pr.state is ProgressState.PROBE
    msgs = [m for m in c.take("a") if m.dst == "b"]
    assert len(appends(msgs)) == 1
    a.propose(b"y")
    assert not [m for m in c.take("a") if m.dst == "b" and isinstance(m, AppendEntries)]


def test_fast_backtracking_skips_a_whole_conflicting_term_per_round_trip() -> None:
    c = Cluster(["a", "b", "c"], config=with_config(pre_vote=False, check_quorum=False))
    # b holds 30 uncommitted entries of term 2; a and c hold 37 entries of term 3.
    c.storage["b"].hard_state = HardState(2, None, 3)
    c.storage["b"].entries = _boot() + [Entry(2, i, data=b"stale") for i in range(4, 34)]
    for i in "ac":
        c.storage[i].hard_state = HardState(3, None, 3)
        c.storage[i].entries = _boot() + [Entry(3, i, data=b"new") for i in range(4, 41)]
    for i in "abc":
        c.crash(i)
    leader = c.elect("c")
    c.stabilize()
    rejections = [m for m in c.sent if isinstance(m, AppendResponse) and m.reject and m.src == "b"]
    # One rejection: b's hint (33, term 2) lets c jump straight to index 3 (term 1).
    assert len(rejections) == 1
    assert c.nodes["b"].last_index == leader.last_index == 41
    assert c.nodes["b"].term_at(33) == 3


def test_heartbeat_carries_commit_capped_at_follower_match() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    c.isolate("c")
    a.propose(b"x")
    c.stabilize()
    c.tick("a")
    hb = {m.dst: m for m in c.take("a") if isinstance(m, Heartbeat)}
    assert hb["b"].commit == 5
    assert hb["c"].commit == 4


def test_stale_leader_steps_down_when_told_a_higher_term() -> None:
    c = Cluster(["a", "b", "c"], config=with_config(check_quorum=False))
    a = c.elect("a")
    c.isolate("a")
    c.elect("b")
    c.heal()
    c.tick("a")
    c.stabilize()
    assert a.role is Role.FOLLOWER
    assert a.term == c.nodes["b"].term
    c.tick("b")
    c.stabilize()
    assert a.leader_id == "b"


def test_follower_ignores_append_from_lower_term_and_reports_its_term() -> None:
    c = Cluster(["a", "b", "c"])
    c.elect("a")
    b = c.nodes["b"]
    b.step(AppendEntries(1, "c", "b", 4, 2, (Entry(1, 5),), 4))
    assert b.last_index == 4
    assert c.take("b") == [HeartbeatResponse(2, "b", "c", 0)]


def test_restart_of_leader_recovers_committed_entries_and_reelects() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    a.propose_batch([b"1", b"2", b"3"])
    c.stabilize()
    c.crash("a")
    for _ in range(50):
        c.tick()
        c.stabilize()
    leader = c.leader()
    assert leader is not None
    leader.propose(b"4")
    c.stabilize()
    c.tick()
    c.stabilize()
    assert all(c.fsm(i) == [b"1", b"2", b"3", b"4"] for i in "abc")


class _Rng:
    def randint(self, a: int, b: int) -> int:
        return a


def _boot() -> list[Entry]:
    from dcl.raft.types import ConfChange, ConfChangeType, EntryType

    return [
        Entry(1, i + 1, EntryType.CONF_CHANGE, ConfChange(ConfChangeType.ADD_VOTER, v).encode())
        for i, v in enumerate(["a", "b", "c"])
    ]


def test_only_a_steady_leader_may_send_before_persisting() -> None:
    c = Cluster(["a", "b", "c"])
    c.stabilize()
    a = c.nodes["a"]
    c.tick("a", 20)
    assert a.ready().send_before_persist is False  # pre-vote requests after a role change
    c.queue.clear()
    c2 = Cluster(["a", "b", "c"])
    a2 = c2.elect("a")
    a2.propose(b"x")
    rd = a2.ready()
    assert rd.entries and rd.messages and rd.send_before_persist is True
    a2.advance(rd)
    b = c2.nodes["b"]
    b.step(AppendEntries(2, "a", "b", 4, 2, (Entry(2, 5, data=b"x"),), 4))
    assert b.ready().send_before_persist is False  # a follower's ack must wait for its fsync


def test_commit_announcement_to_caught_up_follower_needs_no_response() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    _, index = a.propose(b"x")
    c.stabilize()
    notices = [
        m for m in c.sent if isinstance(m, AppendEntries) and not m.entries and m.commit == index
    ]
    assert {m.dst for m in notices} == {"b", "c"}
    assert all(not m.want_response for m in notices)
    assert all(c.nodes[i].commit_index == index for i in "bc")
    acks = [m for m in c.sent if isinstance(m, AppendResponse) and m.index == index]
    assert len(acks) == 2  # one per follower for the entry itself, none for the notice


def test_take_heartbeats_hands_out_only_a_leaders_current_term_heartbeats() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    c.stabilize()
    a.propose(b"pending")  # an append waiting in the same queue
    for _ in range(a._cfg.heartbeat_tick):
        a.tick()
    beats = a.take_heartbeats()
    assert sorted(m.dst for m in beats) == ["b", "c"]
    assert all(isinstance(m, Heartbeat) and m.term == a.term for m in beats)
    assert a.take_heartbeats() == []  # handed out once
    rest = a.ready().messages
    assert not any(isinstance(m, Heartbeat) for m in rest)
    assert sorted(m.dst for m in appends(rest)) == ["b", "c"]  # the appends stayed
    c.nodes["b"].tick()
    assert c.nodes["b"].take_heartbeats() == []  # followers never send heartbeats early


def _deferring() -> Cluster:
    return Cluster(["a", "b", "c"], config=with_config(defer_commit_announcement=True))


def test_deferred_commit_announcement_waits_for_announce_commit() -> None:
    c = _deferring()
    a = c.elect("a")
    _, index = a.propose(b"x")
    c.stabilize()
    assert a.commit_index == index
    assert all(c.nodes[i].commit_index < index for i in "bc")  # nobody told them yet
    assert not any(isinstance(m, AppendEntries) and m.commit == index for m in c.sent)
    assert a.commit_announcement_due
    a.announce_commit()
    assert not a.commit_announcement_due
    c.stabilize()
    assert all(c.nodes[i].commit_index == index for i in "bc")
    assert all(c.fsm(i) == [b"x"] for i in "bc")
    notices = [m for m in c.sent if isinstance(m, AppendEntries) and m.commit == index]
    assert sorted(m.dst for m in notices) == ["b", "c"]
    assert all(not m.entries and not m.want_response for m in notices)


def test_deferred_commit_rides_on_the_next_append() -> None:
    c = _deferring()
    a = c.elect("a")
    _, first = a.propose(b"x")
    c.stabilize()
    _, second = a.propose(b"y")
    c.stabilize()
    carried = [m for m in appends(c.sent) if m.entries and m.entries[0].index == second]
    assert sorted(m.dst for m in carried) == ["b", "c"]
    assert all(m.commit >= first for m in carried)
    assert all(c.fsm(i) == [b"x"] for i in "bc")  # `second` is not known committed yet
    sent = len(c.sent)
    a.announce_commit()  # owed only for `second` now
    c.stabilize()
    assert all(c.fsm(i) == [b"x", b"y"] for i in "bc")
    assert all(m.commit == second and not m.entries for m in appends(c.sent[sent:]))


def test_deferred_commit_is_not_announced_again_to_a_peer_already_told() -> None:
    c = _deferring()
    a = c.elect("a")
    _, index = a.propose(b"x")
    c.stabilize()
    c.tick("a")  # the heartbeat carries the commit index (capped at each peer's match)
    c.stabilize()
    assert all(c.nodes[i].commit_index == index for i in "bc")
    sent = len(c.sent)
    a.announce_commit()
    assert not a.has_ready() or not appends(a.ready().messages)
    assert not appends(c.sent[sent:])


def test_an_append_that_carried_the_commit_leaves_nothing_to_announce() -> None:
    c = _deferring()
    a = c.elect("a")
    _, first = a.propose(b"x")
    c.stabilize()
    assert a.commit_announcement_due
    c.cut_links |= {("b", "a"), ("c", "a")}  # y's acks are lost: only x is committed
    a.propose(b"y")
    c.stabilize()
    assert all(c.nodes[i].commit_index == first for i in "bc")  # told by y's append
    a.announce_commit()
    assert not a.has_ready()


def test_a_heartbeat_tells_a_lagging_peer_only_what_it_holds() -> None:
    c = _deferring()
    a = c.elect("a")
    c.cut_links.add(("c", "a"))  # c's acks are lost: the entry commits on b's
    _, index = a.propose(b"x")
    c.stabilize()
    c.tick("a")  # heartbeats: b is told `index`, c only its acknowledged match
    c.stabilize()
    assert c.nodes["b"].commit_index == index and c.nodes["c"].commit_index < index
    sent = len(c.sent)
    a.announce_commit()
    c.stabilize()
    told = [m for m in appends(c.sent[sent:]) if m.commit == index]
    assert [m.dst for m in told] == ["c"]
    assert c.nodes["c"].commit_index == index


def test_only_a_leader_owes_a_commit_announcement() -> None:
    c = _deferring()
    a = c.elect("a")
    a.propose(b"x")
    c.stabilize()
    b = c.nodes["b"]
    assert not b.commit_announcement_due
    b.announce_commit()
    assert not b.has_ready()
    assert a.commit_announcement_due
    a.step(Heartbeat(a.term + 1, "b", "a", 0))  # a newer leader: a steps down
    assert a.role is Role.FOLLOWER
    assert not a.commit_announcement_due


def test_a_follower_may_answer_heartbeats_before_its_ready_completes() -> None:
    c = Cluster(["a", "b", "c"])
    a = c.elect("a")
    c.stabilize()
    b = c.nodes["b"]
    b.step(Heartbeat(a.term, "a", "b", a.commit_index, 7))
    answers = b.take_heartbeat_responses(a.term)
    assert answers == [HeartbeatResponse(a.term, "b", "a", 7)]
    assert not b.has_ready() or not any(
        isinstance(m, HeartbeatResponse) for m in b.ready().messages)  # taken out
    # A newer term is durable only once the driver persisted the Ready that hands it out.
    b.step(Heartbeat(a.term + 1, "c", "b", 0, 8))
    assert b.take_heartbeat_responses(a.term) == []
    rd = b.ready()
    assert rd.hard_state is not None and rd.hard_state.term == a.term + 1
    assert HeartbeatResponse(a.term + 1, "b", "c", 8) in rd.messages
