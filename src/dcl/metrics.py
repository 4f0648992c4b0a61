"""Prometheus metrics: counters, histograms, scrape-time gauges, and the text exposition.

Sans-I/O: this module keeps numbers and renders them; dcl.server.metrics_http serves the text.
Hot-path cost is kept to a dict update per event (a histogram adds one bisect): a call pays
about half a microsecond for its count and latency (bench/metrics.py). Values that already
live elsewhere (Raft indexes, log offsets, memory) are not mirrored on every write but read
when a scrape asks, by collectors registered with the Registry.

Format: Prometheus text exposition 0.0.4, which Prometheus, VictoriaMetrics and the
OpenMetrics parsers all read.
"""

from __future__ import annotations

import bisect
import math
import os
import re
import resource
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "CONTENT_TYPE",
    "LATENCY_BUCKETS",
    "Counter",
    "Family",
    "Histogram",
    "HistogramChild",
    "Registry",
    "gauge",
    "process_families",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Seconds, from a fast fsync (about 0.1 ms here) to a call that waited out a timeout.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

#: Label values of one sample, in the order of the metric's label names.
Labels = tuple[str, ...]
Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True, slots=True)
class Family:
    """One metric as a scrape shows it: its samples are (name suffix, labels, value)."""

    name: str
    kind: Kind
    help: str
    label_names: tuple[str, ...]
    samples: Sequence[tuple[str, Labels, float]]


def _check_names(name: str, label_names: Sequence[str]) -> None:
    if not _NAME.match(name):
        raise ValueError(f"invalid metric name {name!r}")
    for label in label_names:
        if not _LABEL.match(label) or label.startswith("__") or label == "le":
            raise ValueError(f"invalid label name {label!r} for {name}")


def gauge(name: str, help_text: str, value: float, **labels: str) -> Family:
    """A one-sample gauge family, for collectors."""
    return Family(name, "gauge", help_text, tuple(labels), [("", tuple(labels.values()), value)])


class Counter:
    """A monotonically increasing count, per combination of label values. Its name ends in
    ``_total``, as the 0.0.4 text format writes counters."""

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()):
        _check_names(name, label_names)
        if not name.endswith("_total"):
            raise ValueError(f"counter name {name!r} must end in _total")
        self.name = name
        self.help = help_text
        self.label_names = tuple(label_names)
        self._values: dict[Labels, float] = {}

    def inc(self, labels: Labels = (), amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, labels: Labels = ()) -> float:
        return self._values.get(labels, 0.0)

    def collect(self) -> Family:
        return Family(self.name, "counter", self.help, self.label_names,
                      [("", labels, v) for labels, v in sorted(self._values.items())])


class HistogramChild:
    """One label combination's buckets; `observe` is what hot paths call."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; last: +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self._bounds, value)] += 1
        self.sum += value


class Histogram:
    """Observations counted into fixed buckets (Prometheus' cumulative `le` buckets)."""

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = (),
                 buckets: Sequence[float] = LATENCY_BUCKETS):
        _check_names(name, label_names)
        bounds = tuple(float(b) for b in buckets)
        if not bounds or list(bounds) != sorted(set(bounds)) or math.isinf(bounds[-1]):
            raise ValueError(f"buckets of {name} must be finite, distinct and increasing")
        self.name = name
        self.help = help_text
        self.label_names = tuple(label_names)
        self._bounds = bounds
        self._children: dict[Labels, HistogramChild] = {}

    def labels(self, *values: str) -> HistogramChild:
        """The child for these label values; keep it to observe without a lookup."""
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = HistogramChild(self._bounds)
        return child

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    def collect(self) -> Family:
        samples: list[tuple[str, Labels, float]] = []
        # As the client libraries write them ("1.0", not "1"): queries match on the string.
        les = [repr(b) for b in self._bounds] + ["+Inf"]
        for labels, child in sorted(self._children.items()):
            if not any(child.counts):
                continue  # a method never called shows no series, as with prometheus_client
            running = 0
            for le, n in zip(les, child.counts, strict=True):
                running += n
                samples.append(("_bucket", (*labels, le), running))
            samples.append(("_sum", labels, child.sum))
            samples.append(("_count", labels, running))
        return Family(self.name, "histogram", self.help, (*self.label_names, "le"), samples)


Collector = Callable[[], Iterable[Family]]


class Registry:
    """What one scrape shows: metric objects and scrape-time collectors, in order."""

    def __init__(self) -> None:
        self._sources: list[Counter | Histogram | Collector] = []

    def register(self, source: Counter | Histogram | Collector) -> None:
        self._sources.append(source)

    def families(self) -> Iterator[Family]:
        seen: set[str] = set()
        for source in self._sources:
            found = ([source.collect()] if isinstance(source, Counter | Histogram)
                     else source())
            for family in found:
                if family.name in seen:
                    raise ValueError(f"metric {family.name} is registered twice")
                seen.add(family.name)
                yield family

    def render(self) -> bytes:
        """The text exposition of every family."""
        lines: list[str] = []
        for family in self.families():
            lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            for suffix, values, value in family.samples:
                # A histogram's _sum and _count carry its labels without `le`.
                names = family.label_names[:len(values)]
                lines.append(f"{family.name}{suffix}{_labels(names, values)} {_number(value)}")
        lines.append("")
        return "\n".join(lines).encode()


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(names: Sequence[str], values: Labels) -> str:
    if not names:
        return ""
    escaped = (v.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")
               for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped, strict=True)) + "}"


def process_families() -> list[Family]:
    """The standard `process_*` metrics of this process, from /proc (Linux)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return []
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/stat", "rb") as f:
        boot = next(float(line.split()[1]) for line in f if line.startswith(b"btime"))
    # Fields after the command name, 0-based from "state": utime 11, stime 12, starttime 19,
    # vsize 20, rss 21 (pages).
    cpu = (int(stat[11]) + int(stat[12])) / ticks
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return [
        Family("process_cpu_seconds_total", "counter", "User and system CPU time spent.", (),
               [("", (), cpu)]),
        gauge("process_resident_memory_bytes", "Resident memory size.", int(stat[21]) * page),
        gauge("process_virtual_memory_bytes", "Virtual memory size.", int(stat[20])),
        gauge("process_start_time_seconds", "Start time since the epoch.",
              boot + int(stat[19]) / ticks),
        gauge("process_open_fds", "Open file descriptors.", len(os.listdir("/proc/self/fd"))),
        gauge("process_max_fds", "Limit on open file descriptors.", soft),
    ]
