"""The CI run of the deterministic simulator: many seeds, every fault kind, both cluster sizes.

Seeds are split into parametrized chunks so a failure names its chunk and the report names the
seed; `python -m tests.sim --seed S --verbose` replays it event by event.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.sim.cluster import run_seed
from tests.sim.profiles import options_for_seed

CHUNKS = 10
SEEDS_PER_CHUNK = 30
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_seeds_hold_raft_safety_and_liveness(chunk: int) -> None:
    failures = []
    for seed in range(chunk * SEEDS_PER_CHUNK, (chunk + 1) * SEEDS_PER_CHUNK):
        result = run_seed(seed, options_for_seed(seed))
        if not result.ok:
            failures.append(result.report())
    assert not failures, "\n\n".join(failures)


def test_a_seed_replays_exactly() -> None:
    """Same seed, same options: the same events in the same order (compared by digest)."""
    first = run_seed(11, options_for_seed(11, fault_ticks=300))
    second = run_seed(11, options_for_seed(11, fault_ticks=300))
    assert first.digest == second.digest
    assert first.trace == second.trace
    assert first.faults == second.faults


def test_replay_does_not_depend_on_the_string_hash_seed() -> None:
    """Python salts str hashes per process; set iteration order must not leak into a run."""
    digests = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run(
            [sys.executable, "-m", "tests.sim", "--seed", "5", "--fault-ticks", "300"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
        )
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        digests.add(summary["digest"])
    assert len(digests) == 1


def test_fault_schedule_covers_every_fault_kind() -> None:
    """A short run already injects each kind of fault; otherwise the CI run proves little."""
    faults: Counter[str] = Counter()
    for seed in range(12):
        result = run_seed(seed, options_for_seed(seed, fault_ticks=600))
        assert result.ok, result.report()
        faults.update(result.faults)
    expected = {
        "drop", "duplicate", "delay_spike", "drop_partition", "partition_isolate",
        "partition_split", "partition_one_way", "flaky_network", "pause", "crash_idle",
        "crash_before_persist", "crash_after_persist", "crash_after_send", "crash_after_apply",
        "restart", "member_add_learner", "member_promote_learner", "member_remove_node",
        "transfer_leadership", "compact", "snapshot_install",
        "retained_catchup",
    }
    missing = sorted(k for k in expected if faults[k] == 0)
    assert not missing, f"fault kinds never injected: {missing}"
