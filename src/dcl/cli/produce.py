"""``dcl produce``: append records given as arguments, or one per line of a file or stdin.

Input is sent in batches (ProduceBatch) of at most ``_BATCH_BYTES``, one call at a time, so
the records keep the input's order and each batch gets dense offsets. Reading the next
chunk of input overlaps with the call in flight. A batch that fails leaves the batches
before it appended; the error line says how many records made it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

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
from dcl.cli.errors import CliError, PartialProduce, fail, user_errors
from dcl.cli.output import progress, stderr_console
from dcl.client import DclClient
from dcl.client.client import VALUE_FRAMING_BYTES
from dcl.errors import DclError

__all__ = ["produce"]

#: Bytes per ProduceBatch call, counted as the client counts its chunks (each value and its
#: framing, `VALUE_FRAMING_BYTES`): below the client's 1 MiB chunk, so one call is one atomic
#: chunk and its offsets are dense. (Values alone undercounted tiny records: 200,000 values
#: of 2 bytes made two chunks, and a failure in the second reported none appended.)
_BATCH_BYTES = 512 * 1024
#: Bytes asked of the input per read; a pipe answers with whatever it has, so records
#: arriving slowly on stdin are sent as they come rather than when a batch fills.
_READ_BYTES = 256 * 1024


@dataclass
class _Tally:
    """What has been acknowledged so far, for the summary and for partial failures."""

    records: int = 0
    first_offset: int | None = None
    last_offset: int | None = None
    contiguous: bool = True
    offsets: list[int] = field(default_factory=list)
    keep_offsets: bool = False

    def add(self, first: int, count: int) -> None:
        if self.first_offset is None:
            self.first_offset = first
        elif self.last_offset is not None and first != self.last_offset + 1:
            self.contiguous = False
        self.last_offset = first + count - 1
        self.records += count
        if self.keep_offsets:
            self.offsets.extend(range(first, first + count))

    def summary(self) -> str:
        if not self.records:
            return "produced 0 records"
        if self.contiguous:
            return (f"produced {self.records} records at offsets "
                    f"{self.first_offset}-{self.last_offset}")
        return (f"produced {self.records} records from offset {self.first_offset} to "
                f"{self.last_offset} (interleaved with other producers)")


def _batches(values: Sequence[bytes]) -> list[Sequence[bytes]]:
    batches: list[Sequence[bytes]] = []
    start = size = 0
    for index, value in enumerate(values):
        cost = len(value) + VALUE_FRAMING_BYTES
        if index > start and size + cost > _BATCH_BYTES:
            batches.append(values[start:index])
            start, size = index, 0
        size += cost
    if start < len(values):
        batches.append(values[start:])
    return batches


async def _send(client: DclClient, values: Sequence[bytes], tally: _Tally) -> None:
    for batch in _batches(values):
        try:
            first = await client.produce_batch(batch)
        except DclError as exc:
            raise PartialProduce(tally.records, tally.last_offset, exc) from exc
        tally.add(first, len(batch))


def _read_soon(loop: asyncio.AbstractEventLoop, fd: int) -> asyncio.Future[bytes]:
    """os.read(fd) on a daemon thread: a read blocked on a quiet pipe must not keep the
    process alive after an error (the default executor would be joined at exit)."""
    future: asyncio.Future[bytes] = loop.create_future()

    def deliver(data: bytes | None, error: OSError | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            assert data is not None
            future.set_result(data)

    def work() -> None:
        try:
            data, error = os.read(fd, _READ_BYTES), None
        except OSError as exc:
            data, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: the command ended
            loop.call_soon_threadsafe(deliver, data, error)

    threading.Thread(target=work, name="dcl-produce-read", daemon=True).start()
    return future


async def _produce_lines(client: DclClient, fd: int, total: int | None, tally: _Tally) -> None:
    loop = asyncio.get_running_loop()
    with progress(in_bytes=total is not None) as bar:
        task = bar.add_task("producing", total=total)
        pending = _read_soon(loop, fd)
        leftover = b""
        while True:
            data = await pending
            if data:
                pending = _read_soon(loop, fd)
                lines = (leftover + data).split(b"\n")
                leftover = lines.pop()
            else:
                lines, leftover = ([leftover] if leftover else []), b""
            if lines:
                await _send(client, lines, tally)
            bar.update(task, advance=len(data) if total is not None else len(lines))
            if not data:
                return


def produce(
    values: Annotated[list[str] | None, typer.Argument(
        help="Record values, one record each. Without values, records are read one per "
             "line from --file or stdin.", show_default=False)] = None,
    file: Annotated[Path | None, typer.Option(
        "--file", "-f", help="Read one record per line from this file ('-' is stdin).",
        show_default=False)] = None,
    addr: AddrOpt = None,
    ca_file: CaFileOpt = DEFAULT_CA_FILE,
    cert_file: CertFileOpt = DEFAULT_CERT_FILE,
    key_file: KeyFileOpt = DEFAULT_KEY_FILE,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Append records. Prints each offset for values given as arguments, else a summary."""
    conn = Connection.from_options(addr, ca_file, cert_file, key_file, timeout)
    tally = _Tally(keep_offsets=bool(values))
    if values:
        if file is not None:
            fail("give record values or --file, not both")
        encoded = [v.encode() for v in values]
        conn.run(lambda client: _send(client, encoded, tally))
        typer.echo("\n".join(str(o) for o in tally.offsets))
        return
    with user_errors():
        fd, owned, total = _open_input(file)
    try:
        if os.isatty(fd):
            stderr_console.print("reading records from stdin, one per line; Ctrl-D ends")
        conn.run(lambda client: _produce_lines(client, fd, total, tally))
    finally:
        if owned:
            os.close(fd)
    typer.echo(tally.summary())


def _open_input(file: Path | None) -> tuple[int, bool, int | None]:
    """(fd, whether we opened it, size in bytes when known)."""
    if file is None or str(file) == "-":
        return sys.stdin.fileno(), False, None
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError as exc:
        raise CliError(f"cannot read {file}: {exc.strerror or exc}") from None
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        os.close(fd)
        raise CliError(f"cannot read {file}: it is a directory")
    return fd, True, info.st_size if stat.S_ISREG(info.st_mode) else None
