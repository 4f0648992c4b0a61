"""The replicated node's state machine and its Backend: the commit log fed by Raft.

Every NORMAL Raft entry is one command: a type byte, then a protobuf payload (RecordBatch or
PeerAddress), so the FSM routes without parsing the payload. A record batch becomes
consecutive offsets in the commit log, written as serialized log.v1.Record with the offset
filled in, so readers serve stored bytes as they are.

Durability: the Raft log is the durable copy (fsynced on a quorum before anything is
acknowledged). The commit log is rebuilt from it: a checkpoint (applied index, next offset),
written only after the commit log is fsynced, says how far the commit log is known good; on
restart the commit log is cut back to the checkpoint and later entries are applied again, so
apply is idempotent across crashes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import zlib
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

from dcl.api.dcl.v1 import raft_pb2
from dcl.errors import CorruptRecord, NotLeader, OffsetOutOfRange, Unavailable
from dcl.raft.driver import RaftDriver
from dcl.raft.types import Entry, EntryType, Role, Snapshot
from dcl.server.backend import ServerInfo
from dcl.server.records import encode_record
from dcl.storage import Log, LogConfig

__all__ = ["CMD_PEER_ADDRESS", "CMD_RECORDS", "LogFsm", "ReplicatedBackend", "encode_records_cmd"]

log = logging.getLogger(__name__)

CMD_RECORDS = 1
CMD_PEER_ADDRESS = 2
_U32 = struct.Struct(">I")
_SNAP_HEADER = struct.Struct(">QI")  # first offset, address-book JSON length


def encode_records_cmd(values: Sequence[bytes]) -> bytes:
    return bytes([CMD_RECORDS]) + raft_pb2.RecordBatchCommand(values=values).SerializeToString()


def encode_address_cmd(node_id: str, rpc_addr: str) -> bytes:
    payload = raft_pb2.PeerAddressCommand(id=node_id, rpc_addr=rpc_addr).SerializeToString()
    return bytes([CMD_PEER_ADDRESS]) + payload


class LogFsm:
    """Applies committed entries to the commit log; see the module docstring for durability."""

    def __init__(self, directory: Path, config: LogConfig | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._checkpoint_path = directory / "fsm.checkpoint"
        self.log = Log(directory / "commitlog", config or LogConfig())
        self.addresses: dict[str, str] = {}
        applied, next_offset, addresses = self._load_checkpoint()
        if self.log.next_offset > next_offset:
            self.log.truncate_after(next_offset - 1)
        elif self.log.next_offset < next_offset:
            # Checkpoints follow an fsync of the log, so this means the disk lost synced data.
            raise CorruptRecord(str(self.log), self.log.next_offset, "commit log behind checkpoint")
        self.applied_index = applied
        self.addresses.update(addresses)
        self._checkpointed = (applied, next_offset)

    def _load_checkpoint(self) -> tuple[int, int, dict[str, str]]:
        try:
            raw = self._checkpoint_path.read_bytes()
        except FileNotFoundError:
            return 0, self.log.lowest_offset, {}
        crc, body = raw[:4], raw[4:]
        if _U32.pack(zlib.crc32(body)) != crc:
            raise CorruptRecord(str(self._checkpoint_path), 0, "checkpoint checksum mismatch")
        doc = json.loads(body)
        return int(doc["applied"]), int(doc["next_offset"]), dict(doc.get("addresses", {}))

    def checkpoint(self) -> None:
        """Fsync the commit log, then durably record how far it is good. Thread-safe w.r.t.
        the loop appending (dcl.storage.Log.sync is); the captured marks are taken first."""
        applied, next_offset = self.applied_index, self.log.next_offset
        addresses = dict(self.addresses)
        if (applied, next_offset) == self._checkpointed:
            return
        self.log.sync()
        body = json.dumps(
            {"applied": applied, "next_offset": next_offset, "addresses": addresses}
        ).encode()
        tmp = self._checkpoint_path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(_U32.pack(zlib.crc32(body)) + body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._checkpoint_path)
        dir_fd = os.open(self._checkpoint_path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._checkpointed = (applied, next_offset)

    # ------------------------------------------------------------------ Fsm protocol

    def apply(self, entries: Sequence[Entry]) -> list[Any]:
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
                    result = first
                elif cmd == CMD_PEER_ADDRESS:
                    peer = raft_pb2.PeerAddressCommand.FromString(payload)
                    self.addresses[peer.id] = peer.rpc_addr
                else:
                    log.error("unknown fsm command %d at index %d", cmd, entry.index)
            self.applied_index = entry.index
            results.append(result)
        self.log.flush()
        return results

    def snapshot_data(self) -> bytes:
        """Address book, then every record of the commit log, length-prefixed."""
        book = json.dumps(self.addresses).encode()
        parts = [_SNAP_HEADER.pack(self.log.lowest_offset, len(book)), book]
        offset, end = self.log.lowest_offset, self.log.next_offset
        while offset < end:
            batch = self.log.read_batch(offset, 4096, 8 << 20)
            for record in batch:
                parts += [_U32.pack(len(record)), record]
            offset += len(batch)
        return b"".join(parts)

    def restore(self, snapshot: Snapshot) -> None:
        data = memoryview(snapshot.data)
        first, book_len = _SNAP_HEADER.unpack_from(data, 0)
        pos = _SNAP_HEADER.size
        self.addresses = json.loads(bytes(data[pos : pos + book_len]))
        pos += book_len
        records: list[bytes] = []
        while pos < len(data):
            (n,) = _U32.unpack_from(data, pos)
            records.append(bytes(data[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        self.log.reset(first)
        if records:
            self.log.append_batch(records)
        self.applied_index = snapshot.meta.index
        self._checkpointed = (-1, -1)
        self.checkpoint()

    def close(self) -> None:
        self.log.close()


class ReplicatedBackend:
    """dcl.server.backend.Backend over Raft: appends go through consensus, reads are local."""

    def __init__(self, driver: RaftDriver, fsm: LogFsm, rpc_addr: str) -> None:
        self.driver = driver
        self.fsm = fsm
        self.rpc_addr = rpc_addr
        self._applied = asyncio.Event()
        driver.on_applied = self._notify
        self._closed = False

    def _notify(self) -> None:
        self._applied.set()
        self._applied = asyncio.Event()

    def _not_leader(self) -> NotLeader:
        leader = self.driver.core.leader_id
        return NotLeader(leader, self.fsm.addresses.get(leader) if leader else None)

    def append(self, values: Sequence[bytes]) -> Awaitable[int]:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if self._closed:
            fut.set_exception(Unavailable("node is shutting down"))
            return fut
        if self.driver.core.role is not Role.LEADER:
            fut.set_exception(self._not_leader())
            return fut
        return asyncio.ensure_future(self._append(values))

    async def _append(self, values: Sequence[bytes]) -> int:
        try:
            result = await self.driver.propose(encode_records_cmd(values))
        except NotLeader:
            raise self._not_leader() from None
        return int(result)

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
        return self.driver.core.leader_id is not None

    def close(self) -> None:
        self._closed = True
        self._notify()
