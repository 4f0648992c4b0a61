"""Cutting a sequence into runs bounded in bytes, shared by the write path's two batchers:
the leader coalescing appends into Raft entries and the Raft sender packing messages."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

__all__ = ["runs_within"]

_T = TypeVar("_T")


def runs_within(items: Iterable[_T], size_of: Callable[[_T], int], budget: int) -> list[list[_T]]:
    """`items`, in order, cut into runs of at most `budget` bytes by `size_of`; an item larger
    than the budget makes a run of its own (never dropped, never split)."""
    runs: list[list[_T]] = []
    run: list[_T] = []
    size = 0
    for item in items:
        n = size_of(item)
        if run and size + n > budget:
            runs.append(run)
            run, size = [], 0
        run.append(item)
        size += n
    if run:
        runs.append(run)
    return runs
