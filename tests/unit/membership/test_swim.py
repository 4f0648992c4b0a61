"""Deterministic scenarios for the SWIM core over a seeded simulated network."""

from __future__ import annotations

import random

import pytest

from dcl.membership.model import EventKind, Member, MemberState, Packet, Ping
from dcl.membership.swim import Swim, SwimConfig
from tests.unit.membership.simnet import SimNet

ALIVE, SUSPECT, DEAD, LEFT = (MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD,
                              MemberState.LEFT)


def converged(net: SimNet, names: list[str]) -> bool:
    return all(net.all_see(n, ALIVE) for n in names)


@pytest.mark.parametrize("seed", range(5))
def test_five_members_converge_over_a_lossy_network(seed: int) -> None:
    net = SimNet(seed, loss=0.1, delay=(0.001, 0.05))
    names = net.cluster(5)
    assert net.run_until(lambda: converged(net, names), 10.0)
    # Keep running under loss: spurious suspicions must be refuted, never turn into failures.
    net.run_for(30.0)
    assert converged(net, names)
    for observer in names:
        counts = net.event_counts(observer)
        for other in names:
            if other != observer:
                assert counts[(other, EventKind.JOIN)] == 1
                assert counts[(other, EventKind.FAILED)] == 0


def test_members_learn_each_other_through_gossip_not_only_push_pull() -> None:
    net = SimNet(7)
    names = [f"n{i}" for i in range(5)]
    for n in names:
        net.add(n)
    # A chain of joins: n4 only ever talks to n3 over TCP; the rest must arrive by gossip.
    for a, b in zip(names[1:], names, strict=False):
        net.push_pull(a, b)
    assert net.run_until(lambda: converged(net, names), 10.0)


@pytest.mark.parametrize("seed", range(3))
def test_crashed_member_becomes_suspect_then_dead(seed: int) -> None:
    net = SimNet(seed, loss=0.05)
    names = net.cluster(5)
    assert net.run_until(lambda: converged(net, names), 10.0)
    net.crash("n4")
    crashed_at = net.now
    others = names[:4]

    def someone_suspects() -> bool:
        return any(net.state_of(o, "n4") is SUSPECT for o in others)

    assert net.run_until(someone_suspects, 5.0)
    assert not any(net.state_of(o, "n4") is DEAD for o in others)
    assert net.run_until(lambda: net.all_see("n4", DEAD, others), 10.0)
    detection = net.now - crashed_at
    # First probe within ~1 interval, one probe round, then 2 s of suspicion.
    assert 2.0 <= detection <= 6.0
    for o in others:
        counts = net.event_counts(o)
        assert counts[("n4", EventKind.FAILED)] == 1
        assert counts[("n4", EventKind.LEAVE)] == 0
    net.run_for(10.0)
    assert all(net.event_counts(o)[("n4", EventKind.FAILED)] == 1 for o in others)


def test_suspected_but_alive_member_refutes_with_higher_incarnation() -> None:
    net = SimNet(11)
    names = net.cluster(5)
    assert net.run_until(lambda: converged(net, names), 10.0)
    before = net.nodes["n4"].local_member.incarnation
    net.isolated.add("n4")
    assert net.run_until(lambda: any(net.state_of(o, "n4") is SUSPECT for o in names[:4]), 10.0)
    net.isolated.clear()
    assert net.run_until(lambda: net.all_see("n4", ALIVE), 5.0)
    net.run_for(10.0)
    assert net.all_see("n4", ALIVE)
    after = net.nodes["n4"].local_member.incarnation
    assert after > before
    assert all(net.view(o, "n4").incarnation == after for o in names[:4])  # type: ignore[union-attr]
    assert all(net.event_counts(o)[("n4", EventKind.FAILED)] == 0 for o in names[:4])


def test_suspicion_about_self_is_answered_with_alive_at_higher_incarnation() -> None:
    node = Swim("a", ("10.0.0.1", 1), {}, SwimConfig(), random.Random(1), 0.0)
    node.take_outbox()
    rumour = Member("a", ("10.0.0.1", 1), {}, SUSPECT, 0)
    node.receive(0.1, Packet(Ping(1, "b", "a"), (rumour,)), ("10.0.0.2", 1))
    (_, reply), = node.take_outbox()
    assert node.local_member.incarnation == 1
    assert any(u.name == "a" and u.state is ALIVE and u.incarnation == 1 for u in reply.updates)


def test_graceful_leave_yields_left_not_dead_and_stale_gossip_cannot_resurrect() -> None:
    net = SimNet(3, loss=0.05)
    names = net.cluster(5)
    assert net.run_until(lambda: converged(net, names), 10.0)
    stale = net.nodes["n4"].local_member
    net.nodes["n4"].leave()
    others = names[:4]
    assert net.run_until(lambda: net.all_see("n4", LEFT, others), 5.0)
    assert net.run_until(net.nodes["n4"].leave_announced, 5.0)
    net.crash("n4")
    net.run_for(15.0)
    net.inject("n0", Packet(None, (stale,)))
    net.run_for(5.0)
    assert net.all_see("n4", LEFT, others)
    for o in others:
        counts = net.event_counts(o)
        assert counts[("n4", EventKind.LEAVE)] == 1
        assert counts[("n4", EventKind.FAILED)] == 0
        assert counts[("n4", EventKind.JOIN)] == 1


def test_node_joining_after_a_leave_learns_the_tombstone() -> None:
    net = SimNet(5)
    names = net.cluster(3)
    assert net.run_until(lambda: converged(net, names), 10.0)
    stale = net.nodes["n2"].local_member
    net.nodes["n2"].leave()
    assert net.run_until(lambda: net.all_see("n2", LEFT, ["n0", "n1"]), 5.0)
    net.crash("n2")
    net.add("late")
    net.push_pull("late", "n0")
    net.inject("late", Packet(None, (stale,)))
    assert net.state_of("late", "n2") is LEFT
    assert net.event_counts("late")[("n2", EventKind.JOIN)] == 0


def test_tag_update_propagates_with_one_update_event_per_observer() -> None:
    net = SimNet(9, loss=0.05)
    names = net.cluster(5)
    assert net.run_until(lambda: converged(net, names), 10.0)
    net.nodes["n2"].set_tags({"rpc_addr": "10.0.0.3:9999", "zone": "b"})
    others = [n for n in names if n != "n2"]

    def propagated() -> bool:
        return all(
            dict(net.view(o, "n2").tags).get("rpc_addr") == "10.0.0.3:9999"  # type: ignore[union-attr]
            for o in others
        )

    assert net.run_until(propagated, 5.0)
    net.run_for(5.0)
    for o in others:
        assert net.event_counts(o)[("n2", EventKind.UPDATE)] == 1
        updates = [e for e in net.events[o] if e.kind is EventKind.UPDATE]
        assert dict(updates[0].member.tags)["zone"] == "b"


def test_duplicated_and_reordered_packets_are_harmless() -> None:
    net = SimNet(21, loss=0.05, delay=(0.001, 0.2), duplicate=0.5)
    names = net.cluster(5)
    assert net.run_until(lambda: converged(net, names), 10.0)
    net.run_for(20.0)
    assert converged(net, names)
    for o in names:
        counts = net.event_counts(o)
        assert all(counts[(n, EventKind.JOIN)] == 1 for n in names if n != o)
        assert sum(counts.values()) == 4


def test_replaying_an_old_packet_changes_nothing() -> None:
    net = SimNet(2)
    names = net.cluster(3)
    assert net.run_until(lambda: converged(net, names), 10.0)
    old = net.nodes["n1"].local_member
    net.nodes["n1"].set_tags({"rpc_addr": "new"})
    assert net.run_until(lambda: dict(net.view("n0", "n1").tags)["rpc_addr"] == "new", 5.0)  # type: ignore[union-attr]
    before = list(net.events["n0"])
    for _ in range(3):
        net.inject("n0", Packet(None, (old,)))
    assert dict(net.view("n0", "n1").tags)["rpc_addr"] == "new"  # type: ignore[union-attr]
    assert net.events["n0"] == before


def test_same_seed_replays_identically() -> None:
    def run() -> list[tuple[str, str, str, int]]:
        net = SimNet(42, loss=0.2, delay=(0.001, 0.1))
        names = net.cluster(5)
        net.run_for(3.0)
        net.crash("n3")
        net.run_for(10.0)
        return [(o, e.kind.value, e.member.name, e.member.incarnation)
                for o in names for e in net.events[o]]

    assert run() == run()


def test_config_rejects_probe_timeout_not_below_interval() -> None:
    from dcl.membership.errors import GossipConfigError

    with pytest.raises(GossipConfigError):
        SwimConfig(probe_interval=0.5, probe_timeout=0.5)


def test_partition_longer_than_suspicion_heals_through_reconnect_push_pull() -> None:
    net = SimNet(13)
    names = net.cluster(5)
    assert net.run_until(lambda: converged(net, names), 10.0)
    net.isolated.add("n4")
    others = names[:4]
    assert net.run_until(
        lambda: net.all_see("n4", DEAD, others)
        and all(net.state_of("n4", o) is DEAD for o in others), 20.0)
    net.isolated.clear()
    net.run_for(5.0)
    assert net.all_see("n4", DEAD, others)  # nobody probes the dead: only a retry helps
    target = net.nodes["n0"].reconnect_target(net.now, 3600.0)
    assert target is not None and target.name == "n4"
    net.push_pull("n0", "n4")
    assert net.run_until(
        lambda: converged(net, names) and all(net.state_of("n4", o) is ALIVE for o in others),
        5.0)
    for o in others:
        assert net.event_counts(o)[("n4", EventKind.FAILED)] == 1
        assert net.event_counts(o)[("n4", EventKind.JOIN)] == 2
    assert net.nodes["n0"].reconnect_target(net.now, 3600.0) is None


def test_ack_to_a_member_held_dead_carries_its_death_notice() -> None:
    node = Swim("a", ("10.0.0.1", 1), {}, SwimConfig(), random.Random(1), 0.0)
    node.merge_remote_state(0.0, [Member("b", ("10.0.0.2", 1), {}, ALIVE, 0)])
    node.receive(0.0, Packet(None, (Member("b", ("10.0.0.2", 1), {}, DEAD, 0),)),
                 ("10.0.0.3", 1))
    node.take_outbox()
    node.receive(0.1, Packet(Ping(7, "b", "a"), ()), ("10.0.0.2", 1))
    (_, reply), = node.take_outbox()
    assert reply.updates[0] == Member("b", ("10.0.0.2", 1), {}, DEAD, 0)


def test_push_pull_death_claim_about_a_live_member_only_suspects_it() -> None:
    node = Swim("a", ("10.0.0.1", 1), {}, SwimConfig(), random.Random(1), 0.0)
    node.merge_remote_state(0.0, [Member("b", ("10.0.0.2", 1), {}, ALIVE, 0)])
    node.merge_remote_state(0.0, [Member("b", ("10.0.0.2", 1), {}, DEAD, 0)])
    assert node.member("b").state is SUSPECT  # type: ignore[union-attr]
    assert [e.kind for e in node.take_events()] == [EventKind.JOIN]


def test_tags_too_large_for_a_datagram_are_refused() -> None:
    from dcl.membership.errors import GossipConfigError

    node = Swim("a", ("10.0.0.1", 1), {}, SwimConfig(), random.Random(1), 0.0)
    with pytest.raises(GossipConfigError):
        node.set_tags({"blob": "x" * 2000})
    assert node.local_member.incarnation == 0


@pytest.mark.parametrize("seed", range(8))
def test_random_crash_and_partition_then_heal_converges(seed: int) -> None:
    net = SimNet(seed, loss=0.05, delay=(0.001, 0.05), push_pull_every=5.0)
    names = net.cluster(6)
    assert net.run_until(lambda: converged(net, names), 10.0)
    victim, cut = net.rng.sample(names, 2)
    net.crash(victim)
    net.run_for(net.rng.uniform(0.0, 2.0))
    net.isolated.add(cut)
    net.run_for(net.rng.uniform(6.0, 12.0))  # past the suspicion timeout: both sides see DEAD
    net.isolated.clear()
    survivors = [n for n in names if n != victim]

    def healed() -> bool:
        return converged(net, survivors) and net.all_see(victim, DEAD, survivors)

    assert net.run_until(healed, 40.0), {
        o: {n: net.state_of(o, n) for n in names} for o in survivors}
