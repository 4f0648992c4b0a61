"""The Raft log and Raft state on disk: what `RaftNode` is rebuilt from after a restart.

Layout under the storage directory:

    log/       a `dcl.storage.Log` whose offsets ARE raft indexes; one record per entry:
               8-byte big-endian term + `Entry.encode()` (type byte + payload)
    state/     `hard_state`: term, vote, commit, CRC32 (replaced atomically)
    snapshot/  `snapshot`: the latest snapshot's meta and bytes, CRC32 (replaced atomically)

Durability contract (driver, see `dcl.raft.core`):
  * `append()` buffers; `sync()` is the group-commit fsync, run before sending acknowledgements.
  * `set_hard_state()` writes and fsyncs AT ONCE when term or vote changed (rare: elections),
    so a vote is durable before the driver can send anything that depends on it. A change of
    the commit index alone is only remembered (written with the next term/vote change or at
    `close()`): losing it is safe, and three fsyncs per Ready would cap throughput.
  * `save_snapshot()` is durable when it returns.

Crash safety of snapshot installation: the snapshot file is made durable BEFORE the log is cut
to it, and every open re-runs the same reconciliation (`_reconcile`), so a crash anywhere in
between recovers to "snapshot + the log entries that provably follow it". Invariant kept on
disk: the log's lowest index is <= snapshot index + 1 (no gap between snapshot and log).
Entries below the snapshot are kept up to `retain_bytes` (retention, in whole segments): a
leader sends them to a follower that fell only a little behind (`retained`).

Thread-safety: one thread (the asyncio loop) calls everything except `sync()`, which may run in
an executor thread concurrently with `append()` of NON-conflicting entries (the log supports
exactly that), and `write_snapshot()`, which touches only the snapshot file and may run in
another thread concurrently with anything. Truncating appends, `save_snapshot()`,
`adopt_snapshot()` and `compact()` remove segment files, so the driver must not overlap them
with an in-flight `sync()`.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, TypeVar

from dcl.errors import CorruptRecord, InvalidRequest, OffsetOutOfRange
from dcl.raft.types import Entry, HardState, Snapshot, SnapshotMeta
from dcl.storage import Log, LogConfig, LogInUse
from dcl.storage.files import (
    TMP_SUFFIX,
    close_later,
    fsync_directory,
    map_readonly,
    replace_atomically,
)

logger = logging.getLogger("dcl.raft.storage")
_T = TypeVar("_T")

__all__ = ["RaftStorage"]

# One record in the log: term (u64) + type (u8), then the payload. Identical bytes to
# "8-byte term + Entry.encode()", built with one pack and one concatenation.
_RECORD_HEADER = struct.Struct(">QB")
_RECORD_HEADER_SIZE = _RECORD_HEADER.size
_TERM = struct.Struct(">Q")

# Hard state file: magic, version, term, commit, has_vote, vote length; vote bytes; CRC32 of
# everything before it.
_HS_MAGIC = b"DCLH"
_HS_HEADER = struct.Struct(">4sBQQBH")
#: A snapshot file's data is flushed every this many bytes while it is written (see
#: `replace_atomically`): the log's own fsyncs then wait for at most about this much.
_SYNC_EVERY = 1 << 20

#: Log kept below the snapshot by default (`RaftStorage(retain_bytes=...)`): at a busy
#: 60 MB/s of batched writes, a few seconds of lag a follower can make up from the log
#: (a restart takes about that long), against a snapshot as large as the whole commit log.
DEFAULT_RETAIN_BYTES = 256 << 20

# Snapshot file: magic, version, index, term, voter count, learner count; then each id as
# (u16 length, UTF-8); then data length (u64) and the data; then CRC32 of everything before.
_SNAP_MAGIC = b"DCLS"
_SNAP_HEADER = struct.Struct(">4sBQQII")
_ID_LEN = struct.Struct(">H")
_DATA_LEN = struct.Struct(">Q")
_CRC = struct.Struct(">I")
_VERSION = 1

_HS_FILE = "hard_state"
_SNAP_FILE = "snapshot"

# load() reads the log in batches of this size so a huge log does not need one giant list of
# raw records next to the decoded entries.
_LOAD_BATCH_RECORDS = 4096
_LOAD_BATCH_BYTES = 16 << 20


def _encode_entry(entry: Entry) -> bytes:
    return _RECORD_HEADER.pack(entry.term, entry.type) + entry.data


def _decode_entry(index: int, raw: bytes, path: str) -> Entry:
    if len(raw) < _RECORD_HEADER_SIZE:
        raise CorruptRecord(path, index, "raft record shorter than its header")
    view = memoryview(raw)
    try:
        return Entry.decode(_TERM.unpack_from(raw, 0)[0], index, view[_TERM.size :])
    except ValueError as exc:  # unknown EntryType byte
        raise CorruptRecord(path, index, f"raft record: {exc}") from None


def _encode_hard_state(hs: HardState) -> bytes:
    vote = b"" if hs.vote is None else hs.vote.encode()
    body = (
        _HS_HEADER.pack(_HS_MAGIC, _VERSION, hs.term, hs.commit, hs.vote is not None, len(vote))
        + vote
    )
    return body + _CRC.pack(zlib.crc32(body))


def _decode_hard_state(raw: bytes, path: str) -> HardState:
    if len(raw) < _HS_HEADER.size + _CRC.size:
        raise CorruptRecord(path, 0, "hard state file truncated")
    body_end = len(raw) - _CRC.size
    if zlib.crc32(memoryview(raw)[:body_end]) != _CRC.unpack_from(raw, body_end)[0]:
        raise CorruptRecord(path, 0, "hard state checksum mismatch")
    magic, version, term, commit, has_vote, n = _HS_HEADER.unpack_from(raw, 0)
    if magic != _HS_MAGIC or version != _VERSION or _HS_HEADER.size + n != body_end:
        raise CorruptRecord(path, 0, "hard state header invalid")
    vote = raw[_HS_HEADER.size : body_end].decode() if has_vote else None
    return HardState(term, vote, commit)


def _encode_ids(ids: frozenset[str], out: list[bytes | memoryview]) -> None:
    for node in sorted(ids):  # sorted: identical snapshots give identical files
        raw = node.encode()
        out.append(_ID_LEN.pack(len(raw)))
        out.append(raw)


def _encode_snapshot(snapshot: Snapshot) -> list[bytes | memoryview]:
    """The file as a list of parts, so the (possibly large) data is never copied into one
    buffer with the header; the CRC covers every part."""
    meta = snapshot.meta
    parts: list[bytes | memoryview] = [
        _SNAP_HEADER.pack(
            _SNAP_MAGIC, _VERSION, meta.index, meta.term, len(meta.voters), len(meta.learners)
        )
    ]
    _encode_ids(meta.voters, parts)
    _encode_ids(meta.learners, parts)
    parts.append(_DATA_LEN.pack(len(snapshot.data)))
    parts.append(snapshot.data)
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    parts.append(_CRC.pack(crc))
    return parts


def _decode_snapshot(raw: bytes | mmap.mmap, path: str, verify: bool = True) -> Snapshot:
    """The snapshot in `raw`; its data is a view into `raw`, not a copy."""
    view = memoryview(raw).toreadonly()
    if len(raw) < _SNAP_HEADER.size + _DATA_LEN.size + _CRC.size:
        raise CorruptRecord(path, 0, "snapshot file truncated")
    body_end = len(raw) - _CRC.size
    if verify and zlib.crc32(view[:body_end]) != _CRC.unpack_from(raw, body_end)[0]:
        raise CorruptRecord(path, 0, "snapshot checksum mismatch")
    try:
        magic, version, index, term, n_voters, n_learners = _SNAP_HEADER.unpack_from(raw, 0)
        if magic != _SNAP_MAGIC or version != _VERSION:
            raise CorruptRecord(path, 0, "snapshot header invalid")
        p = _SNAP_HEADER.size
        groups: list[frozenset[str]] = []
        for count in (n_voters, n_learners):
            ids = []
            for _ in range(count):
                (n,) = _ID_LEN.unpack_from(raw, p)
                p += _ID_LEN.size
                ids.append(bytes(view[p : p + n]).decode())
                p += n
            groups.append(frozenset(ids))
        (size,) = _DATA_LEN.unpack_from(raw, p)
        p += _DATA_LEN.size
    except (struct.error, UnicodeDecodeError) as exc:
        raise CorruptRecord(path, 0, f"snapshot header invalid: {exc}") from None
    if p + size != body_end:
        raise CorruptRecord(path, p, "snapshot data length mismatch")
    return Snapshot(SnapshotMeta(index, term, groups[0], groups[1]), view[p:body_end])


def _map_snapshot(path: Path, verify: bool = True) -> Snapshot | None:
    """The snapshot file mapped read-only: its data stays in the page cache, off the heap,
    however large the log it holds. The mapping outlives a later replacement of the file
    (it pins the old inode), so a holder of this snapshot is never cut short."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return _decode_snapshot(b"", str(path))
        mapped = map_readonly(fd)
    finally:
        os.close(fd)
    return _decode_snapshot(mapped, str(path), verify)


class FileSpool:
    """A SnapshotSpool (dcl.raft.types) in a scratch file: a follower catching up holds
    the leader's snapshot, as large as the whole commit log, in the page cache instead of
    on its heap. Not durable and not meant to be: a restart asks the leader again.

    `take()` maps the file read-only and unlinks it; the mapping keeps its blocks until the
    last holder lets go (by then RaftStorage holds its own copy, the snapshot file).
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: BinaryIO | None = None
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def restart(self, first: bytes) -> None:
        self.close()
        if first:
            self._file = open(self._path, "w+b", buffering=1 << 20)  # noqa: SIM115
            self.extend(first)

    def extend(self, chunk: bytes) -> None:
        assert self._file is not None, "extend() before restart()"
        self._file.write(chunk)
        self._size += len(chunk)

    def take(self) -> bytes | memoryview:
        f = self._file
        if f is None or not self._size:
            self.close()
            return b""
        f.flush()
        mapped = map_readonly(f.fileno())  # holds the file from here on
        size = self._size
        f.close()
        self._file = None
        self.close()
        if len(mapped) != size:  # never hand the core a snapshot of the wrong length
            mapped.close()
            raise OSError(f"snapshot spool {self._path} holds a different size than written")
        return memoryview(mapped)

    def close(self) -> None:
        """Drop what is held: the file's blocks go with the last mapping of them, or, for a
        snapshot dropped partway (hundreds of MB), with a descriptor `close_later` closes."""
        held = -1
        if self._file is not None:
            held = os.dup(self._file.fileno())
            self._file.close()
            self._file = None
        self._size = 0
        self._path.unlink(missing_ok=True)
        if held >= 0:
            close_later(held)


class RaftStorage:
    """Persistent Raft state of one node: log entries, hard state and the latest snapshot."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_segment_bytes: int = 64 * 1024 * 1024,
        retain_bytes: int = DEFAULT_RETAIN_BYTES,
    ) -> None:
        """Open (creating if needed) and recover the storage in `directory`.

        `retain_bytes`: how much of the log below the snapshot to keep on disk (whole
        segments, newest first) so that a leader can send it to a follower briefly behind
        instead of the whole snapshot (`retained`). 0 turns that off: `retained` answers
        nothing, and only entries that share a segment with newer ones stay on disk.

        Recovery: the log trims torn tails itself; this then reconciles the log with the
        snapshot (see `_reconcile`) so `load()` returns a contiguous log after the snapshot.
        Raises `LogInUse` if another `RaftStorage` has the directory open, `CorruptRecord`
        if the state or snapshot file fails its checksum.
        """
        if retain_bytes < 0:
            raise InvalidRequest("retain_bytes must be >= 0")
        self.directory = Path(directory)
        self._retain_bytes = retain_bytes
        self._closed = True
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise LogInUse(f"raft storage {self.directory} is open elsewhere") from None
        try:
            self._open(max_segment_bytes)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._closed = False

    def _open(self, max_segment_bytes: int) -> None:
        self._state_dir = self.directory / "state"
        self._snap_dir = self.directory / "snapshot"
        for d in (self._state_dir, self._snap_dir):
            d.mkdir(exist_ok=True)
            for name in os.listdir(d):
                if name.endswith(TMP_SUFFIX):  # an atomic replace interrupted by a crash
                    os.unlink(d / name)
        fsync_directory(self.directory)

        self._snapshot = self._read_snapshot()
        # Its scratch file ends in TMP_SUFFIX: a crash leaves nothing the next open keeps.
        self._spool = FileSpool(self._snap_dir / ("incoming" + TMP_SUFFIX))
        self._write_lock = threading.Lock()
        #: Index of the snapshot in the file (written, maybe not adopted yet).
        self._written_index = self.snapshot_index
        stored = self._read_hard_state()
        self._hs = stored
        self._durable_hs = stored

        snap_index = self.snapshot_index
        # The log's initial offset matters only when its directory holds no segment: a fresh
        # store (raft indexes start at 1) or a crash inside Log.reset (continue after the
        # snapshot, which is already durable then).
        config = LogConfig(
            max_store_bytes=max_segment_bytes, initial_offset=snap_index + 1, empty_records=False
        )
        self._log = Log(self.directory / "log", config)
        try:
            self._reconcile()
        except BaseException:
            self._log.close()
            raise

    # -- properties -----------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot | None:
        """The latest durable snapshot (the FSM rebuilds from it when its own files are damaged)."""
        return self._snapshot

    @property
    def snapshot_index(self) -> int:
        return 0 if self._snapshot is None else self._snapshot.meta.index

    @property
    def snapshot_term(self) -> int:
        return 0 if self._snapshot is None else self._snapshot.meta.term

    @property
    def first_index(self) -> int:
        """Index of the first entry after the snapshot (last_index + 1 when there is none).

        The log may still hold older entries (whole segments are dropped, and up to
        `retain_bytes` are kept on purpose), but they are covered by the snapshot and only
        ever handed out by `retained`.
        """
        return self.snapshot_index + 1

    @property
    def last_index(self) -> int:
        """Index of the last appended entry (buffered ones count); the snapshot index if none."""
        return self._log.next_offset - 1

    @property
    def hard_state(self) -> HardState:
        """The latest hard state passed to `set_hard_state` (its commit may not be durable)."""
        return self._hs

    @property
    def durable_term(self) -> int:
        """The term on disk: `set_hard_state` writes a new one before it returns."""
        return self._durable_hs.term

    # -- reads ----------------------------------------------------------------------------

    def load(self) -> tuple[HardState, Snapshot | None, list[Entry]]:
        """What to pass to `RaftNode(hard_state=..., snapshot=..., entries=...)` on restart.

        The commit index is raised to the snapshot index: the stored commit may lag (it is
        written lazily) but a snapshot only ever holds committed state.
        """
        self._check_open()
        hs = self._hs
        if hs.commit < self.snapshot_index:
            hs = HardState(hs.term, hs.vote, self.snapshot_index)
        return hs, self._snapshot, self.entries(self.first_index, self.last_index + 1)

    def entries(self, lo: int, hi: int) -> list[Entry]:
        """Entries with index in [lo, hi), read back from the log (CRC-checked).

        Raises `CorruptRecord` naming the damaged file. That is not a torn tail (recovery trims
        those) but damage to fsynced entries this node may have acknowledged: dropping them
        and rejoining with a shorter log is unsafe for a voter (a quorum could then lack an
        entry it counted as committed), so `load()` failing this way stops the node.
        """
        self._check_open()
        log = self._log
        path = str(log.directory)
        out: list[Entry] = []
        index = lo
        try:
            while index < hi:
                batch = log.read_batch(
                    index, min(hi - index, _LOAD_BATCH_RECORDS), _LOAD_BATCH_BYTES)
                for raw in batch:
                    out.append(_decode_entry(index, raw, path))
                    index += 1
        except CorruptRecord as exc:
            raise CorruptRecord(
                exc.path, exc.position,
                f"{exc.reason} (raft entry {index}); the Raft log is damaged and this node "
                "must not run on it (it may have acknowledged the lost entries): restore its "
                "data directory, or remove the node from the cluster and add it back empty",
            ) from exc
        return out

    def retained(
        self, prev: int, max_entries: int, max_bytes: int
    ) -> tuple[int, list[Entry]] | None:
        """`RaftNode(retained=...)`: the term of entry `prev` and the entries after it, read
        back from the log (at most `max_entries`, about `max_bytes`, at least one); None if
        the log no longer holds `prev` or the next entry, or they do not read back intact
        (the leader then sends its snapshot, as it would without them)."""
        if self._closed or not self._retain_bytes:
            return None  # off: not even what shares a segment with newer entries
        log = self._log
        lowest = log.lowest_offset
        # Right before the log's first entry, only index 0 (term 0: a node joining with an
        # empty log gets the whole log while it is kept from its start) or the stored
        # snapshot's index has a known term.
        before = prev == lowest - 1 and prev in (0, self.snapshot_index)
        if prev >= self.last_index or not (prev >= lowest or before):
            return None
        path = str(log.directory)
        try:
            term = self.term(prev) if prev else 0
            raws = log.read_batch(prev + 1, max_entries, max_bytes)
            entries = [_decode_entry(prev + 1 + i, raw, path) for i, raw in enumerate(raws)]
        except (CorruptRecord, OffsetOutOfRange, OSError) as exc:
            # Only a follower's catch-up depends on these: the snapshot still serves it, and
            # the node's own log (what it must not lose) is not what failed to read here.
            logger.warning("retained raft entries unreadable, sending the snapshot instead "
                           "path=%s prev=%d: %s", path, prev, exc)
            return None
        return term, entries

    def term(self, index: int) -> int:
        """Term of the entry at `index` (the snapshot's term at the snapshot index)."""
        self._check_open()
        if index == self.snapshot_index:
            return self.snapshot_term
        return self._log_term(index)

    # -- writes ---------------------------------------------------------------------------

    def append(self, entries: Sequence[Entry]) -> None:
        """Append `entries` (consecutive indexes), replacing any conflicting suffix first.

        Not durable until `sync()` (group commit). The suffix cut itself IS durable when this
        returns (`Log.truncate_after` fsyncs it), so removed entries cannot reappear after a
        crash underneath entries appended later.
        """
        self._check_open()
        if not entries:
            return
        first = entries[0].index
        if entries[-1].index != first + len(entries) - 1:
            raise InvalidRequest("raft entries to append are not consecutive")
        if first <= self.snapshot_index:
            raise InvalidRequest(
                f"entry {first} is covered by the snapshot at {self.snapshot_index}"
            )
        last = self.last_index
        if first > last + 1:
            raise InvalidRequest(f"entry {first} leaves a gap after the last index {last}")
        if first <= last:
            self._log.truncate_after(first - 1)
        self._log.append_batch([_encode_entry(e) for e in entries])

    def sync(self) -> None:
        """The group-commit durability point: fsync every entry appended before the call.

        Safe from an executor thread while the loop thread appends. Term/vote need nothing
        here: `set_hard_state` already made them durable.
        """
        self._log.sync()

    def sync_submit(self, submit: Callable[[int], _T]) -> _T | None:
        """`sync()` without blocking: flush on the calling thread, then `submit(fd)` starts
        the fsync (dcl.storage.aio) and its result is returned. None if closed."""
        return self._log.sync_submit(submit)

    def set_hard_state(self, hs: HardState) -> None:
        """Record `hs`; if term or vote changed, write it durably before returning.

        Synchronous on purpose: term/vote change only at elections, and doing it here means no
        code path can send a message before the vote is on disk. A commit-only change stays in
        memory until the next durable write (or `close()`), which is safe to lose.
        """
        self._check_open()
        self._hs = hs
        durable = self._durable_hs
        if hs.term != durable.term or hs.vote != durable.vote:
            self._write_hard_state(hs)

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """Make `snapshot` durable, then cut the log to it.

        If the log holds the snapshot's index with the snapshot's term, the entries after it
        are the same as the leader's (Log Matching) and are kept; otherwise the whole log is
        replaced by an empty one starting at index + 1. The snapshot is durable before the log
        is touched, so a crash in between is finished by the next open.
        """
        self._check_open()
        if snapshot.meta.index < self.snapshot_index:
            raise InvalidRequest(
                f"snapshot at {snapshot.meta.index} is older than the stored one at "
                f"{self.snapshot_index}"
            )
        self.write_snapshot(snapshot)
        self.adopt_snapshot(snapshot)

    def write_snapshot(self, snapshot: Snapshot) -> None:
        """The first half of `save_snapshot`: make `snapshot` durable in the snapshot file,
        touching nothing else. Safe in an executor thread while the loop appends to and syncs
        the log; until `adopt_snapshot`, a restart still finds the log whole beside it."""
        self._check_open()
        with self._write_lock:
            if snapshot.meta.index < self._written_index:
                raise InvalidRequest(
                    f"snapshot at {snapshot.meta.index} is older than the written one at "
                    f"{self._written_index}"
                )
            replace_atomically(
                self._snap_dir / _SNAP_FILE, _encode_snapshot(snapshot), sync_every=_SYNC_EVERY
            )
            self._written_index = snapshot.meta.index

    def adopt_snapshot(self, snapshot: Snapshot) -> None:
        """The second half of `save_snapshot`, once `write_snapshot(snapshot)` returned: hold
        the file and cut the log to the snapshot. Not concurrently with `sync()`."""
        self._check_open()
        if snapshot.meta.index != self._written_index:
            raise InvalidRequest(f"snapshot at {snapshot.meta.index} was not the last written")
        # Hold the file, not the caller's bytes (just written: no need to re-check the CRC).
        self._snapshot = _map_snapshot(self._snap_dir / _SNAP_FILE, verify=False) or snapshot
        self._reconcile()

    def compact(self, index: int) -> None:
        """Drop whole log segments whose entries are all below `index` (retention).

        Clamped to the snapshot index + 1: entries after the stored snapshot are the only copy
        of that part of the log, and a gap would make the store unloadable. So call
        `save_snapshot` first (it already compacts up to the snapshot).
        """
        self._check_open()
        self._log.truncate_before(min(index, self.snapshot_index + 1))

    def close(self) -> None:
        """Sync the log, write a lagging commit index, release the directory."""
        if self._closed:
            return
        try:
            if self._hs != self._durable_hs:
                self._write_hard_state(self._hs)
        finally:
            self._log.close()
            self._spool.close()
            self._closed = True
            os.close(self._lock_fd)

    @property
    def snapshot_spool(self) -> FileSpool:
        """Where the core assembles a snapshot being received (RaftNode's `spool`)."""
        return self._spool

    def __enter__(self) -> RaftStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidRequest(f"raft storage {self.directory} is closed")

    def _reconcile(self) -> None:
        """Bring the log in line with the snapshot: keep only entries that provably follow it.

        Idempotent; run on every open and after every `save_snapshot`, so an interrupted
        snapshot installation or log reset is completed by the next open.
        """
        log = self._log
        index, term = self.snapshot_index, self.snapshot_term
        lowest, last = log.lowest_offset, log.highest_offset
        if last < lowest:  # empty log
            if log.next_offset != index + 1:
                if log.next_offset > index + 1:
                    logger.warning(
                        "raft log empty but continues past the snapshot; resetting "
                        "path=%s next=%d snapshot=%d",
                        log.directory,
                        log.next_offset,
                        index,
                    )
                log.reset(index + 1)
            return
        if lowest == index + 1:
            return  # the log starts right after the snapshot (e.g. compacted at a boundary)
        if lowest > index + 1:
            raise CorruptRecord(
                str(log.directory),
                0,
                f"raft log starts at {lowest}, after the snapshot at {index}: entries missing",
            )
        if index <= last and self._log_term(index) == term:
            self._trim_retained(index)
            return
        # The log does not continue the snapshot. Cut every entry first, from the END (each
        # removal durable), so a crash inside the reset below can only leave entries <= index,
        # which the next open discards; never a later segment that happens to start at
        # index + 1 and would pass for a continuation of the snapshot.
        log.truncate_after(lowest - 1)
        log.reset(index + 1)

    def _trim_retained(self, index: int) -> None:
        """Drop the segments wholly covered by the snapshot at `index`, except the newest
        ones that together fit in `retain_bytes`. Every entry kept matches the snapshot's
        history (the entry at `index` does, so by Log Matching all before it do)."""
        cut = index + 1
        kept = 0
        for base, nxt, size in reversed(self._log.segment_spans()):
            if nxt > index + 1:
                continue  # holds entries after the snapshot: kept whole anyway
            kept += size
            if kept > self._retain_bytes:
                break
            cut = base
        self._log.truncate_before(cut)

    def _log_term(self, index: int) -> int:
        raw = self._log.read(index)
        if len(raw) < _RECORD_HEADER_SIZE:
            raise CorruptRecord(str(self._log.directory), index, "raft record too short")
        term: int = _TERM.unpack_from(raw, 0)[0]
        return term

    def _read_hard_state(self) -> HardState:
        path = self._state_dir / _HS_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return HardState()
        return _decode_hard_state(raw, str(path))

    def _write_hard_state(self, hs: HardState) -> None:
        replace_atomically(self._state_dir / _HS_FILE, [_encode_hard_state(hs)])
        self._durable_hs = hs

    def _read_snapshot(self) -> Snapshot | None:
        return _map_snapshot(self._snap_dir / _SNAP_FILE)
