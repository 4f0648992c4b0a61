"""A bounded, human-readable record of what the simulated world did.

A failing seed is only useful if a person can see *how* the cluster got there, so every event
(message delivered, fault injected, role change, client action) is recorded with its virtual
time. Ticks happen far more often than anything else and carry no information on their own, so
consecutive ticks are folded into one line; otherwise they would push the interesting events
out of the window.
"""

from __future__ import annotations

import zlib
from collections import deque
from dataclasses import dataclass


@dataclass(slots=True)
class TraceEvent:
    """One line of the trace; `count` > 1 only for folded tick runs."""

    time: int
    kind: str
    text: str
    count: int = 1


class Trace:
    """Ring buffer of the most recent events; keeps memory flat over long seeds."""

    def __init__(self, capacity: int = 400, echo: bool = False) -> None:
        self._events: deque[TraceEvent] = deque(maxlen=capacity)
        self._echo = echo
        self.total = 0
        # CRC of every event ever added: two runs of a seed must agree on it (replay check).
        self.digest = 0

    def add(self, time: int, kind: str, text: str) -> None:
        """Record an event; `kind == "tick"` runs are merged so they cost one line."""
        self.total += 1
        self.digest = zlib.crc32(f"{time} {kind} {text}\n".encode(), self.digest)
        if kind == "tick" and self._events:
            last = self._events[-1]
            if last.kind == "tick":
                last.count += 1
                last.text = text
                return
        event = TraceEvent(time, kind, text)
        self._events.append(event)
        if self._echo and kind != "tick":
            print(_format(event))

    def tail(self, n: int = 50) -> list[str]:
        """The last `n` lines, oldest first, formatted for a failure report."""
        events = list(self._events)[-n:]
        return [_format(e) for e in events]


def _format(event: TraceEvent) -> str:
    if event.kind == "tick" and event.count > 1:
        return f"t={event.time:>6} {'tick':<8} x{event.count} (last: {event.text})"
    return f"t={event.time:>6} {event.kind:<8} {event.text}"
