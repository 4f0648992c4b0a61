"""Hand-rolled protobuf encoding must match what protobuf itself parses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dcl.api.log.v1 import log_pb2
from dcl.server.records import (
    BATCH_OVERHEAD_BYTES,
    BATCH_RECORD_OVERHEAD_BYTES,
    consume_batch_response,
    consume_response,
    encode_consume_batch,
    encode_record,
    encode_varint,
)

pytestmark = pytest.mark.timeout(60)

offsets = st.integers(min_value=0, max_value=2**64 - 1)


@given(st.binary(max_size=300), offsets, st.integers(min_value=0, max_value=2**64 - 1))
def test_encoded_record_parses_to_the_same_fields(value: bytes, offset: int, term: int) -> None:
    record = log_pb2.Record.FromString(encode_record(value, offset, term))
    assert (record.value, record.offset, record.term) == (value, offset, term)


@given(st.integers(min_value=1, max_value=2**64 - 1))
def test_varint_matches_protobuf(value: int) -> None:
    # proto3 omits a zero field entirely, so compare only non-zero values.
    assert encode_varint(value) == log_pb2.ConsumeRequest(offset=value).SerializeToString()[1:]


@given(st.lists(st.binary(max_size=50), max_size=20), offsets)
def test_consume_batch_response_carries_records_in_order(
    values: list[bytes], next_offset: int
) -> None:
    stored = [encode_record(v, i) for i, v in enumerate(values)]
    response = consume_batch_response(stored, next_offset)
    assert [(r.value, r.offset) for r in response.records] == [
        (v, i) for i, v in enumerate(values)
    ]
    assert response.next_offset == next_offset


def test_consume_response_wraps_a_stored_record() -> None:
    response = consume_response(encode_record(b"payload", 42))
    assert (response.record.value, response.record.offset) == (b"payload", 42)


def test_a_consume_batch_is_never_larger_than_its_overhead_bounds() -> None:
    """Streams size a batch to the client's window from these bounds before encoding it."""
    for records, next_offset in [
        ([b""], 0),
        ([encode_record(b"x" * (1 << 20), 2**63 - 1, 2**63 - 1)], 2**64 - 1),
        ([encode_record(b"v" * n, n) for n in (0, 127, 128, 16383, 16384, 2**21)], 2**40),
    ]:
        bound = sum(len(r) + BATCH_RECORD_OVERHEAD_BYTES for r in records) + BATCH_OVERHEAD_BYTES
        assert len(encode_consume_batch(records, next_offset)) <= bound
