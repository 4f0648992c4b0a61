"""Hand-rolled protobuf encoding for the hot paths.

The commit log stores each record as a serialized ``log.v1.Record`` with its offset filled in
(DESIGN.md: "the store keeps ... the protobuf record"), so a stored record is served as-is and
always carries the right offset. Building a ``Record`` object per appended value would cost a
Python object and a serialize call per record; the wire format is simple enough to emit
directly. Likewise a ``ConsumeBatchResponse`` is the concatenation of its stored records framed
as field 1, so it is assembled as bytes and parsed once (in C) instead of record by record.
"""

from __future__ import annotations

from collections.abc import Sequence

from dcl.api.dcl.v1 import batch_pb2
from dcl.api.log.v1 import log_pb2

__all__ = [
    "BATCH_OVERHEAD_BYTES",
    "BATCH_RECORD_OVERHEAD_BYTES",
    "consume_batch_response",
    "consume_response",
    "encode_consume_batch",
    "encode_consume_response",
    "encode_produce_response",
    "encode_record",
    "encode_varint",
]

# Field keys: (field_number << 3) | wire_type; 2 = length-delimited, 0 = varint.
_RECORD_VALUE = b"\x0a"
_RECORD_OFFSET = b"\x10"
_RECORD_TERM = b"\x18"
_BATCH_RECORDS = b"\x0a"
_BATCH_NEXT_OFFSET = b"\x10"

_SMALL_VARINTS = [bytes([n]) for n in range(0x80)]


def encode_varint(value: int) -> bytes:
    """Base-128 varint of a non-negative integer, as protobuf encodes uint32/uint64."""
    if value < 0x80:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_record(value: bytes, offset: int, term: int = 0) -> bytes:
    """A serialized ``log.v1.Record{value, offset, term}`` (term omitted when 0)."""
    parts = [_RECORD_VALUE, encode_varint(len(value)), value, _RECORD_OFFSET, encode_varint(offset)]
    if term:
        parts += [_RECORD_TERM, encode_varint(term)]
    return b"".join(parts)


#: The most bytes `encode_consume_batch` adds to each record (its field key and a length of
#: at most 5 bytes) and to the message (the next offset field), to size a batch in advance.
BATCH_RECORD_OVERHEAD_BYTES = 6
BATCH_OVERHEAD_BYTES = 11


def encode_consume_batch(records: Sequence[bytes], next_offset: int) -> bytes:
    """A serialized ``ConsumeBatchResponse`` from already-serialized records."""
    parts: list[bytes] = []
    for record in records:
        parts += [_BATCH_RECORDS, encode_varint(len(record)), record]
    parts += [_BATCH_NEXT_OFFSET, encode_varint(next_offset)]
    return b"".join(parts)


def consume_batch_response(
    records: Sequence[bytes], next_offset: int
) -> batch_pb2.ConsumeBatchResponse:
    """Parse the hand-built bytes once; upb does the per-record work in C."""
    return batch_pb2.ConsumeBatchResponse.FromString(encode_consume_batch(records, next_offset))


_CONSUME_RECORD = b"\x12"  # ConsumeResponse.record is field 2


def encode_consume_response(record: bytes) -> bytes:
    """A serialized ``ConsumeResponse`` wrapping a stored (serialized) record."""
    return b"".join((_CONSUME_RECORD, encode_varint(len(record)), record))


def consume_response(record: bytes) -> log_pb2.ConsumeResponse:
    """A ``ConsumeResponse`` wrapping a stored record with one C-level parse."""
    return log_pb2.ConsumeResponse.FromString(encode_consume_response(record))


_PRODUCE_OFFSET = b"\x08"  # ProduceResponse.offset is field 1 (varint)


def encode_produce_response(offset: int) -> bytes:
    """A serialized ``ProduceResponse`` (proto3: offset 0 is the empty message)."""
    return _PRODUCE_OFFSET + encode_varint(offset) if offset else b""
