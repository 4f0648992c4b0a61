"""Property test: random operations and crashes on a real Log against a plain list model.

The model is `records` (record i has offset `lowest + i`) plus `synced_next`, the offset below
which records are durable. A crash drops unflushed buffers, leaves indexes oversized and may cut
the active store at any byte past its durable part; the recovered log must then be a prefix of
the model at least `synced_next` long.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from dcl.errors import OffsetOutOfRange
from dcl.storage import Log, LogConfig, iter_records
from tests.unit.storage.helpers import crash

CONFIG = LogConfig(max_store_bytes=128, max_index_bytes=12 * 6)
payloads = st.binary(max_size=40)


class LogMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="dcl-log-prop-")
        self.records: list[bytes] = []
        self.lowest = 0
        self.synced_next = 0

    @initialize(initial_offset=st.integers(0, 3))
    def open_log(self, initial_offset: int) -> None:
        self.config = LogConfig(
            CONFIG.max_store_bytes, CONFIG.max_index_bytes, initial_offset=initial_offset
        )
        self.log = Log(self.directory, self.config)
        self.lowest = self.synced_next = initial_offset

    @property
    def next_offset(self) -> int:
        return self.lowest + len(self.records)

    @rule(value=payloads)
    def append(self, value: bytes) -> None:
        assert self.log.append(value) == self.next_offset
        self.records.append(value)

    @rule(values=st.lists(payloads, max_size=12))
    def append_batch(self, values: list[bytes]) -> None:
        assert self.log.append_batch(values) == self.next_offset
        self.records.extend(values)

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        offset = data.draw(st.integers(self.lowest - 2, self.next_offset + 1))
        if self.lowest <= offset < self.next_offset:
            assert self.log.read(offset) == self.records[offset - self.lowest]
        else:
            with pytest.raises(OffsetOutOfRange):
                self.log.read(offset)

    @precondition(lambda self: self.records)
    @rule(data=st.data(), max_records=st.integers(1, 20), max_bytes=st.integers(0, 200))
    def read_batch(self, data: st.DataObject, max_records: int, max_bytes: int) -> None:
        offset = data.draw(st.integers(self.lowest, self.next_offset - 1))
        got = self.log.read_batch(offset, max_records, max_bytes)
        start = offset - self.lowest
        assert got == self.records[start : start + len(got)]
        assert 1 <= len(got) <= max_records
        assert len(got) == 1 or sum(map(len, got)) <= max_bytes

    @rule()
    def snapshot_stream(self) -> None:
        with self.log.reader() as reader:
            assert list(iter_records(reader)) == self.records

    @rule()
    def sync(self) -> None:
        self.log.sync()
        self.synced_next = self.next_offset

    @rule()
    def flush(self) -> None:
        self.log.flush()

    @rule()
    def reopen(self) -> None:
        self.log.close()
        self.log = Log(self.directory, self.config)
        self.synced_next = self.next_offset

    @rule(data=st.data())
    def truncate_before(self, data: st.DataObject) -> None:
        offset = data.draw(st.integers(self.lowest - 1, self.next_offset + 2))
        self.log.truncate_before(offset)
        new_lowest = self.log.lowest_offset
        assert self.lowest <= new_lowest <= min(max(self.lowest, offset), self.next_offset)
        del self.records[: new_lowest - self.lowest]
        self.lowest = new_lowest
        self.synced_next = max(self.synced_next, self.lowest)

    @rule(data=st.data())
    def truncate_after(self, data: st.DataObject) -> None:
        offset = data.draw(st.integers(self.lowest - 1, self.next_offset))
        self.log.truncate_after(offset)
        del self.records[offset + 1 - self.lowest :]
        self.synced_next = self.next_offset

    @rule(cut=st.booleans(), fraction=st.floats(0, 1))
    def crash_and_recover(self, cut: bool, fraction: float) -> None:
        active = self.log._segments[-1]
        durable = self.synced_next - active.base_offset
        if durable <= 0:
            low = 0
        elif durable < active.index.entries:
            low = active.index.position(durable)
        else:
            low = active.end_position
        on_disk = active.store._file_size
        path = active.store.path
        crash(self.log)
        if cut and on_disk > low:
            os.truncate(path, low + int((on_disk - low) * fraction))
        self.log = Log(self.directory, self.config)
        assert self.log.lowest_offset == self.lowest
        survived = self.log.next_offset - self.lowest
        assert self.synced_next <= self.log.next_offset <= self.next_offset
        del self.records[survived:]
        self.synced_next = self.next_offset

    @invariant()
    def offsets_match_the_model(self) -> None:
        if not hasattr(self, "log"):
            return
        assert self.log.lowest_offset == self.lowest
        assert self.log.next_offset == self.next_offset
        assert self.log.highest_offset == self.next_offset - 1

    @invariant()
    def every_record_reads_back(self) -> None:
        if not hasattr(self, "log") or not self.records:
            return
        assert self.log.read_batch(self.lowest, 10**6, 10**9) == self.records

    def teardown(self) -> None:
        if hasattr(self, "log"):
            self.log.close()
        shutil.rmtree(self.directory, ignore_errors=True)


LogMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
test_log_matches_list_model = LogMachine.TestCase
