"""Crash-safe segmented storage: store (framed records), index (mmap), segment, log.

Imports the standard library only (plus dcl.errors), so Raft and tests can use it anywhere.
"""

from dcl.storage.log import Log, LogClosed, LogConfig, LogInUse, LogReader, iter_records
from dcl.storage.segment import Segment
from dcl.storage.store import Store, encode_record

__all__ = [
    "Log",
    "LogClosed",
    "LogConfig",
    "LogInUse",
    "LogReader",
    "Segment",
    "Store",
    "encode_record",
    "iter_records",
]
