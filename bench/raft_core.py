"""Throughput and CPU cost of the Raft core alone (no I/O): a 3-node in-memory cluster, no faults.

Each round: the leader takes proposals, then every node's Ready is executed (entries "persisted"
by acknowledging them, messages delivered in memory) until the cluster is quiet, so one round is
a full propose -> replicate -> commit -> apply cycle. Reported per round and per entry, for single
proposals and for batches of 100 proposals per round. The last line is one JSON object.

CPU time is the whole process: all three nodes' core work plus this harness, i.e. what three
drivers would spend together (per node it is roughly a third). A round exchanges 2 appends, 2
acks, 2 commit announcements (no ack, see AppendEntries.want_response) and 6 Ready cycles.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dcl.raft.core import RaftNode
from dcl.raft.types import Config, Message, Role


class Bench:
    def __init__(self) -> None:
        ids = ["a", "b", "c"]
        cfg = Config(election_tick=10, max_entries_per_msg=4096, max_inflight_msgs=256)
        rng = random.Random(1)
        self.nodes = {i: RaftNode(i, cfg, rng, bootstrap_voters=ids) for i in ids}
        self.applied = 0
        a = self.nodes["a"]
        while a.role is not Role.LEADER:
            a.tick()
            self.run()
        self.run()
        self.leader = a

    def run(self) -> None:
        """Execute Readies and deliver messages until nothing is left."""
        nodes = self.nodes
        leader = nodes["a"]
        queue: list[Message] = []
        while True:
            for node in nodes.values():
                if node.has_ready():
                    rd = node.ready()
                    queue.extend(rd.messages)
                    if node is leader:
                        self.applied += len(rd.committed_entries)
                    node.advance(rd)
            if not queue:
                return
            batch, queue = queue, []
            for m in batch:
                nodes[m.dst].step(m)

    def rounds(self, n: int, per_round: int) -> tuple[float, float, int]:
        payload = b"x" * 100
        leader = self.leader
        start_applied = self.applied
        t0 = time.perf_counter()
        c0 = time.process_time()
        if per_round == 1:
            for _ in range(n):
                leader.propose(payload)
                self.run()
        else:
            batch = [payload] * per_round
            for _ in range(n):
                leader.propose_batch(batch)
                self.run()
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        return wall, cpu, self.applied - start_applied


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=20_000)
    ap.add_argument("--batch-rounds", type=int, default=2_000)
    args = ap.parse_args()

    b = Bench()
    b.rounds(500, 1)  # warm-up
    wall, cpu, applied = b.rounds(args.rounds, 1)
    single_eps = applied / wall
    single_us = cpu / args.rounds * 1e6
    print(
        f"single: {applied} entries in {wall:.2f}s = {single_eps:,.0f} entries/s, "
        f"{single_us:.1f} CPU us per propose->commit round"
    )

    b = Bench()
    b.rounds(50, 100)
    wall, cpu, applied = b.rounds(args.batch_rounds, 100)
    batch_eps = applied / wall
    us_entry = cpu / applied * 1e6
    print(
        f"batch100: {applied} entries in {wall:.2f}s = {batch_eps:,.0f} entries/s, "
        f"{us_entry:.2f} CPU us per entry"
    )
    print(
        json.dumps(
            {
                "single_eps": round(single_eps),
                "single_us_per_round": round(single_us, 2),
                "batch100_eps": round(batch_eps),
                "us_per_entry_batched": round(us_entry, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
