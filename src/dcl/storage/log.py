"""The log: a directory of segments holding consecutive offsets [lowest_offset, next_offset).

Invariants: segments are ordered by base offset and contiguous (each segment's next offset is the
next one's base); only the last segment (the active one) receives appends and may hold unsynced
data; every earlier segment was fsynced when the log rolled past it.

One `Log` per directory: the directory is flock()ed while open (`LogInUse` otherwise).

Thread-safety: one thread (the asyncio loop) calls everything, except `sync()`, which may run
concurrently in an executor thread while the loop keeps appending: it flushes the active store's
buffer under that store's lock and fsyncs a duplicate fd outside it. `sync()` makes durable every
record appended before it was called (segments rolled past were synced before the roll).
A roll therefore costs the appending thread one fsync per full segment (64 MiB by default).
"""

from __future__ import annotations

import bisect
import fcntl
import io
import logging
import os
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from dcl.errors import CorruptRecord, DclError, InvalidRequest, OffsetOutOfRange
from dcl.storage.index import ENTRY_SIZE
from dcl.storage.segment import (
    INDEX_SUFFIX,
    STORE_SUFFIX,
    Segment,
    parse_segment_file,
    segment_name,
)
from dcl.storage.store import HEADER, HEADER_SIZE, BytesLike

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

logger = logging.getLogger("dcl.storage")

_MAX_RELATIVE_OFFSET = 2**32
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Segment limits. A segment is full when either its store or its index reaches its limit."""

    max_store_bytes: int = 64 * 1024 * 1024
    max_index_bytes: int = 12 * 1024 * 1024
    initial_offset: int = 0
    #: False for logs that never store an empty record (the Raft log, the commit log): then
    #: recovery and `verify` take a zero-length frame for the zero fill or zeroed block it
    #: looks like, instead of an empty record that happens to pass its CRC.
    empty_records: bool = True

    def __post_init__(self) -> None:
        if self.max_store_bytes <= 0:
            raise ValueError("max_store_bytes must be positive")
        if self.max_index_bytes < ENTRY_SIZE or self.max_index_bytes % ENTRY_SIZE:
            raise ValueError(f"max_index_bytes must be a positive multiple of {ENTRY_SIZE}")
        if self.max_index_bytes // ENTRY_SIZE > _MAX_RELATIVE_OFFSET:
            raise ValueError("max_index_bytes allows more entries than a uint32 offset can name")
        if self.initial_offset < 0:
            raise ValueError("initial_offset must be >= 0")


class LogClosed(DclError):
    """The log was closed or removed; open a new `Log` to use the directory again."""


class LogInUse(DclError):
    """Another open `Log` holds the directory: two writers would corrupt each other's tail."""


class Log:
    """A segmented, crash-safe, append-only log of byte records addressed by offset."""

    def __init__(
        self, directory: str | os.PathLike[str], config: LogConfig = LogConfig()
    ) -> None:
        self.directory = Path(directory)
        self.config = config
        self.directory.mkdir(parents=True, exist_ok=True)
        self._segments: list[Segment] = []
        self._bases: list[int] = []
        self._closed = False
        self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._dir_fd)
            raise LogInUse(f"log directory {self.directory} is open elsewhere") from None
        try:
            self._open_segments()
        except BaseException:
            os.close(self._dir_fd)
            raise

    # -- properties -----------------------------------------------------------------------

    @property
    def lowest_offset(self) -> int:
        return self._segments[0].base_offset

    @property
    def highest_offset(self) -> int:
        """Last offset written; `lowest_offset - 1` when the log is empty."""
        return self._segments[-1].next_offset - 1

    @property
    def next_offset(self) -> int:
        return self._segments[-1].next_offset

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    # -- writes ---------------------------------------------------------------------------

    def append(self, value: BytesLike) -> int:
        """Append one record (buffered, not yet durable); return its offset."""
        if self._closed:
            raise LogClosed(f"log {self.directory} is closed")
        if not (value or self.config.empty_records):
            raise InvalidRequest(f"log {self.directory} does not store empty records")
        segment = self._segments[-1]
        if segment.is_full():
            segment = self._roll()
        return segment.append(value)

    def append_batch(self, values: Sequence[BytesLike]) -> int:
        """Append records with consecutive offsets; return the first (next_offset if empty)."""
        self._check_open()
        if not self.config.empty_records and not all(values):
            raise InvalidRequest(f"log {self.directory} does not store empty records")
        first = self.next_offset
        i = 0
        count = len(values)
        while i < count:
            segment = self._segments[-1]
            if segment.is_full():
                segment = self._roll()
            i = segment.append_batch(values, i)
        return first

    def flush(self) -> None:
        """Buffered records reach the OS (visible to other fds, survive a process crash)."""
        self._check_open()
        self._segments[-1].flush()

    def sync(self) -> None:
        """Flush and fsync: the durability point. Safe to call from an executor thread."""
        if self._closed:
            return
        self._segments[-1].sync()

    def sync_submit(self, submit: Callable[[int], _T]) -> _T | None:
        """Start an asynchronous `sync()`: see `Store.sync_submit`. None if closed."""
        if self._closed:
            return None
        return self._segments[-1].store.sync_submit(submit)

    # -- reads ----------------------------------------------------------------------------

    def read(self, offset: int) -> bytes:
        """The record at `offset`; OffsetOutOfRange if absent, CorruptRecord if damaged."""
        if self._closed:
            raise LogClosed(f"log {self.directory} is closed")
        segment = self._segments[-1]
        if offset >= segment.base_offset and offset < segment.next_offset:
            return segment.read(offset)
        return self._segment_for(offset).read(offset)

    def read_batch(self, offset: int, max_records: int, max_bytes: int) -> list[bytes]:
        """Records from `offset` on, at most `max_records` and `max_bytes` of payload.

        Returns at least one record when `offset` is in the log, even if that record alone
        exceeds `max_bytes`. Crosses segment boundaries.
        """
        if max_records <= 0 or max_bytes < 0:
            raise InvalidRequest("max_records must be > 0 and max_bytes >= 0")
        segment = self._segment_for(offset)
        position = bisect.bisect_right(self._bases, segment.base_offset) - 1
        out: list[bytes] = []
        used = 0
        while True:
            before = len(out)
            used += segment.read_batch(offset, max_records - len(out), max_bytes - used, out)
            position += 1
            if (
                offset + len(out) - before < segment.next_offset
                or len(out) >= max_records
                or used >= max_bytes
                or position >= len(self._segments)
                or segment.damaged_at is not None
            ):
                return out
            segment = self._segments[position]
            offset = segment.base_offset

    def verify(self, skip: Mapping[int, Sequence[int]] | None = None) -> int | None:
        """The lowest offset whose record does not read back intact, or None if every one does.

        Opening a log checks only what a crash can damage (the active segment's tail), in time
        independent of the log's size. This is the full check for damage a crash cannot explain
        (a zeroed block or bit rot in a sealed segment): it reads every byte, about 1 s per GiB
        of 1 KiB records and 5 s per GiB of 100 B records on these machines (one CRC and a few
        struct calls per record; see bench/storage.py, "verify"). `skip` maps a sealed segment's
        base offset to the `sealed_stamps()` taken when it was last verified: a segment whose
        store file was not written since is not read again. The active segment is always read.

        Records below the returned offset are intact; the caller decides what to do with the
        rest (cut them and rebuild from a replica, or let reads keep failing `CorruptRecord`).
        """
        self._check_open()
        self.flush()
        segments = self._segments
        for i, segment in enumerate(segments):
            sealed = i + 1 < len(segments)
            if sealed and skip and tuple(skip.get(segment.base_offset, ())) == (
                segment.store.stamp()
            ):
                continue
            bad = segment.verify()
            if bad is not None:
                return bad
            if sealed and segment.next_offset < segments[i + 1].base_offset:
                return segment.next_offset  # the framing broke: the segment's tail is missing
        return None

    def segment_spans(self) -> list[tuple[int, int, int]]:
        """(base offset, next offset, store bytes) of every segment, oldest first: what a
        retention policy needs to choose where `truncate_before` cuts."""
        self._check_open()
        return [(s.base_offset, s.next_offset, s.end_position) for s in self._segments]

    def last_written(self, base_offset: int) -> float:
        """When the segment starting at `base_offset` was last appended to (its store
        file's mtime, epoch seconds): what age-based retention goes by."""
        self._check_open()
        segment = self._segments[bisect.bisect_left(self._bases, base_offset)]
        if segment.base_offset != base_offset:
            raise ValueError(f"no segment starts at offset {base_offset}")
        return segment.store.stamp()[2] / 1e9

    def sealed_stamps(self) -> dict[int, tuple[int, int, int, int]]:
        """`Store.stamp()` of every sealed (non-active) segment, by base offset, for `verify`."""
        self._check_open()
        return {s.base_offset: s.store.stamp() for s in self._segments[:-1]}

    def reader(self) -> LogReader:
        """A stream of every segment's store bytes, in order: a consistent cut for snapshots.

        The stream holds its own file descriptors, so later appends are not included and
        truncation or removal of segments does not disturb it. Close it when done.
        """
        self._check_open()
        self.flush()
        parts = [(segment.store.dup_fd(), segment.end_position) for segment in self._segments]
        return LogReader(parts)

    # -- truncation -----------------------------------------------------------------------

    def truncate_before(self, offset: int) -> None:
        """Drop whole segments whose records are all below `offset` (retention/compaction).

        Records at or above `offset` are never dropped, so `lowest_offset` may stay below it.
        If every record is below it, the log becomes empty and continues at its next offset.
        """
        self._check_open()
        removed = False
        while len(self._segments) > 1 and self._segments[0].next_offset <= offset:
            self._segments.pop(0).remove()
            self._bases.pop(0)
            removed = True
        last = self._segments[0]
        if len(self._segments) == 1 and last.index.entries and last.next_offset <= offset:
            # Create the empty successor before removing the last segment, so a crash in between
            # leaves a valid log that still knows its next offset (never one that restarts at 0).
            fresh = self._new_segment(last.next_offset)
            self._sync_directory()
            last.remove()
            self._segments = [fresh]
            self._bases = [fresh.base_offset]
            removed = True
        if removed:
            self._sync_directory()

    def truncate_after(self, offset: int) -> None:
        """Remove every record with an offset greater than `offset` (a Raft conflicting suffix).

        `offset == lowest_offset - 1` empties the log. The cut (store and index) is fsynced
        before returning, so removed records cannot reappear after a crash, and stale index
        entries cannot resurface after a power loss to point into records written later.
        """
        self._check_open()
        if offset >= self.highest_offset:
            return
        if offset < self.lowest_offset - 1:
            raise OffsetOutOfRange(offset, self.lowest_offset, self.next_offset)
        removed = False
        while len(self._segments) > 1 and self._segments[-1].base_offset > offset:
            self._segments.pop().remove()
            self._bases.pop()
            removed = True
        if removed:
            self._sync_directory()
        segment = self._segments[-1]
        segment.truncate_after(offset)
        segment.sync()
        segment.index.sync()

    def reset(self, initial_offset: int = 0) -> None:
        """Remove every record and segment; continue empty at `initial_offset`.

        Not atomic across a crash: if interrupted, the directory may be left empty and then
        reopens at `config.initial_offset`. Callers that need the offset (Raft installing a
        snapshot) persist it themselves.
        """
        self._check_open()
        if initial_offset < 0:
            raise InvalidRequest("initial_offset must be >= 0")
        self._replace_all(initial_offset)

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Sync the active segment, then close every segment (trimming the indexes)."""
        if self._closed:
            return
        self._segments[-1].sync()
        for segment in self._segments:
            segment.close()
        self._closed = True
        os.close(self._dir_fd)  # releases the directory lock

    def remove(self) -> None:
        """Close and delete all segment files, and the directory if nothing else is in it."""
        if not self._closed:
            for segment in self._segments:
                segment.remove()
            self._closed = True
            os.close(self._dir_fd)
        else:
            for segment in self._segments:
                for path in (segment.store.path, segment.index.path):
                    if os.path.exists(path):
                        os.unlink(path)
        try:
            self.directory.rmdir()
        except OSError:
            logger.info("log directory kept: not empty path=%s", self.directory)

    def __enter__(self) -> Log:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise LogClosed(f"log {self.directory} is closed")

    def _segment_for(self, offset: int) -> Segment:
        self._check_open()
        lowest = self._segments[0].base_offset
        next_offset = self._segments[-1].next_offset
        if offset < lowest or offset >= next_offset:
            raise OffsetOutOfRange(offset, lowest, next_offset)
        segment = self._segments[bisect.bisect_right(self._bases, offset) - 1]
        if offset >= segment.next_offset:
            position = segment.damaged_at
            raise CorruptRecord(
                segment.store.path,
                segment.end_position if position is None else position,
                "record missing: store framing broken",
            )
        return segment

    def _new_segment(self, base_offset: int) -> Segment:
        config = self.config
        return Segment(
            self.directory, base_offset, config.max_store_bytes, config.max_index_bytes,
            allow_empty=config.empty_records,
        )

    def _roll(self) -> Segment:
        """Seal the active segment (fsync store and index) and start a new one after it."""
        self._check_open()
        old = self._segments[-1]
        old.sync()
        old.index.sync()
        segment = self._new_segment(old.next_offset)
        self._sync_directory()
        self._segments.append(segment)
        self._bases.append(segment.base_offset)
        return segment

    def _replace_all(self, base_offset: int) -> None:
        for segment in self._segments:
            segment.remove()
        fresh = self._new_segment(base_offset)
        self._segments = [fresh]
        self._bases = [base_offset]
        self._sync_directory()

    def _open_segments(self) -> None:
        stores: set[int] = set()
        indexes: set[int] = set()
        for name in os.listdir(self.directory):
            parsed = parse_segment_file(name)
            if parsed is None:
                continue
            base, suffix = parsed
            (stores if suffix == STORE_SUFFIX else indexes).add(base)
        for base in indexes - stores:
            # Left behind by a crash while removing a segment (the store goes first).
            os.unlink(self.directory / (segment_name(base) + INDEX_SUFFIX))
        bases = sorted(stores)
        if not bases:
            self._segments = [self._new_segment(self.config.initial_offset)]
            self._bases = [self.config.initial_offset]
            self._sync_directory()
            return
        config = self.config
        for i, base in enumerate(bases):
            self._segments.append(
                Segment(
                    self.directory,
                    base,
                    config.max_store_bytes,
                    config.max_index_bytes,
                    trim_torn_tail=i == len(bases) - 1,
                    sealed_entries=bases[i + 1] - base if i + 1 < len(bases) else None,
                    allow_empty=config.empty_records,
                )
            )
            self._bases.append(base)
        for earlier, later in zip(self._segments, self._segments[1:], strict=False):
            if earlier.next_offset > later.base_offset:
                for segment in self._segments:
                    segment.close()
                raise CorruptRecord(
                    later.store.path, 0, f"segment overlaps the one before it "
                    f"(which ends at offset {earlier.next_offset})"
                )
            if earlier.next_offset < later.base_offset and earlier.damaged_at is None:
                earlier.damaged_at = earlier.end_position
        logger.info(
            "log opened path=%s segments=%d lowest=%d next=%d",
            self.directory, len(self._segments), self.lowest_offset, self.next_offset,
        )

    def _sync_directory(self) -> None:
        """Make file creation and removal durable."""
        os.fsync(self._dir_fd)


class LogReader(io.RawIOBase):
    """Reads the framed bytes of a sequence of store files back to back."""

    def __init__(self, parts: list[tuple[int, int]]) -> None:
        super().__init__()
        self._parts = parts
        self._part = 0
        self._position = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        while self._part < len(self._parts):
            fd, size = self._parts[self._part]
            remaining = size - self._position
            if remaining <= 0:
                self._part += 1
                self._position = 0
                continue
            count = os.preadv(fd, [view[: min(len(view), remaining)]], self._position)
            if count == 0:
                raise CorruptRecord(f"fd:{fd}", self._position, "store shorter than indexed")
            self._position += count
            return count
        return 0

    def close(self) -> None:
        if not self.closed:
            for fd, _ in self._parts:
                os.close(fd)
        super().close()


def iter_records(
    stream: io.RawIOBase | io.BufferedIOBase, chunk_size: int = 1 << 20
) -> Iterator[bytes]:
    """Decode records from a `Log.reader()` stream (snapshot restore), checking every CRC."""
    pending = b""
    consumed = 0
    while True:
        chunk = stream.read(chunk_size)
        if chunk is None:
            continue
        if not chunk:
            break
        data = pending + chunk
        p = 0
        while p + HEADER_SIZE <= len(data):
            length, crc = HEADER.unpack_from(data, p)
            end = p + HEADER_SIZE + length
            if end > len(data):
                break
            payload = data[p + HEADER_SIZE : end]
            if zlib.crc32(payload) != crc:
                raise CorruptRecord("<stream>", consumed + p)
            yield payload
            p = end
        consumed += p
        pending = data[p:]
    if pending:
        raise CorruptRecord("<stream>", consumed, "stream ends inside a record")
