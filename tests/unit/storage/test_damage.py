"""Damaged files: whatever bytes are flipped, the log opens and never serves garbage.

Each case writes a multi-segment log, closes it cleanly, flips random bytes in random store and
index files, then reopens. Every read must return the original record or raise a typed error
(CorruptRecord, OffsetOutOfRange); opening may only fail with a DclError.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import pytest

from dcl.errors import CorruptRecord, DclError, OffsetOutOfRange
from dcl.storage import Log, LogConfig
from tests.unit.storage.helpers import flipped

CONFIG = LogConfig(max_store_bytes=600, max_index_bytes=12 * 30)


@pytest.mark.parametrize("seed", range(60))
def test_random_byte_flips_never_yield_garbage(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    data = [rng.randbytes(rng.randrange(1, 50)) for _ in range(rng.randrange(20, 120))]
    log = Log(tmp_path, CONFIG)
    log.append_batch(data)
    log.close()
    files = sorted(p for p in tmp_path.iterdir() if p.stat().st_size)
    for _ in range(rng.randrange(1, 4)):
        target = rng.choice(files)
        flipped(str(target), rng.randrange(target.stat().st_size))
    try:
        log = Log(tmp_path, CONFIG)
    except DclError:
        return
    try:
        for offset in range(len(data)):
            with contextlib.suppress(CorruptRecord, OffsetOutOfRange):
                assert log.read(offset) == data[offset]
            try:
                batch = log.read_batch(offset, 7, 120)
            except (CorruptRecord, OffsetOutOfRange):
                continue
            assert batch == data[offset : offset + len(batch)]
    finally:
        log.close()


def test_damaged_index_position_is_reported_not_followed(tmp_path: Path) -> None:
    data = [bytes([i]) * 10 for i in range(20)]  # every frame is 22 bytes
    log = Log(tmp_path, LogConfig(max_store_bytes=10**6, max_index_bytes=12 * 100))
    log.append_batch(data)
    log.close()
    (index,) = tmp_path.glob("*.index")
    raw = bytearray(index.read_bytes())
    # Point entry 10 at record 9's frame: a real frame boundary, but the wrong record.
    raw[10 * 12 + 4 : 10 * 12 + 12] = (9 * 22).to_bytes(8, "big")
    index.write_bytes(bytes(raw))
    log = Log(tmp_path, LogConfig(max_store_bytes=10**6, max_index_bytes=12 * 100))
    with pytest.raises(CorruptRecord):
        log.read(10)
    with pytest.raises(CorruptRecord):
        log.read_batch(10, 5, 1000)
    assert log.read_batch(11, 5, 1000) == data[11:16]
    log.close()
