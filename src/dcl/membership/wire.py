"""Compact JSON encoding of gossip packets; never pickle.

JSON keeps the decoder a pure data parser: a hostile peer can at worst make us reject a
packet, never run code. Every field is validated here so the core only ever sees well-typed
values; anything else raises `MalformedPacket`, which the driver counts and drops.

Layout (arrays keep packets small; the version field leaves room to evolve):
  member  = [name, host, port, incarnation, state, {tag: value}]
  message = ["p", seq, source, target] | ["k", seq, source]
          | ["r", seq, source, host, port, target, host, port]
  packet  = {"v": 1, "m": message | null, "u": [member, ...]}
  pushpull= {"v": 1, "f": source, "j": join, "s": [member, ...]}
"""

from __future__ import annotations

import json
from typing import Any

from dcl.membership.errors import MalformedPacket
from dcl.membership.model import (
    Ack,
    Addr,
    Member,
    MemberState,
    Message,
    Packet,
    Ping,
    PingReq,
    PushPull,
)

VERSION = 1
MAX_NAME = 256
MAX_TAGS = 64
MAX_TAG_TEXT = 1024
MAX_UPDATES = 1024
MAX_STATE_MEMBERS = 100_000
_MAX_INT = 2**63 - 1
_STATES = {s.value: s for s in MemberState}


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _member_obj(m: Member) -> list[Any]:
    return [m.name, m.addr[0], m.addr[1], m.incarnation, m.state.value, dict(m.tags)]


def member_size(m: Member) -> int:
    """Encoded size of one update, used by the core to keep datagrams under budget."""
    return len(_dumps(_member_obj(m))) + 1


def _message_obj(msg: Message | None) -> list[Any] | None:
    if msg is None:
        return None
    if isinstance(msg, Ping):
        return ["p", msg.seq, msg.source, msg.target]
    if isinstance(msg, Ack):
        return ["k", msg.seq, msg.source]
    return [
        "r", msg.seq, msg.source, msg.source_addr[0], msg.source_addr[1],
        msg.target, msg.target_addr[0], msg.target_addr[1],
    ]


def encode_packet(packet: Packet) -> bytes:
    return _dumps(
        {"v": VERSION, "m": _message_obj(packet.message),
         "u": [_member_obj(m) for m in packet.updates]}
    )


def encode_push_pull(pp: PushPull) -> bytes:
    return _dumps(
        {"v": VERSION, "f": pp.source, "j": pp.join, "s": [_member_obj(m) for m in pp.members]}
    )


def _loads(data: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise MalformedPacket(f"not JSON: {exc}") from None
    if not isinstance(obj, dict) or obj.get("v") != VERSION:
        raise MalformedPacket("not a version-1 object")
    return obj


def _str(v: object, limit: int = MAX_NAME) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise MalformedPacket("bad string")
    return v


def _int(v: object, lo: int = 0, hi: int = _MAX_INT) -> int:
    # bool is an int subclass; reject it so `true` never passes as a sequence number.
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise MalformedPacket("bad integer")
    return v


def _addr(host: object, port: object) -> Addr:
    h = _str(host)
    if not h:
        raise MalformedPacket("empty host")
    return (h, _int(port, 1, 65535))


def _list(v: object, limit: int) -> list[Any]:
    if not isinstance(v, list) or len(v) > limit:
        raise MalformedPacket("bad list")
    return v


def _member(v: object) -> Member:
    f = _list(v, 6)
    if len(f) != 6:
        raise MalformedPacket("bad member arity")
    name = _str(f[0])
    if not name:
        raise MalformedPacket("empty member name")
    state = _STATES.get(f[4]) if isinstance(f[4], str) else None
    if state is None:
        raise MalformedPacket("bad member state")
    raw_tags = f[5]
    if not isinstance(raw_tags, dict) or len(raw_tags) > MAX_TAGS:
        raise MalformedPacket("bad tags")
    tags = {_str(k, MAX_TAG_TEXT): _str(t, MAX_TAG_TEXT) for k, t in raw_tags.items()}
    return Member(name, _addr(f[1], f[2]), tags, state, _int(f[3]))


def _message(v: object) -> Message | None:
    if v is None:
        return None
    f = _list(v, 8)
    kind = f[0] if f else None
    if kind == "p" and len(f) == 4:
        return Ping(_int(f[1]), _str(f[2]), _str(f[3]))
    if kind == "k" and len(f) == 3:
        return Ack(_int(f[1]), _str(f[2]))
    if kind == "r" and len(f) == 8:
        return PingReq(
            _int(f[1]), _str(f[2]), _addr(f[3], f[4]), _str(f[5]), _addr(f[6], f[7])
        )
    raise MalformedPacket("unknown message")


def decode_packet(data: bytes) -> Packet:
    obj = _loads(data)
    updates = tuple(_member(u) for u in _list(obj.get("u"), MAX_UPDATES))
    return Packet(_message(obj.get("m")), updates)


def decode_push_pull(data: bytes) -> PushPull:
    obj = _loads(data)
    join = obj.get("j")
    if not isinstance(join, bool):
        raise MalformedPacket("bad join flag")
    members = tuple(_member(m) for m in _list(obj.get("s"), MAX_STATE_MEMBERS))
    return PushPull(_str(obj.get("f")), join, members)
