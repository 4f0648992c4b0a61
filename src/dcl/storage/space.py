"""How much of the data directory's disk is free, against a reserve kept for the node itself.

A full disk is a storage failure: a write or fsync that fails with ENOSPC stops the node
(its page cache can no longer be trusted to match the disk), and a supervisor restarting it
finds the disk just as full. So a node stops taking new records while the free space is below
a reserve, well before the disk fills: a leader hands leadership to a voter with room or
refuses appends (InsufficientStorage), a follower drops the entries it is sent and says so
in its heartbeat answers (the leader stops sending them, and resends once it has room), and
all go on serving reads, elections and heartbeats (dcl.raft.driver: `disk_full`). The
reserve leaves room for what the node still writes meanwhile: entries already proposed, the
stable file, a snapshot received or built.

Nothing needs an operator to lift the stop: the space is looked at again on the next write
after `recheck_seconds`, so freeing space (retention, deleting files) resumes writes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["DEFAULT_RESERVE_BYTES", "DiskSpace"]

log = logging.getLogger(__name__)

#: The default reserve (`--min-free-bytes`).
DEFAULT_RESERVE_BYTES = 256 << 20

#: How long a measure of the free space is used. statvfs costs about 2 us, once per append on
#: a leader under one-at-a-time writes; within 10 ms the node writes at most about 1 MB more
#: at the rates it reaches here, far under any sensible reserve.
RECHECK_SECONDS = 0.01


class DiskSpace:
    """The free space of the filesystem holding `path`, measured at most every
    `recheck_seconds`, against `reserve_bytes` (0: never low)."""

    def __init__(
        self,
        path: Path | str,
        reserve_bytes: int,
        *,
        node: str = "",
        recheck_seconds: float = RECHECK_SECONDS,
        statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if reserve_bytes < 0:
            raise ValueError(f"reserve_bytes must be >= 0, not {reserve_bytes}")
        self.path = str(path)
        self.reserve_bytes = reserve_bytes
        self.node = node
        self._recheck = recheck_seconds
        self._statvfs = statvfs
        self._clock = clock
        self._checked_at = -float("inf")
        self._free = 0
        self._low = False

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use (statvfs f_bavail), recent to within
        `recheck_seconds`. A failed statvfs counts as no space: a node that cannot see its
        disk must not write to it."""
        now = self._clock()
        if now - self._checked_at >= self._recheck:
            self._checked_at = now
            try:
                st = self._statvfs(self.path)
                self._free = st.f_bavail * st.f_frsize
            except OSError as exc:
                log.error("cannot measure free disk space path=%s: %r", self.path, exc)
                self._free = 0
            self._note(self.reserve_bytes > 0 and self._free < self.reserve_bytes)
        return self._free

    @property
    def low(self) -> bool:
        """Free space is below the reserve: take no new records."""
        if self.reserve_bytes == 0:
            return False
        self.free_bytes()
        return self._low

    def room_for(self, nbytes: int) -> bool:
        """Whether writing `nbytes` more leaves the reserve free (always, with no reserve)."""
        return self.reserve_bytes == 0 or self.free_bytes() - nbytes >= self.reserve_bytes

    def _note(self, low: bool) -> None:
        if low == self._low:
            return
        self._low = low
        if low:
            log.warning("disk below its reserve: taking no new records until space is freed "
                        "node=%s path=%s free_bytes=%d reserve_bytes=%d",
                        self.node, self.path, self._free, self.reserve_bytes)
        else:
            log.info("disk above its reserve again: taking records node=%s free_bytes=%d "
                     "reserve_bytes=%d", self.node, self._free, self.reserve_bytes)
