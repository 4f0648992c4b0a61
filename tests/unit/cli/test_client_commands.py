"""The client commands' pure parts: error wording, batching, offsets summary, percentiles."""

from __future__ import annotations

import ssl

import pytest
from grpclib.exceptions import StreamTerminatedError

from dcl.cli.bench import percentile
from dcl.cli.errors import CliError, PartialProduce, describe
from dcl.cli.produce import _BATCH_BYTES, _batches, _Tally
from dcl.client import ProduceOutcomeUnknown
from dcl.errors import OffsetOutOfRange, PermissionDenied, Unavailable


def unavailable(cause: BaseException | None) -> Unavailable:
    try:
        raise Unavailable("no server answered GetServers") from cause
    except Unavailable as exc:
        return exc


@pytest.mark.parametrize(("cause", "expected"), [
    (ConnectionRefusedError(111, "refused"), "connection refused"),
    (StreamTerminatedError("Connection lost"), "does not accept this client certificate"),
    (ssl.SSLCertVerificationError(1, "verify failed"), "--ca-file does not trust"),
    (TimeoutError(), "timed out"),
    (None, "cluster unavailable"),
])
def test_unreachable_cluster_is_described_by_its_cause(
    cause: BaseException | None, expected: str
) -> None:
    line = describe(unavailable(cause), ["127.0.0.1:8400"])
    assert line is not None and expected in line and "\n" not in line


def test_user_errors_have_one_line_and_bugs_have_none() -> None:
    assert describe(OffsetOutOfRange(7, 0, 5)) == "offset out of range: 7 (log holds [0, 5))"
    assert "permission denied" in (describe(PermissionDenied("nobody", "produce")) or "")
    assert describe(CliError("no such file: x")) == "no such file: x"
    assert describe(FileNotFoundError(2, "No such file or directory", "x.txt")) == (
        "x.txt: No such file or directory")
    unknown = ProduceOutcomeUnknown("127.0.0.1:8400", TimeoutError())
    assert "may or may not" in (describe(unknown) or "")
    partial = describe(PartialProduce(10, 9, PermissionDenied("nobody", "produce")))
    assert partial is not None and partial.endswith("10 records were appended (up to offset 9)")
    assert describe(ValueError("a bug")) is None


def test_batches_stay_under_the_byte_budget_and_keep_order() -> None:
    values = [b"x" * 1000] * 2000
    batches = _batches(values)
    assert [v for b in batches for v in b] == values
    assert all(sum(map(len, b)) <= _BATCH_BYTES for b in batches)
    assert _batches([b"y" * (2 * _BATCH_BYTES)]) == [[b"y" * (2 * _BATCH_BYTES)]]


def test_tally_summarises_contiguous_and_interleaved_offsets() -> None:
    tally = _Tally()
    tally.add(10, 5)
    tally.add(15, 5)
    assert tally.summary() == "produced 10 records at offsets 10-19"
    tally.add(30, 1)
    assert "interleaved" in tally.summary()
    assert _Tally().summary() == "produced 0 records"


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([3.0], 0.9) == 3.0
    assert percentile([], 0.5) == 0.0
