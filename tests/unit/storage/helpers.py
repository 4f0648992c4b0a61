"""Helpers shared by the storage tests: crash simulation on real files, no mocks."""

from __future__ import annotations

import os

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
