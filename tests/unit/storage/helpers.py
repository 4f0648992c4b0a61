"""Helpers shared by the storage tests: crash simulation on real files, no mocks."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from dcl.storage import Log


def crash(log: Log) -> None:
    """Abandon `log` like kill -9 would: unflushed buffers are lost, indexes stay oversized.

    The index map is closed without flush or truncate: its writes already sit in the page cache,
    exactly what a killed process leaves behind.
    """
    for segment in log._segments:
        os.close(segment.store._fd)
        segment.store._closed = True
        segment.index.mm.close()
        os.close(segment.index._fd)
        segment.index._closed = True
    os.close(log._dir_fd)  # the kernel drops the directory lock of a dead process
    log._closed = True


def flipped(path: str, position: int) -> None:
    """Flip every bit of one byte in place."""
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)
        f.seek(position)
        f.write(bytes([byte[0] ^ 0xFF]))


class ReleaseWatch:
    """Which threads close descriptors of deleted files under `root`, and which such
    descriptors are still open: the file's blocks are freed at that last close."""

    def __init__(self, root: Path, patch: pytest.MonkeyPatch) -> None:
        self.root = str(root)
        self.closed_by: list[str] = []
        #: (path relative to root, thread) of each deleted file closed through os.close.
        self.closed: list[tuple[str, str]] = []
        real_close = os.close

        def close(fd: int) -> None:
            target = self._deleted_target(fd)
            if target:
                self.closed_by.append(threading.current_thread().name)
                self.closed.append((target, threading.current_thread().name))
            real_close(fd)

        patch.setattr(os, "close", close)

    def _deleted_target(self, fd: int | str) -> str:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return ""
        if target.startswith(self.root) and target.endswith(" (deleted)"):
            return os.path.relpath(target.removesuffix(" (deleted)"), self.root)
        return ""

    def still_open(self) -> int:
        return sum(bool(self._deleted_target(fd)) for fd in os.listdir("/proc/self/fd"))

    def wait_all_closed(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.still_open() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.still_open() == 0, "deleted files are still held open"
