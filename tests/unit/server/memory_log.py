"""An in-memory twin of dcl.storage.Log for server tests (as hashicorp/raft's inmem_store).

It follows the same contract the server relies on (dense offsets from initial_offset,
read_batch bounded by records and bytes but returning at least one record) and counts
syncs, so tests can observe group commit. Durability tests use the real dcl.storage.Log.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from dcl.errors import OffsetOutOfRange


class MemoryLog:
    def __init__(self, initial_offset: int = 0, sync_seconds: float = 0.0):
        self._records: list[bytes] = []
        self._base = initial_offset
        self._sync_seconds = sync_seconds
        self._lock = threading.Lock()
        self.syncs = 0
        self.closed = False

    def append(self, value: bytes) -> int:
        return self.append_batch([value])

    def append_batch(self, values: Sequence[bytes]) -> int:
        with self._lock:
            first = self.next_offset
            self._records.extend(bytes(v) for v in values)
            return first

    def read(self, offset: int) -> bytes:
        if not self.lowest_offset <= offset < self.next_offset:
            raise OffsetOutOfRange(offset, self.lowest_offset, self.next_offset)
        return self._records[offset - self._base]

    def read_batch(self, offset: int, max_records: int, max_bytes: int) -> list[bytes]:
        first = self.read(offset)
        out, size = [first], len(first)
        for index in range(offset + 1, min(offset + max_records, self.next_offset)):
            record = self._records[index - self._base]
            if size + len(record) > max_bytes:
                break
            out.append(record)
            size += len(record)
        return out

    @property
    def lowest_offset(self) -> int:
        return self._base

    @property
    def highest_offset(self) -> int:
        return self.next_offset - 1

    @property
    def next_offset(self) -> int:
        return self._base + len(self._records)

    def flush(self) -> None:
        pass

    def sync(self) -> None:
        if self._sync_seconds:
            time.sleep(self._sync_seconds)  # stands in for fsync latency, in the executor
        self.syncs += 1

    def close(self) -> None:
        self.closed = True
