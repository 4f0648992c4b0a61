"""Property tests: whatever news arrives, in whatever order, the core's invariants hold."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from dcl.membership.model import GONE_STATES, EventKind, Member, MemberState, Packet
from dcl.membership.swim import Swim, SwimConfig

PEERS = ["b", "c"]
ADDRS = {"a": ("10.0.0.1", 1), "b": ("10.0.0.2", 1), "c": ("10.0.0.3", 1)}

news = st.builds(
    lambda name, state, inc, tag: Member(name, ADDRS[name], {"t": tag}, state, inc),
    st.sampled_from(["a", *PEERS]),
    st.sampled_from(MemberState),
    st.integers(0, 4),
    st.sampled_from(["x", "y"]),
)
steps = st.lists(
    st.tuples(st.sampled_from(["gossip", "push_pull", "tick"]), news, st.floats(0.0, 3.0)),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(steps, st.integers(0, 2**32))
def test_any_interleaving_of_news_keeps_the_invariants(
    script: list[tuple[str, Member, float]], seed: int
) -> None:
    node = Swim("a", ADDRS["a"], {}, SwimConfig(), random.Random(seed), 0.0)
    now = 0.0
    incarnations: dict[str, int] = {"a": 0}
    left_at: dict[str, int] = {}
    last_event: dict[str, EventKind] = {}
    for kind, member, dt in script:
        now += dt
        if kind == "gossip":
            node.receive(now, Packet(None, (member,)), ("10.0.0.9", 1))
        elif kind == "push_pull":
            node.merge_remote_state(now, [member])
        else:
            node.tick(now)
        node.take_outbox()
        for e in node.take_events():
            name = e.member.name
            assert name != "a", "no events about the local node"
            prev = last_event.get(name)
            if e.kind is EventKind.JOIN:
                assert prev is None or prev in (EventKind.FAILED, EventKind.LEAVE)
            else:
                assert prev in (EventKind.JOIN, EventKind.UPDATE), (prev, e.kind)
            last_event[name] = e.kind
        for m in node.members():
            assert m.incarnation >= incarnations.get(m.name, 0), "incarnation went back"
            incarnations[m.name] = m.incarnation
            if m.name in left_at and m.incarnation == left_at[m.name]:
                assert m.state is MemberState.LEFT, "LEFT undone without a new incarnation"
            if m.state is MemberState.LEFT:
                left_at[m.name] = m.incarnation
            # The state reported by the last event matches the state held.
            ev = last_event.get(m.name)
            if ev in (EventKind.FAILED, EventKind.LEAVE):
                assert m.state in GONE_STATES
        local = node.local_member
        assert local.state is MemberState.ALIVE
        # Any rumour about us that was at least as new has been outbid.
        if member.name == "a" and kind != "tick" and member.state is not MemberState.ALIVE:
            assert local.incarnation > member.incarnation
