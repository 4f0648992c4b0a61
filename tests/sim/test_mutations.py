"""The simulator must catch real Raft bugs, not just pass on a correct core.

Each test plants one deliberate bug through the core's `Mutations` flags and runs seeds (with a
fault schedule chosen to make that bug likely) until an invariant breaks. A test fails if the
whole seed budget passes: then either the bug became unobservable or the checker went blind.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from dcl.raft.types import Mutations
from tests.sim.cluster import SimResult, run_seed
from tests.sim.profiles import options_for_seed


@dataclass(frozen=True)
class MutationCase:
    flag: str
    scenario: str
    budget: int
    fault_ticks: int
    # Words one of which the violation must contain: the right invariant caught it.
    expect: tuple[str, ...]


def first_violation(case: MutationCase) -> SimResult | None:
    mutations = Mutations(**{case.flag: True})
    for seed in range(case.budget):
        options = options_for_seed(
            seed, scenario=case.scenario, fault_ticks=case.fault_ticks, mutations=mutations
        )
        result = run_seed(seed, options)
        if not result.ok:
            return result
    return None


CASES = [
    # §5.4.1: voting for a candidate with a stale log lets it overwrite committed entries.
    MutationCase("skip_log_up_to_date_check", "default", 60, 400,
                 ("leader completeness", "state-machine safety", "lost acknowledged")),
    # §5.3: accepting entries after a mismatched (index, term) breaks log matching.
    MutationCase("skip_term_check_on_append", "default", 60, 400,
                 ("log matching", "state-machine safety", "leader completeness")),
    # §6.4: a deposed leader answering ReadIndex alone serves reads that miss acked writes.
    MutationCase("read_index_without_quorum", "stale_leader", 100, 400,
                 ("linearizable read",)),
    # A vote that is not durable can be cast again after a restart: two leaders in a term.
    MutationCase("skip_persist_vote", "lost_vote", 150, 600,
                 ("election safety", "log matching", "leader completeness")),
    # §5.4.2 / Figure 8: committing an old-term entry by counting replicas.
    MutationCase("commit_previous_term_by_counting", "figure8", 150, 1000,
                 ("leader completeness", "state-machine safety", "lost acknowledged")),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.flag)
def test_simulator_catches_planted_bug(case: MutationCase) -> None:
    result = first_violation(case)
    assert result is not None, (
        f"{case.flag}: no violation in {case.budget} seeds of scenario {case.scenario!r}"
    )
    joined = " ".join(result.violations)
    assert any(word in joined for word in case.expect), result.report()
    assert 0 < len(result.trace) <= 50
    assert f"--mutation {case.flag}" in result.replay
    print(f"{case.flag}: caught at seed {result.seed}: {result.violations[0][:160]}")


def test_correct_core_passes_the_mutation_scenarios() -> None:
    """The sharpened schedules must not raise false alarms on an unmutated core."""
    for scenario in ("stale_leader", "lost_vote", "figure8"):
        for seed in range(4):
            result = run_seed(seed, options_for_seed(seed, scenario=scenario, fault_ticks=600))
            assert result.ok, result.report()
