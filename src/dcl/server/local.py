"""LocalBackend: a standalone, non-replicated node directly over a commit log.

This is what a single node runs (no Raft). Durability contract: an append is acknowledged
only after ``sync()`` returned for it, and records become readable at the same moment, so a
consumer never observes a record that a crash could take back.

Group commit: appends are queued; one committer task takes everything queued, writes it with
one ``append_batch``, and covers it with one fsync. While that fsync runs (in the default
executor, off the event loop) new appends queue up and form the next group, so throughput is
not bounded by the disk's serial fsync rate.

Threading invariant: only the committer task mutates the log, and it never appends while its
fsync is in flight; readers run on the event loop and may overlap with that fsync.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Sequence
from typing import Protocol

from dcl.errors import OffsetOutOfRange, Unavailable
from dcl.server.backend import ServerInfo
from dcl.server.records import encode_record
from dcl.storage import Log, LogConfig

__all__ = ["CommitLog", "LocalBackend"]

log = logging.getLogger(__name__)


class CommitLog(Protocol):
    """The part of dcl.storage.Log that LocalBackend uses."""

    def append_batch(self, values: Sequence[bytes]) -> int: ...

    def read(self, offset: int) -> bytes: ...

    def read_batch(self, offset: int, max_records: int, max_bytes: int) -> list[bytes]: ...

    @property
    def lowest_offset(self) -> int: ...

    @property
    def next_offset(self) -> int: ...

    def flush(self) -> None: ...

    def sync(self) -> None: ...

    def close(self) -> None: ...


class LocalBackend:
    """A single node that is always its own leader. Implements dcl.server.backend.Backend.

    Construct inside a running event loop (the committer task starts at once); ``close()``
    it before the loop ends.
    """

    def __init__(self, commit_log: CommitLog, *, server_id: str = "local", rpc_addr: str = ""):
        self._log = commit_log
        self.server_id = server_id
        #: Reported by GetServers; set once the RPC server knows its bound address.
        self.rpc_addr = rpc_addr
        # Everything already in the log at open time survived recovery, so it is durable.
        self._committed_next = commit_log.next_offset
        self._pending: list[tuple[Sequence[bytes], asyncio.Future[int]]] = []
        self._wakeup = asyncio.Event()
        self._advanced: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closed = False
        self._failure: BaseException | None = None
        self._committer = asyncio.create_task(self._commit_loop(), name="dcl-local-committer")

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        config: LogConfig | None = None,
        *,
        server_id: str = "local",
        rpc_addr: str = "",
    ) -> LocalBackend:
        """A backend over the segmented log in directory (recovered if it exists).

        Must be called with an event loop running: the committer task starts immediately.
        """
        commit_log = Log(directory, config or LogConfig())
        return cls(commit_log, server_id=server_id, rpc_addr=rpc_addr)

    # -- writes ---------------------------------------------------------------------------

    def append(self, values: Sequence[bytes]) -> Awaitable[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if self._closed or self._failure is not None:
            future.set_exception(Unavailable("log is closed" if self._closed else "log failed"))
            return future
        self._pending.append((values, future))
        self._wakeup.set()
        return future

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closed:
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            group, self._pending = self._pending, []
            try:
                encoded: list[bytes] = []
                firsts: list[tuple[asyncio.Future[int], int]] = []
                offset = self._log.next_offset
                for values, future in group:
                    # A caller that gave up (cancelled) was never acknowledged: skip it.
                    if future.done():
                        continue
                    firsts.append((future, offset))
                    for value in values:
                        encoded.append(encode_record(value, offset))
                        offset += 1
                if encoded:
                    first = self._log.append_batch(encoded)
                    if first != firsts[0][1]:
                        raise RuntimeError(f"log assigned offset {first}, expected {firsts[0][1]}")
                    self._log.flush()
                    await loop.run_in_executor(None, self._log.sync)
            except Exception as exc:  # the log's state is unknown: stop writing, keep reading
                log.exception("commit failed; refusing further appends")
                self._failure = exc
                failure = Unavailable(f"commit failed: {exc}")
                for _, future in group + self._pending:
                    if not future.done():
                        future.set_exception(failure)
                self._pending = []
                return
            self._committed_next = offset
            for future, first_offset in firsts:
                if not future.done():
                    future.set_result(first_offset)
            self._notify()

    def _notify(self) -> None:
        advanced, self._advanced = self._advanced, asyncio.get_running_loop().create_future()
        advanced.set_result(None)

    # -- reads ----------------------------------------------------------------------------

    def _check_readable(self, offset: int) -> None:
        if offset < self._log.lowest_offset or offset >= self._committed_next:
            raise OffsetOutOfRange(offset, self._log.lowest_offset, self._committed_next)

    def read(self, offset: int) -> bytes:
        self._check_readable(offset)
        return self._log.read(offset)

    def read_batch(self, offset: int, max_records: int, max_bytes: int) -> list[bytes]:
        self._check_readable(offset)
        max_records = max(1, min(max_records, self._committed_next - offset))
        records = self._log.read_batch(offset, max_records, max_bytes)
        return records or [self._log.read(offset)]

    @property
    def lowest_offset(self) -> int:
        return self._log.lowest_offset

    @property
    def next_offset(self) -> int:
        return self._committed_next

    async def wait_for(self, offset: int) -> None:
        while offset >= self._committed_next:
            if self._closed:
                raise Unavailable("log is closed")
            # Shielded: the future is shared by every waiter; one cancelled stream must not
            # cancel it for the others.
            await asyncio.shield(self._advanced)

    # -- cluster view ---------------------------------------------------------------------

    def servers(self) -> list[ServerInfo]:
        return [ServerInfo(self.server_id, self.rpc_addr, True)]

    @property
    def has_leader(self) -> bool:
        return not self._closed and self._failure is None

    # -- lifecycle ------------------------------------------------------------------------

    async def close(self) -> None:
        """Commit what is queued, wake every waiter with Unavailable, close the log."""
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        await self._committer
        self._notify()
        self._log.close()
