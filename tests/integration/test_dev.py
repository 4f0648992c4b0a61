"""`dcl dev`, the main job (`make run`): a real 3-node cluster in the foreground that the
printed example commands work against, and that stops whole, whichever way it is told to.

Every node is a child process of `dcl dev` in its own session (so Ctrl-C reaches only `dcl
dev`, which then stops each node gracefully): if `dcl dev` died without stopping them, they
would go on running with nothing left to stop them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cluster_harness import node_port

pytestmark = pytest.mark.timeout(120)

DEV_TIMEOUT = 60.0


def dev_base_port() -> int:
    """A port P with P..P+2 (RPC), P+100.. (metrics) and P+1000.. (gossip) all free."""
    while True:
        base = node_port()
        wanted = [base + d for d in (0, 1, 2, 100, 101, 102, 1000, 1001, 1002)]
        try:
            for port in wanted:
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(socket.AF_INET, kind) as sock:
                        sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def dcl(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCL_")}
    return subprocess.run([sys.executable, "-m", "dcl.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=DEV_TIMEOUT,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, list[int]]]:
    """`dcl dev` running in tmp_path, once all three nodes serve: (process, first RPC port,
    node PIDs). Stops whatever it started, by PID, however the test ends."""
    base = dev_base_port()
    log = open(tmp_path / "dev.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "dcl.cli.main", "dev", "--base-port",
                             str(base)], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    nodes: list[int] = []
    try:
        deadline = time.monotonic() + DEV_TIMEOUT
        while True:
            assert proc.poll() is None, (tmp_path / "dev.log").read_text()
            status = dcl(tmp_path, "status", "--addr", f"127.0.0.1:{base}", "-o", "json")
            if status.returncode == 0:
                rows = json.loads(status.stdout)
                if len(rows) == 3 and sum(r["role"] == "leader" for r in rows) == 1:
                    break
            assert time.monotonic() < deadline, status.stderr
            time.sleep(0.2)
        nodes = children(proc.pid)
        assert len(nodes) == 3
        yield proc, base, nodes
    finally:
        for pid in [proc.pid, *nodes]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=lambda sig: sig.name)
def test_the_dev_cluster_serves_the_printed_examples_and_stops_whole(
    dev: tuple[subprocess.Popen[bytes], int, list[int]], tmp_path: Path, how: signal.Signals
) -> None:
    """SIGINT is Ctrl-C, SIGTERM a supervisor, SIGHUP the terminal closing: each stops
    every node too (SIGHUP used to end `dcl dev` alone and leave the nodes running)."""
    proc, base, nodes = dev
    addr = ["--addr", f"127.0.0.1:{base}"]
    produced = dcl(tmp_path, "produce", "hello", "world", *addr)
    assert produced.returncode == 0, produced.stderr
    consumed = dcl(tmp_path, "consume", "--from", "0", "--count", "2", *addr)
    assert consumed.stdout.splitlines() == ["hello", "world"], consumed.stderr
    proc.send_signal(how)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in nodes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in nodes if alive(pid)] == []
