"""The store: an append-only file of framed records.

Frame layout (DESIGN.md, "Encoding"): an 8-byte big-endian payload length, a 4-byte big-endian
CRC32 of the payload, then the payload. The CRC is checked on every read, so corrupt bytes are
reported as `CorruptRecord`, never served.

Writes go to an in-process buffer and reach the OS on `flush()` (or when the buffer grows past
`BUFFER_LIMIT`); `sync()` additionally fsyncs. The caller decides durability.

Thread-safety: one thread appends and reads; `flush()`/`sync()` may run concurrently on another
thread (an executor doing group commit). The buffer is only touched under `_lock`; the fsync runs
on a duplicate of the fd outside the lock, so appends are never blocked by the disk.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Callable
from typing import TypeVar

from dcl.errors import CorruptRecord
from dcl.storage.files import close_later

BytesLike = bytes | bytearray | memoryview
_T = TypeVar("_T")

HEADER = struct.Struct(">QI")
HEADER_SIZE = HEADER.size  # 12
BUFFER_LIMIT = 256 * 1024
"""Buffered bytes above which an append writes through to the OS (bounds memory and latency)."""


def encode_record(payload: BytesLike) -> bytes:
    """Frame one payload as it is laid out in a store file."""
    view = memoryview(payload)
    return HEADER.pack(view.nbytes, zlib.crc32(view)) + bytes(view)


class Store:
    """One append-only store file. Invariant: `size == bytes in the file + bytes buffered`."""

    __slots__ = ("_buffer", "_closed", "_fd", "_file_size", "_lock", "path")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._file_size = os.fstat(self._fd).st_size
        self._buffer = bytearray()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def size(self) -> int:
        """Logical size: everything appended so far, flushed or not.

        Read without the lock, so while another thread flushes it may briefly over-report (the
        file has grown, the buffer is not yet trimmed); it never under-reports. Use it as a
        bound, and positions returned by `append*` for bookkeeping.
        """
        return self._file_size + len(self._buffer)

    def append(self, payload: BytesLike) -> tuple[int, int]:
        """Append one record; return (bytes written, position of its frame)."""
        frame = encode_record(payload)
        return len(frame), self.append_frames(frame)

    def append_frames(self, frames: BytesLike) -> int:
        """Append already-framed bytes (one buffered write per batch); return their position."""
        with self._lock:
            position = self._file_size + len(self._buffer)
            if not self._buffer and len(frames) >= BUFFER_LIMIT:
                self._write(frames)  # a big batch skips the copy into the buffer
            else:
                self._buffer += frames
                if len(self._buffer) >= BUFFER_LIMIT:
                    self._write_buffer()
        return position

    def read(self, position: int) -> bytes:
        """Read the record whose frame starts at `position`, verifying its framing and CRC."""
        if position + HEADER_SIZE > self._file_size:
            self.flush()
        header = os.pread(self._fd, HEADER_SIZE, position)
        if len(header) < HEADER_SIZE:
            raise CorruptRecord(self.path, position, "truncated header")
        length, _ = HEADER.unpack(header)
        return self.read_frame(position, HEADER_SIZE + length)

    def read_frame(self, position: int, frame_size: int) -> bytes:
        """Read a record whose frame size the index already tells us: one pread."""
        if frame_size < HEADER_SIZE or position < 0 or position + frame_size > self.size:
            # A damaged index entry: never let it drive a huge or negative read.
            raise CorruptRecord(self.path, position, "index entry out of bounds")
        data = self.read_at(position, frame_size)
        if len(data) < frame_size:
            raise CorruptRecord(self.path, position, "truncated record")
        length, crc = HEADER.unpack_from(data)
        if length != frame_size - HEADER_SIZE:
            raise CorruptRecord(self.path, position, "length field disagrees with index")
        payload = data[HEADER_SIZE:]
        if zlib.crc32(payload) != crc:
            raise CorruptRecord(self.path, position)
        return payload

    def read_at(self, position: int, size: int) -> bytes:
        """Raw bytes at [position, position+size); flushes first if the range is still buffered."""
        if position + size > self._file_size:
            self.flush()
        return os.pread(self._fd, size, position)

    def flush(self) -> None:
        """Hand buffered bytes to the OS so other file descriptors (and readers) see them."""
        with self._lock:
            if self._buffer and not self._closed:
                self._write_buffer()

    def sync(self) -> None:
        """Flush, then fsync. The fsync (on a duplicate of the fd) holds no lock, so appends
        continue meanwhile."""
        fd = self.sync_submit(os.dup)
        if fd is None:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def sync_submit(self, submit: Callable[[int], _T]) -> _T | None:
        """Flush, then hand the fd to `submit`, which starts the fsync (an AIO request, see
        dcl.storage.aio, or `os.dup` for `sync`). Called under the lock so that a concurrent
        close cannot take the descriptor away first. None if the store is closed."""
        with self._lock:
            if self._closed:
                return None
            if self._buffer:
                self._write_buffer()
            return submit(self._fd)

    def truncate(self, size: int) -> None:
        """Cut the store to `size` bytes (discarding a suffix of records)."""
        with self._lock:
            if self._buffer:
                self._write_buffer()
            os.ftruncate(self._fd, size)
            self._file_size = size

    def stamp(self) -> tuple[int, int, int, int]:
        """(inode, size, mtime_ns, ctime_ns) of the file: changes whenever anything writes to
        it or replaces it, so an unchanged stamp means "not written since it was taken"."""
        st = os.fstat(self._fd)
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def dup_fd(self) -> int:
        """A private fd for streaming readers: stays valid even if the segment is removed."""
        self.flush()
        return os.dup(self._fd)

    def close(self) -> None:
        """Flush and close. Does not fsync: call `sync()` first where durability matters."""
        with self._lock:
            if self._closed:
                return
            if self._buffer:
                self._write_buffer()
            self._closed = True
            os.close(self._fd)

    def release(self) -> None:
        """Close a store whose file was deleted: nothing is written, and the descriptor is
        closed in the background (it may be the last reference to the file's blocks)."""
        with self._lock:
            if self._closed:
                return
            self._buffer.clear()
            self._closed = True
            close_later(self._fd)

    def _write_buffer(self) -> None:
        """Caller holds `_lock`. Drops from the buffer exactly what reached the file."""
        before = self._file_size
        try:
            self._write(self._buffer)
        finally:
            del self._buffer[: self._file_size - before]

    def _write(self, data: BytesLike) -> None:
        """Caller holds `_lock`. Loops because os.pwrite may write less than asked; even if it
        fails, `_file_size` counts exactly the bytes that reached the file."""
        with memoryview(data) as view:
            written = 0
            start = self._file_size
            while written < len(view):
                written += os.pwrite(self._fd, view[written:], start + written)
                self._file_size = start + written
