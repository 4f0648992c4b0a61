"""The codec round-trips every message and turns any hostile input into MalformedPacket."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcl.membership import wire
from dcl.membership.errors import MalformedPacket
from dcl.membership.model import Ack, Member, MemberState, Packet, Ping, PingReq, PushPull

names = st.text(min_size=1, max_size=20)
members = st.builds(
    Member,
    name=names,
    addr=st.tuples(st.text(min_size=1, max_size=15), st.integers(1, 65535)),
    tags=st.dictionaries(st.text(max_size=10), st.text(max_size=30), max_size=4),
    state=st.sampled_from(MemberState),
    incarnation=st.integers(0, 2**63 - 1),
)
seqs = st.integers(0, 2**32)
addrs = st.tuples(st.just("127.0.0.1"), st.integers(1, 65535))
messages = st.one_of(
    st.none(),
    st.builds(Ping, seqs, names, names),
    st.builds(Ack, seqs, names),
    st.builds(PingReq, seqs, names, addrs, names, addrs),
)


@given(messages, st.lists(members, max_size=5))
def test_packet_round_trips(message: object, updates: list[Member]) -> None:
    packet = Packet(message, tuple(updates))  # type: ignore[arg-type]
    assert wire.decode_packet(wire.encode_packet(packet)) == packet


@given(names, st.booleans(), st.lists(members, max_size=5))
def test_push_pull_round_trips(source: str, join: bool, state: list[Member]) -> None:
    pp = PushPull(source, join, tuple(state))
    assert wire.decode_push_pull(wire.encode_push_pull(pp)) == pp


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_malformed(data: bytes) -> None:
    for decode in (wire.decode_packet, wire.decode_push_pull):
        with contextlib.suppress(MalformedPacket):
            decode(data)


@settings(max_examples=300)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=3), c,
                                                                        max_size=4)))
def test_wrongly_shaped_json_only_ever_raises_malformed(obj: object) -> None:
    data = json.dumps({"v": 1, "m": obj, "u": [obj], "f": obj, "j": obj, "s": obj}).encode()
    for decode in (wire.decode_packet, wire.decode_push_pull):
        with contextlib.suppress(MalformedPacket):
            decode(data)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"v":1,"m":["p",true,"a","b"],"u":[]}',  # a bool is not a sequence number
        b'{"v":1,"m":["k",-1,"a"],"u":[]}',
        b'{"v":1,"m":null,"u":[["a","h",0,1,"a",{}]]}',  # port 0
        b'{"v":1,"m":null,"u":[["a","h",1,1,"x",{}]]}',  # unknown state
        b'{"v":1,"m":null,"u":[["","h",1,1,"a",{}]]}',  # empty name
        b'{"v":2,"m":null,"u":[]}',
        b"[" * 100_000,
        b"\xff\xfe",
    ],
)
def test_specific_bad_packets_are_rejected(payload: bytes) -> None:
    with pytest.raises(MalformedPacket):
        wire.decode_packet(payload)
