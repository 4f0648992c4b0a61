"""Jepsen-style fault testing of real `dcl agent` clusters, with a history checker (issue 6).

    python -m tests.chaos --duration S --seed N [--nodes 3|5] [--cover] [--faults a,b]
    make chaos DURATION=S SEED=N [NODES=5]

A run starts 3 or 5 agents on 127.0.0.1 with mutual TLS (tests/integration/cluster_harness.py),
puts a fault-injecting TCP proxy on every directed node-to-node link (proxy.py; each agent
dials its peers' Raft service through them with --peer-dial-override), drives producers and
readers (workload.py) while the nemesis (nemesis.py, disk.py) injects one fault at a time on a
seeded schedule, then heals everything, waits for the nodes to converge, reads every node's log
and checks history and logs together (checker.py). It prints a summary table and a JSON line
last; the work directory keeps history.jsonl, final_logs.json and each node's log, and
`--check-only DIR` re-runs the checker on them.

Fault kinds: SIGKILL + restart of a follower or the leader; SIGSTOP/SIGCONT longer than the
election timeout; majority/minority partitions, an isolated leader, one-way loss (hold bytes or
reset connections); flaky links (delay, jitter, connections cut on a seeded coin); and, while a
node is down, disk damage (see disk.py for why fsynced Raft-log bytes are never touched).
`lying_disk` is a demonstration kind outside the default schedule: it loses fsynced Raft-log
bytes on every node, which no Raft can survive, and the checker reports lost acknowledged writes.
"""
