"""The replicated node's state machine and its Backend: the commit log fed by Raft.

Every NORMAL Raft entry is one command: a type byte, then a protobuf payload (RecordBatch or
PeerAddress), so the FSM routes without parsing the payload. A record batch becomes
consecutive offsets in the commit log, written as serialized log.v1.Record with the offset
filled in, so readers serve stored bytes as they are.

Durability: the Raft log is the durable copy (fsynced on a quorum before anything is
acknowledged). The commit log is rebuilt from it: a checkpoint (applied index, next offset),
written only after the commit log is fsynced, says how far the commit log is known good; on
restart the commit log is cut back to the checkpoint and later entries are applied again, so
apply is idempotent across crashes. Records the checkpoint vouches for that are missing or do
not read back intact (damage, not a crash) are rebuilt from the node's own Raft snapshot and
log before it serves (`LogFsm.recover`); damage to the Raft log itself stops the node.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Awaitable, Generator, Sequence
from pathlib import Path
from typing import Any

from dcl.api.dcl.v1 import raft_pb2
from dcl.batching import runs_within
from dcl.errors import CorruptRecord, NotLeader, OffsetOutOfRange, Unavailable
from dcl.raft.driver import RaftDriver
from dcl.raft.storage import RaftStorage
from dcl.raft.types import Entry, EntryType, Role, Snapshot
from dcl.server.backend import ServerInfo
from dcl.server.records import encode_record
from dcl.storage import Log, LogConfig
from dcl.storage.files import map_readonly, replace_atomically

__all__ = [
    "CMD_PEER_ADDRESS", "CMD_RECORDS", "LogFsm", "ReplicatedBackend", "Retention",
    "encode_records_cmd",
]

log = logging.getLogger(__name__)

CMD_RECORDS = 1
CMD_PEER_ADDRESS = 2
_U32 = struct.Struct(">I")
_SNAP_HEADER = struct.Struct(">QI")  # first offset, address-book JSON length
#: A restore step appends about this many bytes of records (a few ms), or checks the
#: framing of 8 times as many: a request to the node waits for a step at each of the few
#: loop turns it takes, so steps must be short.
_RESTORE_RUN_BYTES = 1 << 20


#: Bytes applied after which the commit log is fsynced in the background (write-behind).
#: A segment roll fsyncs on the event loop whatever the store still has dirty: 39 ms for a
#: whole 64 MiB segment, at most 8 ms with write-behind (512 MiB applied at 50 MB/s).
_WRITE_BEHIND_BYTES = 8 << 20

#: Raft entries read per batch when re-applying them from local storage.
_REPLAY_BATCH = 1024


def _record_count(entry: Entry) -> int:
    """How many commit-log records applying `entry` appends."""
    if entry.type is EntryType.NORMAL and entry.data and entry.data[0] == CMD_RECORDS:
        return len(raft_pb2.RecordBatchCommand.FromString(entry.data[1:]).values)
    return 0


def encode_records_cmd(values: Sequence[bytes]) -> bytes:
    return bytes([CMD_RECORDS]) + raft_pb2.RecordBatchCommand(values=values).SerializeToString()


def encode_address_cmd(node_id: str, rpc_addr: str) -> bytes:
    payload = raft_pb2.PeerAddressCommand(id=node_id, rpc_addr=rpc_addr).SerializeToString()
    return bytes([CMD_PEER_ADDRESS]) + payload


def _snapshot_header(data: memoryview) -> tuple[int, dict[str, str], int]:
    """(first offset, address book, position of the first record) of snapshot data."""
    try:
        first, book_len = _SNAP_HEADER.unpack_from(data, 0)
        pos = _SNAP_HEADER.size
        if pos + book_len > len(data):
            raise ValueError("address book runs past the end")
        addresses = json.loads(bytes(data[pos : pos + book_len]))
        if not isinstance(addresses, dict):
            raise ValueError("address book is not an object")
    except (struct.error, ValueError) as exc:
        raise CorruptRecord("snapshot", 0, f"bad header: {exc}") from None
    return first, addresses, pos + book_len


@dataclasses.dataclass(frozen=True, slots=True)
class Retention:
    """How much of the commit log a node keeps (0: no limit); see `LogFsm.enforce_retention`.
    Each node applies it to its own log, as Kafka's replicas do: a read below a node's first
    offset answers OUT_OF_RANGE, naming the range it holds."""

    max_bytes: int = 0
    max_age_seconds: float = 0.0


def _write_sealed_json(path: Path, doc: dict[str, Any]) -> None:
    """Durably replace `path` with `doc`, CRC-prefixed so a damaged file is told apart."""
    body = json.dumps(doc).encode()
    replace_atomically(path, [_U32.pack(zlib.crc32(body)), body])


def _read_sealed_json(path: Path) -> dict[str, Any] | None:
    """A `_write_sealed_json` file's document; None if missing. ValueError if damaged."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    crc, body = raw[:4], raw[4:]
    if _U32.pack(zlib.crc32(body)) != crc:
        raise ValueError(f"checksum mismatch in {path}")
    doc = json.loads(body)
    if not isinstance(doc, dict):
        raise ValueError(f"{path} does not hold an object")
    return doc


def _check_framing(
    data: memoryview, pos: int, have: int
) -> Generator[None, None, tuple[int, int, int]]:
    """Check every record's framing from `pos` on, 8 runs' worth per step (CorruptRecord if
    broken); return the record count, the position after the first `have` records, and
    that of the `have`-th record (-1 if the snapshot holds fewer)."""
    unpack = _U32.unpack_from
    size = len(data)
    after, last, count = pos, -1, 0
    step_end = pos + 8 * _RESTORE_RUN_BYTES
    while pos < size:
        n = unpack(data, pos)[0] if pos + 4 <= size else -1
        if n < 0 or pos + 4 + n > size:
            raise CorruptRecord("snapshot", pos, f"record framing runs past the end ({size})")
        if n == 0:
            raise CorruptRecord("snapshot", pos, "empty record")
        if count == have - 1:
            last = pos
        pos += 4 + n
        count += 1
        if count == have:
            after = pos
        if pos >= step_end:
            step_end = pos + 8 * _RESTORE_RUN_BYTES
            yield
    return count, after, last


class LogFsm:
    """Applies committed entries to the commit log; see the module docstring for durability.

    Damage on disk (found at open): records past the checkpoint are cut (they are re-applied);
    records the checkpoint vouches for that are missing (a cut store tail) or do not read back
    intact (`Log.verify`: a zeroed block or bit rot in any segment) are cut from the first bad
    one on, and `recover()` rebuilds them from this node's own Raft snapshot and log, with the
    same offsets and bytes as before. Until then the FSM reports `applied_index` 0 and takes no
    checkpoint, so if `recover()` is never called the driver restores the Raft snapshot or
    replays the Raft log from its start, never appending at a wrong offset.

    Cost at open: every segment written since the last verified open is read once (about 1 s
    per GiB of 1 KiB records); sealed segments whose store file is unchanged since they were
    verified (same inode, size, mtime, ctime, recorded in `fsm.verified`) are skipped. So a
    write through the file system (a cut, a zeroed block, a replaced file) is always found at
    open; silent media bit rot in an unchanged sealed segment is found by the per-read CRC,
    which answers `CorruptRecord` (DATA_LOSS), never other bytes.
    """

    def __init__(
        self, directory: Path, config: LogConfig | None = None, *, verify: bool = True,
        retention: Retention | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._checkpoint_path = directory / "fsm.checkpoint"
        #: The lowest offset retention last cut the commit log to, written before the cut.
        self._floor_path = directory / "fsm.retained"
        self.retention = retention or Retention()
        #: Cuts made and bytes they dropped since the process started (metrics).
        self.retention_cuts = 0
        self.retention_dropped_bytes = 0
        #: Snapshot builds and restores in progress (weakly held: one dropped unstarted
        #: pins nothing), each with the lowest offset it needs; retention cuts below all.
        self._pins: weakref.WeakKeyDictionary[Generator[Any, None, None], int] = (
            weakref.WeakKeyDictionary()
        )
        self._stamps_path = directory / "fsm.verified"
        #: Scratch file a snapshot is built in (unlinked as soon as it is mapped).
        self._build_path = directory / "snapshot.build"
        self._build_path.unlink(missing_ok=True)  # left by a crash mid-build
        # Records are never empty (each carries its offset), so zeroed bytes are never one.
        self.log = Log(
            directory / "commitlog", dataclasses.replace(config or LogConfig(), empty_records=False)
        )
        self.addresses: dict[str, str] = {}
        self._checkpoint_lock = threading.Lock()
        applied, next_offset, lowest, addresses = self._load_checkpoint()
        retained = self._load_floor()
        if lowest < self.log.lowest_offset <= min(retained, next_offset):
            # Retention cut there after the last checkpoint. (A cut past the checkpoint's
            # end took records a restart re-applies: the log is then rebuilt from Raft.)
            lowest = self.log.lowest_offset
        if self.log.lowest_offset != lowest:
            # Segments at the head went missing (a removed file): the log would silently start
            # later than the other nodes'. Start it over where it began and rebuild it.
            log.error(
                "commit log lost its first segments path=%s lowest=%d checkpoint_lowest=%d",
                self.log.directory, self.log.lowest_offset, lowest,
            )
            self.log.reset(lowest)
        if self.log.next_offset > next_offset:
            self.log.truncate_after(next_offset - 1)
        if verify:
            bad = self.log.verify(self._load_stamps())
            if bad is None:
                self._save_stamps()
            else:
                log.error(
                    "commit log damaged: cut at the first bad record, to be rebuilt "
                    "path=%s offset=%d next_offset=%d", self.log.directory, bad,
                    self.log.next_offset,
                )
                self.log.truncate_after(bad - 1)
        self.applied_index = applied
        self.addresses.update(addresses)
        self._checkpointed = (applied, next_offset)
        #: Entries up to here were fsynced in this node's Raft log before they were applied.
        self._checkpoint_applied = applied
        #: (applied index, next offset) the checkpoint vouched for but the log no longer holds.
        self._rebuild_to: tuple[int, int] | None = None
        if self.log.next_offset < next_offset:
            log.error(
                "commit log behind its checkpoint path=%s next_offset=%d checkpoint=%d "
                "applied=%d", self.log.directory, self.log.next_offset, next_offset, applied,
            )
            self._rebuild_to = (applied, next_offset)
            self.applied_index = 0
        #: (applied index, next offset) as of the last apply, assigned as one value: what a
        #: checkpoint taken from another thread records.
        self._mark = (self.applied_index, self.log.next_offset)
        #: Bytes appended since the last write-behind, the one in flight, and its error.
        self._dirty = 0
        self._behind: asyncio.Future[None] | None = None
        self._behind_error: Exception | None = None
        #: Held by a write-behind and by a checkpoint's fsync: Linux reports a writeback
        #: error to one fsync of a file only, so a checkpoint must see the write-behind's
        #: outcome before it syncs and vouches.
        self._sync_lock = threading.Lock()

    def _load_checkpoint(self) -> tuple[int, int, int, dict[str, str]]:
        """(applied index, next offset, lowest offset, address book); a missing or unreadable
        checkpoint vouches for nothing, so the whole commit log is then rebuilt from Raft:
        from offset 0 when the Raft log is replayed from its start (the log's own first
        offset may be a retention cut), or from the Raft snapshot's first, which resets it."""
        lowest = self.log.lowest_offset
        nothing: tuple[int, int, int, dict[str, str]] = (0, 0, 0, {})
        try:
            doc = _read_sealed_json(self._checkpoint_path)
            if doc is None:
                return nothing
            return (
                int(doc["applied"]), int(doc["next_offset"]),
                int(doc.get("lowest_offset", lowest)), dict(doc.get("addresses", {})),
            )
        except (ValueError, KeyError, TypeError) as exc:
            log.error("fsm checkpoint unreadable, rebuilding the commit log path=%s error=%s",
                      self._checkpoint_path, exc)
            return nothing

    def _load_floor(self) -> int:
        """The offset retention last cut to (-1: never). A damaged record of it only costs a
        rebuild if segments are missing at the head (they then look lost)."""
        try:
            doc = _read_sealed_json(self._floor_path)
            return -1 if doc is None else int(doc["lowest_offset"])
        except (ValueError, KeyError, TypeError) as exc:
            log.error("retention record unreadable path=%s error=%s", self._floor_path, exc)
            return -1

    def _load_stamps(self) -> dict[int, list[int]]:
        try:
            doc = json.loads(self._stamps_path.read_bytes())
            return {int(base): [int(v) for v in stamp] for base, stamp in doc.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}  # missing or damaged: verify everything again

    def _save_stamps(self) -> None:
        """Remember which sealed segments were verified (not fsynced: losing it only costs a
        re-verification)."""
        body = json.dumps({str(b): list(s) for b, s in self.log.sealed_stamps().items()})
        tmp = self._stamps_path.with_name(self._stamps_path.name + ".tmp")
        tmp.write_text(body)
        os.replace(tmp, self._stamps_path)

    def recover(self, storage: RaftStorage) -> None:
        """Rebuild records the checkpoint vouched for from this node's Raft snapshot and log.

        Call once the Raft storage is open and before the driver is built from it; a no-op
        when the commit log is whole. Walks back from the checkpoint (applied index, next
        offset) through the Raft log, counting each entry's records, to the newest entry
        boundary the intact prefix reaches; cuts there and re-applies the entries after it.
        If the damage reaches below the Raft log (compacted), restores the Raft snapshot
        (the whole commit log up to its index) and re-applies everything after it. Apply is
        deterministic, so offsets and bytes come out as before (and as on the other nodes).
        Raises `CorruptRecord` if the Raft state disagrees with the checkpoint or is damaged
        itself (the node must not start on it).
        """
        if self._checkpoint_applied > storage.last_index:
            # Applied entries were fsynced in the Raft log first (and acknowledged): a crash
            # cannot take them away, only damage can. Rejoining with the shorter log could
            # let a quorum forget a committed entry, so refuse, as for a corrupt Raft segment.
            raise CorruptRecord(
                str(storage.directory / "log"), storage.last_index + 1,
                f"the Raft log ends at index {storage.last_index} but this node applied "
                f"entries up to {self._checkpoint_applied}: it lost entries it acknowledged "
                "and will not start on it: restore its data directory, or remove the node "
                "from the cluster and add it back with an empty one",
            )
        if self._rebuild_to is None:
            return
        applied, next_offset = self._rebuild_to
        have = self.log.next_offset
        snap_index = storage.snapshot_index
        index, offset = applied, next_offset  # entries <= index make the records < offset
        # Walk only entries the Raft log still holds; if its snapshot is as new as the
        # checkpoint (installed just before a crash), the snapshot alone is the answer.
        walkable = snap_index < applied <= storage.last_index
        while walkable and index > snap_index and offset > have:
            lo = max(snap_index + 1, index - _REPLAY_BATCH + 1)
            for entry in reversed(storage.entries(lo, index + 1)):
                offset -= _record_count(entry)
                index -= 1
                if offset <= have:
                    break
        self._rebuild_to = None
        if walkable and offset <= have:
            if offset < self.log.lowest_offset:
                # A retention cut fell inside the entry the walk stopped at: start the log
                # at that entry's first record (retention drops them again later).
                self.log.reset(offset)
            else:
                self.log.truncate_after(offset - 1)
            self.applied_index = index
            source = f"raft log from index {index + 1}"
        else:
            snapshot = storage.snapshot
            if snapshot is not None:
                self.restore(snapshot)
                source = f"raft snapshot at index {snap_index}, then the raft log"
            else:
                self.log.reset(0)  # the Raft log's first entry made offset 0 (retention or not)
                self.applied_index = 0
                source = "raft log from its start"
            if walkable and self.log.next_offset != offset:
                raise CorruptRecord(
                    str(self.log.directory), offset,
                    f"checkpoint disagrees with the raft state (rebuilt to "
                    f"{self.log.next_offset} at index {self.applied_index})",
                )
        last = min(applied, storage.last_index)
        while self.applied_index < last:
            self.apply(storage.entries(
                self.applied_index + 1, min(last, self.applied_index + _REPLAY_BATCH) + 1))
        if self.applied_index == applied and self.log.next_offset != next_offset:
            raise CorruptRecord(
                str(self.log.directory), self.log.next_offset,
                f"re-applying raft entries up to {applied} gave next offset "
                f"{self.log.next_offset}, the checkpoint says {next_offset}",
            )
        self._mark = (self.applied_index, self.log.next_offset)
        self._checkpointed = (-1, -1)
        self.checkpoint()
        log.warning(
            "commit log rebuilt from local raft state path=%s intact_below=%d source=%s "
            "next_offset=%d applied=%d", self.log.directory, have, source,
            self.log.next_offset, self.applied_index,
        )

    def checkpoint(self) -> None:
        """Fsync the commit log, then durably record how far it is good.

        Runs in an executor thread while the loop applies: it reads `_mark`, which apply sets
        in one assignment after the records are appended, so the applied index and the next
        offset it records always belong together (reading the two attributes separately could
        pair an old index with a newer offset, and a restart would then apply an entry twice).
        The lock keeps checkpoints, and `restore()` replacing the log, from interleaving.
        """
        with self._checkpoint_lock:
            applied, next_offset = self._mark
            if (applied, next_offset) == self._checkpointed or self._rebuild_to is not None:
                return  # unchanged, or the log is not yet consistent with any applied index
            lowest = self.log.lowest_offset
            addresses = dict(self.addresses)
            with self._sync_lock:
                if self._behind_error is not None:
                    # A failed fsync may have dropped the pages it could not write; a later
                    # one can then succeed without them: vouching for them would be a lie.
                    raise self._behind_error
                self.log.sync()
            _write_sealed_json(self._checkpoint_path, {
                "applied": applied, "next_offset": next_offset, "lowest_offset": lowest,
                "addresses": addresses,
            })
            self._checkpointed = (applied, next_offset)

    def enforce_retention(self, now: float | None = None) -> int:
        """Drop the oldest sealed segments past the retention limits; returns the bytes
        dropped. On the loop: readers and applies share the log with it.

        As Kafka does: by size, a segment goes while the log is `max_bytes` or more without
        it (so at most `max_bytes` plus one segment stay); by age, once its store file was
        last written more than `max_age_seconds` ago (its newest record's age; a restore
        writes the records anew, so they age from then). The active segment always stays,
        and so does anything a snapshot build or restore in progress reads.

        The cut is recorded durably before any file goes: a crash in between must not look
        like lost segments at the next open (which would rebuild the whole log from Raft).
        """
        limits = self.retention
        if not (limits.max_bytes or limits.max_age_seconds) or self._rebuild_to is not None:
            return 0
        # Only what the last checkpoint vouches for: a restart re-applies the entries
        # after it, and their records must still be there to be cut back to, or it would
        # take the missing head for lost segments (and none right after a restore, -1).
        started = time.perf_counter()
        keep_from = min(self._pins.values(), default=self._checkpointed[1])
        spans = self.log.segment_spans()
        total = sum(size for _, _, size in spans)
        now = time.time() if now is None else now
        cut, dropped = spans[0][0], 0
        for base, end, size in spans[:-1]:
            if end > keep_from:
                break
            by_size = limits.max_bytes and total - dropped - size >= limits.max_bytes
            by_age = limits.max_age_seconds and (
                now - self.log.last_written(base) > limits.max_age_seconds)
            if not (by_size or by_age):
                break
            cut, dropped = end, dropped + size
        if not dropped:
            return 0
        _write_sealed_json(self._floor_path, {"lowest_offset": cut})
        self.log.truncate_before(cut)
        self.retention_cuts += 1
        self.retention_dropped_bytes += dropped
        log.info("retention dropped segments path=%s lowest_offset=%d bytes=%d took_ms=%.1f",
                 self.log.directory, cut, dropped, (time.perf_counter() - started) * 1000)
        return dropped

    # ------------------------------------------------------------------ Fsm protocol

    def apply(self, entries: Sequence[Entry]) -> list[Any]:
        if self._rebuild_to is not None:
            # recover() was not called and the driver replays the Raft log from its start
            # (there is no snapshot, or restore() would have run): start the log over at
            # the offset its first entry made.
            self.log.reset(0)
            self._rebuild_to = None
        results: list[Any] = []
        for entry in entries:
            result: Any = None
            if entry.index <= self.applied_index:
                results.append(None)  # re-delivered after a restart: already in the log
                continue
            if entry.type is EntryType.NORMAL and entry.data:
                cmd, payload = entry.data[0], entry.data[1:]
                if cmd == CMD_RECORDS:
                    values = raft_pb2.RecordBatchCommand.FromString(payload).values
                    first = self.log.next_offset
                    self.log.append_batch(
                        [encode_record(v, first + i, entry.term) for i, v in enumerate(values)]
                    )
                    self._wrote(len(payload))
                    result = first
                elif cmd == CMD_PEER_ADDRESS:
                    peer = raft_pb2.PeerAddressCommand.FromString(payload)
                    self.addresses[peer.id] = peer.rpc_addr
                else:
                    log.error("unknown fsm command %d at index %d", cmd, entry.index)
            self.applied_index = entry.index
            results.append(result)
        self._mark = (self.applied_index, self.log.next_offset)
        self.log.flush()
        return results

    def snapshot_data(self) -> memoryview:
        """The whole snapshot in one go (see `snapshot_steps`)."""
        for data in self.snapshot_steps():
            if data is not None:
                return data
        raise AssertionError("snapshot_steps ends with the data")  # pragma: no cover

    def state_bytes(self) -> int:
        """The commit log's store files: a snapshot holds the same records, framed smaller."""
        return sum(size for _, _, size in self.log.segment_spans())

    def snapshot_steps(self) -> Generator[memoryview | None, None, None]:
        """Address book, then every record of the commit log, length-prefixed: the state as
        of this call, built batch by batch as the iterator is advanced (None after each
        batch of up to 8 MiB, then the data).

        So the driver can build it between other work on the loop: later applies only
        append past the end captured here. A restore must not run before the iterator is
        exhausted or closed (it resets the log under it).

        Written to a scratch file, which is mapped and unlinked: the snapshot is as large as
        the commit log, so it never goes on the heap. The mapping keeps the file's blocks
        until its last holder lets go (RaftStorage then holds its own copy).

        A record that fails its CRC here was damaged while the node ran, where the verified
        stamps cannot see it (bit rot changes no mtime): they are dropped, so the next open
        verifies every segment and rebuilds the damage before serving. The error propagates
        (no snapshot can be taken without the record).
        """
        book = json.dumps(self.addresses).encode()
        steps = self._build_snapshot(book, self.log.lowest_offset, self.log.next_offset)
        self._pins[steps] = self.log.lowest_offset  # retention keeps what it will read
        return steps

    def _build_snapshot(
        self, book: bytes, offset: int, end: int
    ) -> Generator[memoryview | None, None, None]:
        pack = _U32.pack
        out = open(self._build_path, "w+b", buffering=1 << 20)  # noqa: SIM115 - closed below
        try:
            out.write(_SNAP_HEADER.pack(offset, len(book)))
            out.write(book)
            while offset < end:
                batch = self.log.read_batch(offset, min(4096, end - offset), 8 << 20)
                for record in batch:
                    out.write(pack(len(record)))
                    out.write(record)
                offset += len(batch)
                if offset < end:
                    yield None
            out.flush()
            mapped = map_readonly(out.fileno())
        except CorruptRecord:
            log.error("commit log damaged while running: full verification at next open "
                      "path=%s offset=%d", self.log.directory, offset)
            self._stamps_path.unlink(missing_ok=True)
            raise
        finally:
            out.close()
            self._build_path.unlink(missing_ok=True)
        yield memoryview(mapped)

    def restore(self, snapshot: Snapshot) -> None:
        """Make the state the snapshot's in one go, durably (see `restore_steps`)."""
        for _ in self.restore_steps(snapshot):
            pass
        self.checkpoint()

    def restore_steps(self, snapshot: Snapshot) -> Generator[None, None, None]:
        """See `_restore_steps`; retention cuts nothing while it runs."""
        steps = self._restore_steps(snapshot)
        self._pins[steps] = -1
        return steps

    def _restore_steps(self, snapshot: Snapshot) -> Generator[None, None, None]:
        """Make the state the snapshot's, a few milliseconds of work per step.

        A snapshot is as large as the commit log, seconds per GiB to restore, and the driver
        yields to the event loop between steps: a node whose loop stops that long serves no
        reader and answers no gossip probe, and gossip declares a member that misses a probe
        and then 2 s of suspicion failed, which removes it from the cluster. (Raft messages
        are taken in between too, but answered with the next Ready, after the restore.)

        The log is kept, and only the records it lacks are appended, when it is a prefix of
        the snapshot's: its last record equal to the snapshot's at that offset (a record
        holds its offset and term), wherever each starts (each node's retention cuts its own
        head, so the kept log may start before or after the snapshot). Applied entries are
        committed, so this is the usual case (a node that fell behind the leader's
        compaction, or a new one), and readers meanwhile see the log only grow, as with
        applies. Otherwise (a log pending rebuild, or one that disagrees, which is logged)
        it is reset to the snapshot's first offset and refilled.

        Records are appended as memoryview slices of the snapshot's buffer (a file mapping
        once stored), never copied to the heap. The framing is checked in full before the
        log is touched, so a malformed snapshot leaves the old state in place. Not durable
        until `checkpoint()`: a restart before that cuts the log back to the old checkpoint
        and restores again.
        """
        data = memoryview(snapshot.data)
        first, addresses, records_at = _snapshot_header(data)
        have = self.log.next_offset - first  # records of ours the snapshot might start with
        count, after_ours, our_last = yield from _check_framing(data, records_at, have)
        if not self._is_prefix_of(data, first, have, our_last, count):
            with self._checkpoint_lock:  # a checkpoint meanwhile records "nothing applied"
                self._rebuild_to = None
                self.log.reset(first)
                # The old cut says nothing about this log: a head missing later is a loss.
                self._floor_path.unlink(missing_ok=True)
                self.applied_index = 0
                self._mark = (0, first)
            after_ours = records_at
        yield from self._append_from(data, after_ours)
        with self._checkpoint_lock:  # no checkpoint may pair the old marks with the new log
            # In place: the Raft transport and the membership reconciler hold this dict.
            self.addresses.clear()
            self.addresses.update(addresses)
            self.applied_index = snapshot.meta.index
            self._mark = (self.applied_index, self.log.next_offset)
            self._checkpointed = (-1, -1)

    def _is_prefix_of(
        self, data: memoryview, first: int, have: int, our_last: int, count: int
    ) -> bool:
        """Whether the log is a prefix of the snapshot's records from wherever each starts
        (retention cuts each node's head on its own): it is not pending rebuild, ends within
        the snapshot, and its last record is the snapshot's record framed at `our_last` (-1:
        the snapshot has fewer than `have`); an empty log must start where the snapshot
        does. Logs a disagreement."""
        if self._rebuild_to is not None or have < 0:
            return False
        if have == 0 or self.log.lowest_offset == self.log.next_offset:
            return self.log.lowest_offset == first
        if our_last >= 0 and self._holds(first + have - 1, data, our_last):
            return True
        log.error(
            "commit log disagrees with the leader's snapshot; replacing it path=%s "
            "next_offset=%d snapshot_first=%d snapshot_records=%d",
            self.log.directory, self.log.next_offset, first, count)
        return False

    def _append_from(self, data: memoryview, pos: int) -> Generator[None, None, None]:
        """Append the snapshot's records framed from `pos` on, a run per step."""
        unpack = _U32.unpack_from
        size = len(data)
        run: list[memoryview] = []
        run_bytes = 0
        while pos < size:
            (n,) = unpack(data, pos)
            run.append(data[pos + 4 : pos + 4 + n])
            run_bytes += n
            pos += 4 + n
            if run_bytes >= _RESTORE_RUN_BYTES:
                self.log.append_batch(run)
                self._wrote(run_bytes)
                run = []
                run_bytes = 0
                yield
        if run:
            self.log.append_batch(run)
            self._wrote(run_bytes)

    def _wrote(self, nbytes: int) -> None:
        """Count appended bytes; past `_WRITE_BEHIND_BYTES`, fsync the log in an executor
        thread (one at a time), so a segment roll or a checkpoint finds little left to
        write. Without a running loop (tools, tests) the checkpoint does it all."""
        self._dirty += nbytes
        if self._dirty < _WRITE_BEHIND_BYTES or (
            self._behind is not None and not self._behind.done()
        ):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._dirty = 0
        self._behind = loop.run_in_executor(None, self._write_behind)

    def _write_behind(self) -> None:
        """fsync the log (an executor thread); a failure is kept for every later checkpoint."""
        with self._sync_lock:
            if self._behind_error is not None:
                return
            try:
                self.log.sync()
            except Exception as exc:  # an OSError (EIO, ENOSPC); anything else is a bug
                log.error("commit log write-behind fsync failed path=%s: %r",
                          self.log.directory, exc)
                self._behind_error = exc

    def _holds(self, offset: int, data: memoryview, pos: int) -> bool:
        """Whether the log's record at `offset` is the snapshot's record framed at `pos`."""
        (n,) = _U32.unpack_from(data, pos)
        try:
            return self.log.read(offset) == data[pos + 4 : pos + 4 + n]
        except CorruptRecord:
            return False

    def close(self) -> None:
        self.log.close()


#: Coalesced appends are cut into Raft entries of about this many payload bytes.
_COALESCE_BYTES = 1 << 20

#: How often held-back appends look again whether the Raft log has room.
_HOLD_POLL_SECONDS = 0.01


def _fail_all(
    chunk: Sequence[tuple[Sequence[bytes], asyncio.Future[int]]], exc: BaseException
) -> None:
    for _, fut in chunk:
        if not fut.done():
            fut.set_exception(exc)


class ReplicatedBackend:
    """dcl.server.backend.Backend over Raft: appends go through consensus, reads are local."""

    def __init__(self, driver: RaftDriver, fsm: LogFsm, rpc_addr: str) -> None:
        self.driver = driver
        self.fsm = fsm
        self.rpc_addr = rpc_addr
        self._applied = asyncio.Event()
        driver.on_applied = self._notify
        self._closed = False
        self._pending: list[tuple[Sequence[bytes], asyncio.Future[int]]] = []
        #: When appends began to be held back (`RaftDriver.log_memory_full`), else None.
        self._held_since: float | None = None

    def _notify(self) -> None:
        self._applied.set()
        self._applied = asyncio.Event()

    def _not_leader(self) -> NotLeader:
        leader = self.driver.core.leader_id
        return NotLeader(leader, self.fsm.addresses.get(leader) if leader else None)

    def append(self, values: Sequence[bytes]) -> Awaitable[int]:
        """Append `values` as consecutive offsets; resolves to the first once applied here.

        Appends made in the same event-loop turn (many Produce calls in flight, a
        ProduceStream's pipelined requests) are coalesced into one Raft entry per
        `_COALESCE_BYTES`: Raft, the disk and the followers then pay per entry rather than
        per record. Each caller still gets its own contiguous offsets, in call order; if
        the entry fails, every caller in it gets the same error (none of it was written,
        or, on CommitTimeout, all of it may have been).
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        if self._closed:
            fut.set_exception(Unavailable("node is shutting down"))
            return fut
        if self.driver.core.role is not Role.LEADER:
            fut.set_exception(self._not_leader())
            return fut
        refusal = self.driver.write_refusal()
        if refusal is not None:
            # Refused, not held: a disk frees up on an operator's time, not a call's.
            self.driver.refused_for_disk += 1
            fut.set_exception(refusal)
            return fut
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((values, fut))
        return fut

    def _flush(self) -> None:
        """Propose the coalesced appends, in order, as entries of bounded size.

        While the in-memory Raft log is full (`RaftDriver.log_memory_full`) they stay
        queued, in order, and are looked at again every `_HOLD_POLL_SECONDS`: writers wait
        for the snapshot that frees it rather than grow this node's memory without bound.
        The check is made before each entry, so what was queued during a hold does not
        overfill the log once it lifts. An append whose caller gave up meanwhile (deadline,
        cancel; a ProduceStream cancels all it still has queued) is not proposed, and none is
        once, while they were held, the node came to take no records for lack of disk
        (`RaftDriver.write_refusal`).
        """
        pending = [item for item in self._pending if not item[1].done()]
        self._pending = []
        chunks = runs_within(pending, lambda item: sum(map(len, item[0])), _COALESCE_BYTES)
        for i, chunk in enumerate(chunks):
            # Held appends were let in before the disk went low: look again (`append`
            # looked at each when it came).
            refusal = self.driver.write_refusal() if self._held_since is not None else None
            if refusal is not None:
                for rest in chunks[i:]:
                    _fail_all(rest, refusal)
                self._held_since = None
                return
            if self._must_hold():
                self._pending = [item for rest in chunks[i:] for item in rest] + self._pending
                asyncio.get_running_loop().call_later(_HOLD_POLL_SECONDS, self._flush)
                return
            self._propose_chunk(chunk)
        if self._held_since is not None:
            log.info("appends resume after %.3f s held back node=%s",
                     asyncio.get_running_loop().time() - self._held_since, self.driver.node_id)
            self._held_since = None

    def _must_hold(self) -> bool:
        """Whether to keep appends queued now: the Raft log is full while this node leads
        (a node that stopped leading lets them fail at once with NotLeader)."""
        driver = self.driver
        if self._closed or not driver.log_memory_full or driver.core.role is not Role.LEADER:
            return False
        if self._held_since is None:
            self._held_since = asyncio.get_running_loop().time()
            log.warning("raft log over its memory limit while a snapshot is built: "
                        "holding appends back node=%s", driver.node_id)
        return True

    def _propose_chunk(self, chunk: list[tuple[Sequence[bytes], asyncio.Future[int]]]) -> None:
        values = chunk[0][0] if len(chunk) == 1 else [v for vs, _ in chunk for v in vs]

        def settle(exc: BaseException | None, result: Any) -> None:
            # Runs inside the driver's apply: callers wake in the next loop turn.
            if exc is not None:
                _fail_all(chunk, self._not_leader() if isinstance(exc, NotLeader) else exc)
                return
            first = int(result)
            for vs, fut in chunk:
                if not fut.done():
                    fut.set_result(first)
                first += len(vs)

        try:
            if self._closed:
                raise Unavailable("node is shutting down")
            self.driver.propose_hook(encode_records_cmd(values), settle)
        except Exception as exc:
            settle(exc, None)

    def _check_readable(self, offset: int) -> None:
        if offset < self.fsm.log.lowest_offset or offset >= self.fsm.log.next_offset:
            raise OffsetOutOfRange(offset, self.fsm.log.lowest_offset, self.fsm.log.next_offset)

    def read(self, offset: int) -> bytes:
        self._check_readable(offset)
        return self.fsm.log.read(offset)

    def read_batch(self, offset: int, max_records: int, max_bytes: int) -> list[bytes]:
        self._check_readable(offset)
        return self.fsm.log.read_batch(offset, max_records, max_bytes)

    @property
    def lowest_offset(self) -> int:
        return self.fsm.log.lowest_offset

    @property
    def next_offset(self) -> int:
        return self.fsm.log.next_offset

    @property
    def log_bytes(self) -> int:
        """Bytes of the commit log's store files (what retention bounds)."""
        return self.fsm.state_bytes()

    async def wait_for(self, offset: int) -> None:
        while offset >= self.fsm.log.next_offset:
            if self._closed:
                raise Unavailable("node is shutting down")
            await self._applied.wait()

    def servers(self) -> list[ServerInfo]:
        core = self.driver.core
        ids = sorted(core.voters | core.learners)
        addresses = self.fsm.addresses
        return [ServerInfo(i, addresses.get(i, ""), i == core.leader_id) for i in ids]

    @property
    def has_leader(self) -> bool:
        """Healthy: a member of the configuration that knows a leader. A node removed from
        the cluster keeps running (and serving what it has) but must not look healthy."""
        core = self.driver.core
        return core.leader_id is not None and (core.id in core.voters or core.id in core.learners)

    def close(self) -> None:
        self._closed = True
        self._notify()
