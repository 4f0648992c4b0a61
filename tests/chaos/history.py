"""The history of a chaos run: every client operation and every fault, one JSON object a line.

Times are seconds on the harness's monotonic clock since the run started; one process records
everything, so invoke/complete times of clients and nemesis events are comparable.

Operation records (``"type": "op"``):
  * ``"f": "produce"``: ``values`` (unique strings), ``batch`` (ProduceBatch or Produce),
    ``outcome`` ok | failed | unknown, ``offset`` (the first acknowledged offset when ok).
    failed means the client knows nothing was appended (a definite rejection); unknown means
    the request may have reached a leader's log (timeout, broken connection, UNAVAILABLE...).
  * ``"f": "read"``: ``mode`` consume | stream, ``node``, ``records`` as [offset, value] pairs
    (what the node served), ``outcome``.
Nemesis records (``"type": "nemesis"``): ``fault`` (a kind), ``phase`` start | stop, ``time``,
``nodes`` and any detail.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any

__all__ = ["FAILED", "OK", "UNKNOWN", "History", "load_history"]

OK = "ok"
FAILED = "failed"
UNKNOWN = "unknown"


class History:
    """Appends records to a JSON-lines file and keeps them in memory for the checker."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.t0 = time.monotonic()
        self.records: list[dict[str, Any]] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = open(path, "w")  # noqa: SIM115 - closed in close()

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 6)

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def nemesis(self, fault: str, phase: str, at: float | None = None, **detail: Any) -> float:
        t = self.now() if at is None else at
        self.add({"type": "nemesis", "fault": fault, "phase": phase, "time": t, **detail})
        return t

    def close(self) -> None:
        self._file.close()


def load_history(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
