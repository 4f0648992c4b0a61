"""A segment: one store plus its index, named by the base offset of its first record.

Recovery contract (`Segment.__init__`): the index is trusted up to where it reconciles with the
store (binary search, no per-record work), then only the tail is verified frame by frame:
the last indexed record and any records past the index. In the active (last) segment a torn tail
(incomplete frame, or a bad final frame, or zero fill) is what kill -9 or power loss leaves
behind, and is trimmed. A bad frame with valid data after it is corruption, not a torn write: it
stays indexed so that reading it raises `CorruptRecord`. In a closed (sealed) segment nothing is
trimmed: when its index accounts for every record (the next segment's base says how many), the
index is trusted and nothing is read; otherwise the store is walked, and if its framing breaks,
the unreadable remainder is reported by `damaged_at`. Damage recovery does not look for (a zeroed
block inside a sealed segment) fails the CRC or length check on read; `verify` finds it up front.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

from dcl.errors import CorruptRecord, OffsetOutOfRange
from dcl.storage.index import ENTRY, ENTRY_SIZE, Index
from dcl.storage.store import HEADER, HEADER_SIZE, BytesLike, Store

logger = logging.getLogger("dcl.storage")

STORE_SUFFIX = ".store"
INDEX_SUFFIX = ".index"
_NAME = re.compile(r"^(\d{20})\.(store|index)$")
_POSITION = struct.Struct(">Q")


def segment_name(base_offset: int) -> str:
    """Zero-padded so a directory listing sorts in offset order."""
    return f"{base_offset:020d}"


def parse_segment_file(name: str) -> tuple[int, str] | None:
    """(base offset, suffix) for a segment file name, or None for anything else.

    Only the canonical 20-digit form is accepted: "42.store" and "00042.store" would both parse
    to 42 yet name different files, so anything but `segment_name()` output is ignored.
    """
    match = _NAME.match(name)
    if match is None:
        return None
    return int(match.group(1)), "." + match.group(2)


class Segment:
    """Records [base_offset, next_offset). Appends only ever go to the log's last segment."""

    __slots__ = (
        "_end",
        "allow_empty",
        "base_offset",
        "damaged_at",
        "index",
        "max_store_bytes",
        "store",
    )

    def __init__(
        self,
        directory: str | os.PathLike[str],
        base_offset: int,
        max_store_bytes: int,
        max_index_bytes: int,
        *,
        trim_torn_tail: bool = True,
        sealed_entries: int | None = None,
        allow_empty: bool = True,
    ) -> None:
        stem = Path(directory) / segment_name(base_offset)
        self.base_offset = base_offset
        # False when the log never stores empty records: then a zero-length frame (twelve zero
        # bytes, exactly what zero fill looks like) is damage, never a record.
        self.allow_empty = allow_empty
        self.max_store_bytes = max_store_bytes
        self.damaged_at: int | None = None
        self.store = Store(stem.with_suffix(STORE_SUFFIX))
        self.index = Index(stem.with_suffix(INDEX_SUFFIX), max_index_bytes)
        self._end = 0
        self._recover(trim_torn_tail, sealed_entries)

    @property
    def next_offset(self) -> int:
        return self.base_offset + self.index.entries

    @property
    def end_position(self) -> int:
        """Store position just past the last indexed record."""
        return self._end

    def is_full(self) -> bool:
        return self._end >= self.max_store_bytes or self.index.entries >= self.index.capacity

    def append(self, value: BytesLike) -> int:
        """Append one record; return its offset. The caller checks `is_full()` first."""
        relative = self.index.entries
        written, position = self.store.append(value)
        self.index.write(relative, position)
        self._end = position + written
        return self.base_offset + relative

    def append_batch(self, values: Sequence[BytesLike], start: int) -> int:
        """Append values[start:] until the segment is full; return the index of the next value.

        Builds one joined buffer of frames and one packed run of index entries, so the per-record
        cost is a CRC, two struct packs and list appends.
        """
        index = self.index
        first = relative = index.entries
        capacity = index.capacity
        max_store = self.max_store_bytes
        position = self._end
        frames: list[BytesLike] = []
        entries: list[bytes] = []
        pack_header = HEADER.pack
        pack_entry = ENTRY.pack
        crc32 = zlib.crc32
        i = start
        count = len(values)
        while i < count and relative < capacity and position < max_store:
            value = values[i]
            length = len(value)
            frames.append(pack_header(length, crc32(value)))
            frames.append(value)
            entries.append(pack_entry(relative, position))
            position += HEADER_SIZE + length
            relative += 1
            i += 1
        if relative > first:
            self.store.append_frames(b"".join(frames))
            index.write_many(first, b"".join(entries))
            self._end = position
        return i

    def read(self, offset: int) -> bytes:
        relative = offset - self.base_offset
        entries = self.index.entries
        if relative < 0 or relative >= entries:
            raise OffsetOutOfRange(offset, self.base_offset, self.base_offset + entries)
        mm = self.index.mm
        at = relative * ENTRY_SIZE
        position: int = _POSITION.unpack_from(mm, at + 4)[0]
        end: int = _POSITION.unpack_from(mm, at + 16)[0] if relative + 1 < entries else self._end
        return self.store.read_frame(position, end - position)

    def read_batch(
        self, offset: int, max_records: int, max_bytes: int, out: list[bytes]
    ) -> int:
        """Append up to `max_records` records from `offset` to `out`; return payload bytes added.

        `max_bytes` bounds payload bytes, except that a record is always added when `out` is
        empty (a consumer must make progress even past one oversized record). One pread covers
        the whole window; every record's CRC is still checked.
        """
        relative = offset - self.base_offset
        entries = self.index.entries
        count = min(max_records, entries - relative)
        if count <= 0 or relative < 0:
            return 0
        index = self.index
        start = index.position(relative)
        stop = index.position(relative + count) if relative + count < entries else self._end
        window_end = min(stop, start + max_bytes + HEADER_SIZE * count)
        first_end = index.position(relative + 1) if relative + 1 < entries else self._end
        if not (first_end - start >= HEADER_SIZE and first_end <= stop <= self._end):
            raise CorruptRecord(self.store.path, start, "index entry out of bounds")
        window_end = max(window_end, first_end)
        data = self.store.read_at(start, window_end - start)
        unpack_header = HEADER.unpack_from
        crc32 = zlib.crc32
        size = len(data)
        used = 0
        added = 0
        p = 0
        while added < count and p + HEADER_SIZE <= size:
            length, crc = unpack_header(data, p)
            end = p + HEADER_SIZE + length
            if end > size:
                break
            if out and used + length > max_bytes:
                break
            payload = data[p + HEADER_SIZE : end]
            if crc32(payload) != crc:
                raise CorruptRecord(self.store.path, start + p)
            out.append(payload)
            used += length
            added += 1
            p = end
        # The frames parsed must end exactly where the index says the next record starts;
        # otherwise a damaged entry made us parse from the wrong place.
        boundary = relative + added
        expected = index.position(boundary) if boundary < entries else self._end
        if start + p != expected or (added == 0 and not out):
            raise CorruptRecord(self.store.path, start, "frames disagree with index")
        return used

    def truncate_after(self, offset: int) -> None:
        """Keep records <= offset (offset >= base_offset - 1); the store is cut to match.

        Unreadable bytes past the last indexed record (`damaged_at`) are cut too, so a damaged
        closed segment can become the active one and be appended to.
        """
        keep = offset + 1 - self.base_offset
        if keep >= self.index.entries:
            if self.store.size > self._end:
                self.store.truncate(self._end)
            self.damaged_at = None
            return
        end = self.index.position(keep)
        self.store.truncate(end)
        self.index.set_entries(keep)
        self._end = end
        self.damaged_at = None

    def verify(self, window_bytes: int = 8 << 20) -> int | None:
        """Offset of the first indexed record that does not read back intact; None if all do.

        Unlike recovery, which checks only the tail, this reads the whole store: every frame's
        CRC, and every index entry against the frame chain (so a damaged entry or length field
        is found here, not by a reader). Sequential windows of `window_bytes`; O(bytes), with
        one CRC, one unpack and one pack per record.
        """
        index = self.index
        entries = index.entries
        mm = index.mm
        crc32 = zlib.crc32
        unpack_header = HEADER.unpack_from
        pack_entry = ENTRY.pack
        allow_empty = self.allow_empty
        relative = 0
        position = 0
        while relative < entries:
            data = self.store.read_at(position, min(window_bytes, self._end - position))
            view = memoryview(data)
            size = len(data)
            first = relative
            packed: list[bytes] = []
            bad: int | None = None
            p = 0
            while relative < entries and p + HEADER_SIZE <= size:
                length, crc = unpack_header(data, p)
                end = p + HEADER_SIZE + length
                if end > size:
                    break
                packed.append(pack_entry(relative, position + p))
                if crc32(view[p + HEADER_SIZE : end]) != crc or not (length or allow_empty):
                    bad = relative  # unless its entry disagrees with the chain (see below)
                    break
                p = end
                relative += 1
            view.release()
            expected = b"".join(packed)
            actual = mm[first * ENTRY_SIZE : first * ENTRY_SIZE + len(expected)]
            if actual != expected:
                mismatch = first + next(
                    i for i in range(len(packed))
                    if actual[i * ENTRY_SIZE : (i + 1) * ENTRY_SIZE] != packed[i]
                )
                # Entry k disagrees with the chain: the frame before it has a wrong length
                # field (or entry k is damaged); either way record k-1 no longer reads back.
                return self.base_offset + max(mismatch - 1, 0)
            if bad is not None:
                return self.base_offset + bad
            if relative == first:
                # No whole frame in the window: a frame larger than the window (read it whole)
                # or a header or length field running past the indexed end (damage).
                if index.position(relative) != position:
                    return self.base_offset + max(relative - 1, 0)  # as for a mismatch above
                if size < HEADER_SIZE:
                    return self.base_offset + relative
                frame_size = HEADER_SIZE + int(unpack_header(data, 0)[0])
                if position + frame_size > self._end:
                    return self.base_offset + relative
                window_bytes = frame_size
                continue
            position += p
        if position != self._end:
            return self.base_offset + entries - 1 if entries else self.base_offset
        return None

    def flush(self) -> None:
        self.store.flush()

    def sync(self) -> None:
        """fsync the store. The index is not synced: recovery rebuilds its tail from the store."""
        self.store.sync()

    def close(self) -> None:
        self.store.close()
        self.index.close()

    def remove(self) -> None:
        """Delete both files (store first: an orphan index is discarded on open). Their names
        go now, unflushed; their blocks are freed in the background (see `close_later`), not
        by the caller: compaction runs on the event loop."""
        try:
            for path in (self.store.path, self.index.path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        finally:
            self.store.release()
            self.index.release()

    # -- recovery ---------------------------------------------------------------------------

    def _recover(self, trim_torn_tail: bool, sealed_entries: int | None) -> None:
        store_size = self.store.size
        index = self.index
        trusted = index.valid_prefix(store_size)
        if sealed_entries is not None and trusted >= sealed_entries > 0:
            # A sealed segment whose index accounts for every record it must hold (the next
            # segment's base says how many): trust the index and read nothing. Its store was
            # fsynced at the roll, so there is no torn tail to find; damage since (a zeroed
            # block, bit rot) fails the CRC or the length check when read, and `verify` finds
            # it. Scanning here instead would take zeroed bytes for empty records.
            index.set_entries(sealed_entries)
            self._end = store_size
            return
        # Re-verify the last trusted record: its frame may be torn even though its entry exists.
        keep = max(trusted - 1, 0)
        start = index.position(keep) if trusted else 0
        # Zero fill (power loss after the file grew) can only hit the unsynced active segment;
        # segments the log rolled past were fsynced, so trailing zeros there are empty records.
        indexed = (1 if trusted else 0) if trim_torn_tail else store_size
        limit = index.capacity if sealed_entries is None else max(sealed_entries, 1)
        positions, end, torn = self._scan(keep, start, store_size, indexed, limit)
        entries = [ENTRY.pack(keep + i, p) for i, p in enumerate(positions)]
        if entries:
            index.write_many(keep, b"".join(entries))
        index.set_entries(keep + len(positions))
        self._end = end
        if torn:
            if trim_torn_tail:
                logger.warning(
                    "trimmed torn store tail path=%s position=%d bytes=%d",
                    self.store.path, end, store_size - end,
                )
                self.store.truncate(end)
            else:
                self.damaged_at = end
                logger.error(
                    "closed segment has unreadable tail path=%s position=%d", self.store.path, end
                )
        if trusted == 0 and store_size > 0:
            logger.warning("rebuilt index path=%s entries=%d", index.path, index.entries)
        if torn or len(positions) > 1 or (trusted == 0 and store_size > 0):
            # Make the reconciled index durable so that a power loss cannot bring back
            # stale entries that later appends would make look valid.
            index.sync()

    def _scan(
        self, first: int, start: int, store_size: int, indexed: int, limit: int
    ) -> tuple[list[int], int, bool]:
        """Walk frames from `start` (entry `first`); return (positions, end of good frames, torn).

        Past the first `indexed` frames, an all-zero remainder is zero fill from a crash. An
        empty record is twelve zero bytes, so trailing empty records in the active segment that
        the index never saw (possible only after a power loss) are dropped with it.
        """
        data = self.store.read_at(start, store_size - start)
        size = len(data)
        zero_from = len(data.rstrip(b"\0"))
        positions: list[int] = []
        p = 0
        torn = False
        while p < size:
            if len(positions) >= indexed and p >= zero_from:
                torn = True
                break
            if p + HEADER_SIZE > size:
                torn = True
                break
            length, crc = HEADER.unpack_from(data, p)
            end = p + HEADER_SIZE + length
            if end > size or not (length or self.allow_empty):
                torn = True
                break
            if zlib.crc32(memoryview(data)[p + HEADER_SIZE : end]) != crc:
                if end == size or end >= zero_from:
                    torn = True
                    break
                logger.error(
                    "corrupt record kept for reads to report path=%s position=%d",
                    self.store.path, start + p,
                )
            if first + len(positions) >= limit:
                torn = True
                break
            positions.append(start + p)
            p = end
        return positions, start + p, torn
