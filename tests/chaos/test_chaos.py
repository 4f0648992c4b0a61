"""Short chaos schedules against real clusters: every fault kind, zero violations.

About two minutes: a 3-node run on a fixed seed that goes on until each kind was injected at
least once (see nemesis.FAULT_KINDS), then a short 5-node run. Longer randomized runs:
`make chaos DURATION=... SEED=...`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.chaos.nemesis import FAULT_KINDS
from tests.chaos.runner import ChaosConfig, run_chaos
from tests.chaos.summary import format_summary

pytestmark = pytest.mark.timeout(290)


@pytest.mark.parametrize(("seed", "nodes", "duration", "cover"), [
    (7, 3, 50.0, True),  # every kind at least once
    (11, 5, 25.0, False),  # a 5-node cluster: minorities of two, quorum of three
])
async def test_a_short_schedule_of_faults_loses_nothing(
    tmp_path: Path, seed: int, nodes: int, duration: float, cover: bool
) -> None:
    config = ChaosConfig(duration=duration, seed=seed, workdir=tmp_path, nodes=nodes,
                         cover=cover)
    result = await run_chaos(config)
    summary = format_summary(result)
    print(summary)
    print(json.dumps(result.to_json()))
    assert result.report.violations == [], summary
    assert result.unrecovered_nodes == [], summary
    assert result.crashes == [], summary
    assert result.node_errors == [], summary
    assert result.report.acked_values > 100, summary
    if cover:
        missing = set(FAULT_KINDS) - set(result.injected)
        assert not missing, f"fault kinds never injected: {sorted(missing)}\n{summary}"
        assert result.report.failovers, "no leader kill was measured"
