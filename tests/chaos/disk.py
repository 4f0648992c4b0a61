"""Disk faults applied to a stopped node's data directory (data_dir/fsm, data_dir/raft).

What is injected, and why only this:
  * store tail cut: the FSM commit log's active store file is cut at a random byte *after* the
    last checkpoint (LogFsm fsyncs the commit log before it writes a checkpoint, so only bytes
    past it may be unsynced). This is what losing the page cache (power loss) leaves behind.
  * store cut into synced bytes (disk_store_cut_synced): the same cut anywhere in the active
    store, below the checkpoint too. A crash cannot do this, but the commit log is derived from
    the Raft log, so a node must rebuild it (from its Raft log, snapshot or peers) or refuse.
  * oversized index: zero bytes appended to an index file (commit log or Raft log), as a crash
    leaves an index that was grown for mmap appends and never truncated back.
  * zeroed block: a block of a *closed* commit-log segment (store, sometimes index) zeroed:
    media corruption. The node must notice it (checksums) and refuse that range or repair it
    from its peers; it must never serve the zeroes as records.
The Raft log's fsynced bytes are never cut or zeroed: a SIGKILL keeps the page cache, so a real
crash cannot lose them, and a disk that loses acknowledged fsyncs (a "lying" disk) breaks the
assumption Raft's safety rests on: a node could vote or acknowledge twice. Only the
crash-realistic oversized index touches the Raft log.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path
from typing import Any

__all__ = ["DISK_FAULTS", "cut_store_anywhere", "cut_store_tail", "oversize_index", "zero_block"]

_FRAME_HEADER = struct.Struct(">QI")
_INDEX_ENTRY = 12


def _segments(directory: Path) -> list[tuple[int, Path, Path]]:
    """(base offset, store, index) of each segment, in offset order."""
    bases = sorted(int(p.stem) for p in directory.glob("*.store") if p.stem.isdigit())
    return [(b, directory / f"{b:020d}.store", directory / f"{b:020d}.index") for b in bases]


def _checkpoint_next_offset(fsm_dir: Path) -> int:
    try:
        raw = (fsm_dir / "fsm.checkpoint").read_bytes()
    except FileNotFoundError:
        return 0
    return int(json.loads(raw[4:])["next_offset"])


def _frame_position(store: Path, records: int) -> int:
    """Byte position of the store's record number `records` (or its end if it has fewer)."""
    data = store.read_bytes()
    pos = 0
    for _ in range(records):
        if pos + _FRAME_HEADER.size > len(data):
            break
        length, _crc = _FRAME_HEADER.unpack_from(data, pos)
        pos += _FRAME_HEADER.size + length
    return min(pos, len(data))


def cut_store_tail(data_dir: Path, rng: random.Random, *,
                   synced_too: bool = False) -> dict[str, Any] | None:
    """Cut the commit log's active store at a random byte of its unsynced tail; with
    synced_too, anywhere in it (the commit log is derived state: a node must rebuild what it
    checkpointed from its Raft log, snapshot or peers)."""
    fsm_dir = data_dir / "fsm"
    segments = _segments(fsm_dir / "commitlog")
    if not segments:
        return None
    base, store, _index = segments[-1]
    checkpoint = _checkpoint_next_offset(fsm_dir)
    synced = _frame_position(store, checkpoint - base) if checkpoint > base else 0
    size = store.stat().st_size
    low = 0 if synced_too else synced
    if size <= low:
        return None
    cut = rng.randint(low, size - 1)
    os.truncate(store, cut)
    return {"file": str(store), "synced": synced, "size": size, "cut_at": cut,
            "into_synced": cut < synced}


def cut_store_anywhere(data_dir: Path, rng: random.Random) -> dict[str, Any] | None:
    return cut_store_tail(data_dir, rng, synced_too=True)


def oversize_index(data_dir: Path, rng: random.Random) -> dict[str, Any] | None:
    """Append zero bytes (not always whole entries) to one commit-log or Raft-log index."""
    candidates = [p for d in (data_dir / "fsm" / "commitlog", data_dir / "raft" / "log")
                  for _b, _s, p in _segments(d) if p.exists()]
    if not candidates:
        return None
    index = rng.choice(candidates)
    extra = _INDEX_ENTRY * rng.randint(1, 2000) + rng.choice([0, 0, rng.randint(1, 11)])
    before = index.stat().st_size
    with open(index, "ab") as f:
        f.write(bytes(extra))
    return {"file": str(index), "size": before, "appended": extra}


def zero_block(data_dir: Path, rng: random.Random) -> dict[str, Any] | None:
    """Zero up to 4 KiB of a closed commit-log segment's store (or, one time in four, index)."""
    closed = _segments(data_dir / "fsm" / "commitlog")[:-1]
    closed = [s for s in closed if s[1].stat().st_size > 64]
    if not closed:
        return None
    _base, store, index = rng.choice(closed)
    target = index if rng.random() < 0.25 and index.exists() and \
        index.stat().st_size >= 2 * _INDEX_ENTRY else store
    size = target.stat().st_size
    length = min(4096, size // 2)
    position = rng.randint(0, size - length)
    with open(target, "r+b") as f:
        f.seek(position)
        f.write(bytes(length))
    return {"file": str(target), "size": size, "position": position, "length": length}


def lying_disk(data_dir: Path, rng: random.Random) -> dict[str, Any] | None:
    """NOT crash-realistic, never in the default schedule: lose fsynced Raft-log bytes (the
    active store cut to 30-70%) and the whole commit log. Applied to every node at once, this
    loses acknowledged writes; it exists to show the checker reports that."""
    segments = _segments(data_dir / "raft" / "log")
    if not segments:
        return None
    store = segments[-1][1]
    size = store.stat().st_size
    cut = int(size * rng.uniform(0.3, 0.7))
    os.truncate(store, cut)
    shutil.rmtree(data_dir / "fsm", ignore_errors=True)
    return {"file": str(store), "size": size, "cut_at": cut}


DISK_FAULTS = {
    "disk_store_tail": cut_store_tail,
    "disk_store_cut_synced": cut_store_anywhere,
    "disk_index_oversize": oversize_index,
    "disk_zero_block": zero_block,
}
