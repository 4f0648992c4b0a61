"""``dcl consume``: print records from an offset, to the end of the log or following it.

Without ``--follow`` the command first asks the leader where the log ends, then streams
from a follower until it reaches that offset: the output is exactly the records committed
when the command started (from ``--from``), even when the follower it reads from lags.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import json
import sys
from typing import Annotated, BinaryIO

import typer

from dcl.cli.connection import (
    DEFAULT_CA_FILE,
    DEFAULT_CERT_FILE,
    DEFAULT_KEY_FILE,
    DEFAULT_TIMEOUT,
    AddrOpt,
    CaFileOpt,
    CertFileOpt,
    Connection,
    KeyFileOpt,
    TimeoutOpt,
)
from dcl.cli.errors import fail
from dcl.client import DclClient
from dcl.errors import OffsetOutOfRange

__all__ = ["OutputFormat", "consume"]


class OutputFormat(enum.StrEnum):
    raw = "raw"
    json = "json"


def _json_line(offset: int, value: bytes) -> bytes:
    try:
        item: dict[str, object] = {"offset": offset, "value": value.decode()}
    except UnicodeDecodeError:
        item = {"offset": offset, "value_base64": base64.b64encode(value).decode()}
    return json.dumps(item, ensure_ascii=False).encode() + b"\n"


def _render(batch: list[tuple[int, bytes]], output: OutputFormat) -> bytes:
    if output is OutputFormat.json:
        return b"".join(_json_line(offset, value) for offset, value in batch)
    return b"".join(value + b"\n" for _, value in batch)


async def _consume(
    client: DclClient,
    start: str,
    count: int | None,
    follow: bool,
    output: OutputFormat,
    out: BinaryIO,
) -> None:
    if start == "start":
        first = await client.start_offset()
    else:
        first = await client.end_offset() if start == "end" else int(start)
    end = await client.end_offset(first)  # OffsetOutOfRange if first is not readable
    while True:
        refused = await _print_from(client, first, end, count, follow, output, out)
        if refused is None:
            return
        # From 'start', the follower read from has cut its log further than the leader
        # (each node applies retention on its own): begin where that one starts.
        if start != "start" or refused.lowest is None or refused.lowest <= first:
            raise refused
        first = refused.lowest


async def _print_from(
    client: DclClient, first: int, end: int, count: int | None, follow: bool,
    output: OutputFormat, out: BinaryIO,
) -> OffsetOutOfRange | None:
    """Print from `first`; the error instead if the first read is out of range (nothing
    printed yet, so the caller may start elsewhere without leaving a gap)."""
    limit = count
    if not follow:
        limit = min(end - first, count) if count is not None else max(0, end - first)
    if limit == 0:
        return None
    written = 0
    batches = client.stream_batches(first)
    async with contextlib.aclosing(batches):
        try:
            async for batch in batches:
                if limit is not None and written + len(batch) >= limit:
                    batch = batch[: limit - written]
                out.write(_render(batch, output))
                out.flush()
                written += len(batch)
                if limit is not None and written >= limit:
                    return None
        except OffsetOutOfRange as exc:
            if written:
                raise
            return exc
    return None


def consume(
    from_: Annotated[str, typer.Option(
        "--from", help="First offset to print; 'start': the first the log still holds "
        "(0 unless retention dropped older records); 'end': records produced from now on.")
    ] = "start",
    count: Annotated[int | None, typer.Option(
        "--count", "-n", min=1, help="Stop after this many records.", show_default=False)
    ] = None,
    follow: Annotated[bool, typer.Option(
        "--follow", help="Keep printing new records as they are committed, until Ctrl-C "
        "(or --count).")] = False,
    output: Annotated[OutputFormat, typer.Option(
        "--output", "-o", help="raw: each value on its own line; json: one "
        '{"offset", "value"} object per line (value_base64 for non-UTF-8 values).')
    ] = OutputFormat.raw,
    addr: AddrOpt = None,
    ca_file: CaFileOpt = DEFAULT_CA_FILE,
    cert_file: CertFileOpt = DEFAULT_CERT_FILE,
    key_file: KeyFileOpt = DEFAULT_KEY_FILE,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Print records from --from to the end of the log (or on, with --follow)."""
    if from_ not in ("start", "end") and not from_.isdigit():
        fail(f"--from takes an offset (a non-negative integer), 'start' or 'end', not {from_!r}")
    conn = Connection.from_options(addr, ca_file, cert_file, key_file, timeout)
    out = sys.stdout.buffer
    conn.run(lambda client: _consume(client, from_, count, follow, output, out))
