"""runs_within: how both write-path batchers (append coalescing, Raft sends) cut their input."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from dcl.batching import runs_within

KIB = 1024


def test_runs_keep_order_and_an_oversized_item_goes_alone() -> None:
    sizes = [300 * KIB, 0, 300 * KIB, 300 * KIB, 300 * KIB, 3 << 20, 10]
    runs = runs_within(list(enumerate(sizes)), lambda item: item[1], 1 << 20)
    assert [[i for i, _ in run] for run in runs] == [[0, 1, 2, 3], [4], [5], [6]]


@given(st.lists(st.integers(min_value=0, max_value=5000)), st.integers(1, 4000))
def test_every_run_fits_unless_it_is_one_item_and_nothing_is_lost(
    sizes: list[int], budget: int
) -> None:
    items = list(enumerate(sizes))
    runs = runs_within(items, lambda item: item[1], budget)
    assert [item for run in runs for item in run] == items
    for run in runs:
        assert run and (len(run) == 1 or sum(n for _, n in run) <= budget)
    for before, after in itertools.pairwise(runs):
        # Greedy: a run was closed only because the next item did not fit.
        assert sum(n for _, n in before) + after[0][1] > budget
