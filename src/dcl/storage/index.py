"""The index: a memory-mapped file of 12-byte entries mapping offsets to store positions.

Entry i is (uint32 offset relative to the segment's base offset, uint64 store position), big
endian. Offsets within a segment are consecutive, so entry i always has relative offset i; that
is what lets recovery tell real entries from zero fill (only entry 0 may be all zeros) without
reading them one by one.

While open the file is grown (sparsely) to its maximum size so appends are plain memory writes;
`close()` flushes the map, fsyncs, unmaps and truncates the file to its real size, in that order.
After a crash the file is oversized and may hold entries whose records never reached the store:
`valid_prefix()` finds the prefix worth trusting and the segment reconciles it with the store.
"""

from __future__ import annotations

import mmap
import os
import struct

from dcl.storage.files import close_later

ENTRY = struct.Struct(">IQ")
ENTRY_SIZE = ENTRY.size  # 12
_POSITION = struct.Struct(">Q")
_ZERO_CHUNK = bytes(64 * 1024 - (64 * 1024) % ENTRY_SIZE)
_LOW_BYTES = bytes(range(256))


class Index:
    """Invariant: entries [0, entries) are real; bytes from `entries * 12` on are zero."""

    __slots__ = ("_closed", "_fd", "capacity", "entries", "mm", "path")

    def __init__(self, path: str | os.PathLike[str], max_bytes: int) -> None:
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        file_size = os.fstat(self._fd).st_size
        map_size = max(max_bytes, file_size - file_size % ENTRY_SIZE)
        if file_size != map_size:
            os.ftruncate(self._fd, map_size)
        self.mm = mmap.mmap(self._fd, map_size)
        self.capacity = map_size // ENTRY_SIZE
        self.entries = 0  # set by the segment once reconciled with the store
        self._closed = False

    def position(self, relative: int) -> int:
        """Store position of entry `relative` (caller checks bounds)."""
        return int(_POSITION.unpack_from(self.mm, relative * ENTRY_SIZE + 4)[0])

    def valid_prefix(self, store_size: int) -> int:
        """How many leading entries look real: relative offset == i and position < store size.

        Binary search, so recovery cost does not grow with the segment; then the low byte of every
        relative offset in the prefix is compared in one C-level operation, which rejects garbage.
        Returns 0 when entry 0 is not (0, 0) or the store is empty (the caller then rebuilds).
        """
        mm = self.mm

        def real(i: int) -> bool:
            relative, position = ENTRY.unpack_from(mm, i * ENTRY_SIZE)
            return bool(relative == i and position < store_size)

        if self.capacity == 0 or store_size == 0 or ENTRY.unpack_from(mm, 0) != (0, 0):
            return 0
        low, high = 1, self.capacity  # real(low - 1) holds; find the first i that is not real
        while low < high:
            mid = (low + high) // 2
            if real(mid):
                low = mid + 1
            else:
                high = mid
        count = low
        low_bytes = mm[3 : count * ENTRY_SIZE : ENTRY_SIZE]
        expected = _LOW_BYTES * (count // 256 + 1)
        if low_bytes != expected[:count]:
            return 0
        return count

    def write(self, relative: int, position: int) -> None:
        """Write entry `relative` and make it the last one."""
        ENTRY.pack_into(self.mm, relative * ENTRY_SIZE, relative, position)
        self.entries = relative + 1

    def write_many(self, first: int, packed: bytes) -> None:
        """One slice assignment for a batch of packed entries starting at `first`."""
        start = first * ENTRY_SIZE
        self.mm[start : start + len(packed)] = packed
        self.entries = first + len(packed) // ENTRY_SIZE

    def set_entries(self, count: int) -> None:
        """Keep `count` entries and zero any stale ones after them.

        Zeroing stops at the first all-zero chunk, so the sparse tail of the file stays sparse.
        Stale entries must not survive: after more appends they could pass `valid_prefix`.
        """
        mm = self.mm
        start = count * ENTRY_SIZE
        end = len(mm)
        while start < end:
            stop = min(start + len(_ZERO_CHUNK), end)
            if mm[start:stop].count(0) == stop - start:
                break
            mm[start:stop] = _ZERO_CHUNK[: stop - start]
            start = stop
        self.entries = count

    def sync(self) -> None:
        """Write dirty pages of the map to disk."""
        self.mm.flush()
        os.fsync(self._fd)

    def release(self) -> None:
        """Close an index whose file was deleted: unmapped unflushed, and the descriptor
        closed in the background (it may be the last reference to the file's blocks)."""
        if self._closed:
            return
        self._closed = True
        self.mm.close()
        close_later(self._fd)

    def close(self) -> None:
        """Flush the map, fsync, unmap, truncate to the real size, close (crash-safe order)."""
        if self._closed:
            return
        self._closed = True
        self.mm.flush()
        os.fsync(self._fd)
        self.mm.close()
        os.ftruncate(self._fd, self.entries * ENTRY_SIZE)
        os.close(self._fd)
