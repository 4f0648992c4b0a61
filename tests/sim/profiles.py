"""Named fault schedules ("scenarios"): a fault profile plus the run shape it needs.

`default` is the broad mix the CI run uses. The others sharpen one kind of fault so that a
specific class of bug shows within a small seed budget; the mutation tests use them, and they
are available from the command line (`--scenario`) for hunting.
"""

from __future__ import annotations

from typing import Any

from .cluster import FaultProfile, SimOptions

SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    # Voters crash right after granting a vote and come back quickly, while vote requests are
    # often delayed: a vote that was not durable gets cast twice in one term.
    "lost_vote": {
        "profile": FaultProfile(
            crash=0.03,
            crash_in_ready=0.0,
            crash_after_vote=1.0,
            down_ticks=(1, 3),
            leader_bias=1.0,
            base_spike=0.3,
        ),
    },
    # Leaders are cut off or die right after election and right after commits while clients
    # keep proposing, and entries travel one per message: the Figure 8 interleaving (an
    # old-term entry "committed" by counting replicas, then overwritten by a newer-term leader).
    "figure8": {
        "nodes": 5,
        "max_entries_per_msg": 1,
        "profile": FaultProfile(
            propose=0.8,
            partition=0.06,
            partition_ticks=(5, 40),
            leader_bias=1.0,
            crash=0.02,
            crash_after_commit=0.3,
            crash_new_leader=0.3,
            down_ticks=(10, 60),
            base_drop=0.1,
        ),
    },
    # Everything at once, several times more often than `default`: for bug hunting.
    "chaos": {
        "profile": FaultProfile(
            crash=0.03,
            pause=0.02,
            partition=0.03,
            flaky=0.02,
            membership=0.06,
            transfer=0.03,
            compact=0.06,
            crash_after_vote=0.05,
            crash_after_commit=0.05,
            crash_new_leader=0.05,
        ),
    },
    # Plain Raft elections (no pre-vote, no check-quorum leases): terms churn, deposed leaders
    # linger; the core must stay safe without its liveness refinements.
    "bare": {"pre_vote": False, "check_quorum": False},
    # Leaders are paused or cut off while clients keep reading through them: a deposed leader
    # that answers ReadIndex without a quorum round serves stale data.
    "stale_leader": {
        "profile": FaultProfile(read=0.3, pause=0.03, partition=0.03, leader_bias=0.9),
    },
}


def options_for_seed(
    seed: int, nodes: int | None = None, scenario: str = "default", **overrides: Any
) -> SimOptions:
    """The standard shape for a seed: 3-node clusters on even seeds and 5-node clusters on odd
    ones (unless the scenario or caller fixes the size), so every seed range covers both."""
    settings: dict[str, Any] = {"nodes": 3 if seed % 2 == 0 else 5, "scenario": scenario}
    settings.update(SCENARIOS[scenario])
    if nodes is not None:
        settings["nodes"] = nodes
    settings.update(overrides)
    return SimOptions(**settings)
