"""SyncClient: a blocking facade over DclClient for scripts.

One event loop runs in a daemon thread for the client's lifetime, so channels (and their
connections) are reused across calls; each method submits a coroutine to that loop and
waits for it. Do not call it from a coroutine: it blocks the calling thread, which would
stall that event loop (use DclClient there).
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Coroutine, Generator, Sequence
from types import TracebackType
from typing import Any, TypeVar

from dcl.client.client import ClusterStatus, DclClient, ServerInfo, StrPath

__all__ = ["SyncClient"]

_T = TypeVar("_T")


class SyncClient:
    """Blocking DclClient; the constructor connects. Same arguments as DclClient."""

    def __init__(
        self,
        seeds: Sequence[str],
        tls: ssl.SSLContext | tuple[StrPath, StrPath, StrPath],
        **options: Any,
    ):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="dcl-sync-client", daemon=True
        )
        self._thread.start()
        self._closed = False
        try:
            self._client = DclClient(seeds, tls, **options)
            self._run(self._client.connect())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._closed:
            coro.close()
            raise RuntimeError("client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def produce(self, value: bytes) -> int:
        return self._run(self._client.produce(value))

    def produce_batch(self, values: Sequence[bytes]) -> int:
        return self._run(self._client.produce_batch(values))

    def consume(self, offset: int) -> bytes:
        return self._run(self._client.consume(offset))

    def consume_batch(
        self, offset: int, max_records: int = 0, max_bytes: int = 0
    ) -> tuple[list[tuple[int, bytes]], int]:
        return self._run(self._client.consume_batch(offset, max_records, max_bytes))

    def get_servers(self) -> list[ServerInfo]:
        return self._run(self._client.get_servers())

    def start_offset(self) -> int:
        return self._run(self._client.start_offset())

    def end_offset(self, offset: int = 0) -> int:
        return self._run(self._client.end_offset(offset))

    def cluster_status(self, address: str) -> ClusterStatus:
        return self._run(self._client.cluster_status(address))

    def stream(self, offset: int) -> Generator[tuple[int, bytes], None, None]:
        """Blocking tail-following iterator; close it (or leave the loop) to end the stream."""
        records = self._client.stream(offset)
        try:
            while True:
                try:
                    yield self._run(records.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if not self._closed:
                self._run(records.aclose())

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._run(self._client.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
