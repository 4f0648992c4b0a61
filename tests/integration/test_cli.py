"""The `dcl` client commands end to end: real `dcl` processes against three `dcl agent`s.

One cluster (certificates from `dcl certs init`, nodes from cluster_harness.Cluster) serves
the whole module, to keep it quick; each test reads the offsets its own produce reported,
so tests do not depend on each other's records. Every `dcl` run is a subprocess with a
timeout; the cluster's nodes are stopped by PID at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from dcl.membership import key_fingerprint, load_keyring
from dcl.server.certs import PkiFiles
from dcl.storage.space import DEFAULT_RESERVE_BYTES
from tests.integration.cluster_harness import Cluster, free_port

pytestmark = pytest.mark.timeout(120)

RUN_TIMEOUT = 60.0


def run_dcl(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DCL_")}
    return subprocess.run(
        [sys.executable, "-m", "dcl.cli.main", *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=cwd, env=clean | (env or {}),
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The failure's stderr, checked to be exactly one `error: ...` line and no traceback."""
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def cli_pki(tmp_path_factory: pytest.TempPathFactory) -> PkiFiles:
    directory = tmp_path_factory.mktemp("cli") / "pki"
    result = run_dcl("certs", "init", str(directory))
    assert result.returncode == 0, result.stderr
    return PkiFiles(directory)


@pytest.fixture(scope="module")
def cluster(cli_pki: PkiFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    nodes = Cluster(cli_pki, tmp_path_factory.mktemp("cli-cluster"))
    # Cluster calls use a fresh channel each, so it may be driven from a throwaway loop.
    asyncio.run(nodes.__aenter__())
    try:
        yield nodes
    finally:
        nodes.close()


class Dcl:
    """Runs `dcl` with this cluster's addresses and an identity's certificate."""

    def __init__(self, cluster: Cluster, pki: PkiFiles) -> None:
        self.cluster = cluster
        self.pki = pki

    def tls(self, identity: str = "root") -> list[str]:
        pki = self.pki
        cert, key = {
            "root": (pki.root_client_cert, pki.root_client_key),
            "nobody": (pki.nobody_client_cert, pki.nobody_client_key),
        }[identity]
        return ["--ca-file", str(pki.ca_cert), "--cert-file", str(cert), "--key-file", str(key)]

    def __call__(self, *args: str, identity: str = "root", addr: str | None = None,
                 stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        addrs = [addr] if addr else [n.rpc_addr for n in self.cluster.nodes]
        options = [a for address in addrs for a in ("--addr", address)] + self.tls(identity)
        return run_dcl(*args, *options, stdin=stdin)


@pytest.fixture(scope="module")
def dcl(cluster: Cluster, cli_pki: PkiFiles) -> Dcl:
    return Dcl(cluster, cli_pki)


def produced_range(result: subprocess.CompletedProcess[str]) -> tuple[int, int]:
    assert result.returncode == 0, result.stderr
    match = re.fullmatch(r"produced (\d+) records at offsets (\d+)-(\d+)", result.stdout.strip())
    assert match, result.stdout
    count, first, last = (int(g) for g in match.groups())
    assert last - first + 1 == count
    return first, last


def test_produce_file_of_10000_lines_then_consume_returns_them_in_order(
    dcl: Dcl, tmp_path: Path
) -> None:
    lines = [f"record-{i:05d} {'x' * (i % 50)}" for i in range(10_000)]
    path = tmp_path / "records.txt"
    path.write_text("\n".join(lines) + "\n")

    first, last = produced_range(dcl("produce", "--file", str(path)))
    assert last - first + 1 == 10_000

    # Read through a follower only: the command still returns everything committed.
    leader = asyncio.run(dcl.cluster.leader_among(dcl.cluster.nodes, timeout=30))
    follower = dcl.cluster.others(leader)[0]
    consumed = dcl("consume", "--from", str(first), "--count", "10000", addr=follower.rpc_addr)
    assert consumed.returncode == 0, consumed.stderr
    assert consumed.stdout.splitlines() == lines

    as_json = dcl("consume", "--from", str(last - 1), "--output", "json")
    assert as_json.returncode == 0, as_json.stderr
    assert [json.loads(line) for line in as_json.stdout.splitlines()][:2] == [
        {"offset": last - 1, "value": lines[-2]}, {"offset": last, "value": lines[-1]}]


def test_produce_prints_offsets_for_values_and_reads_lines_from_stdin(dcl: Dcl) -> None:
    given = dcl("produce", "alpha", "beta")
    assert given.returncode == 0, given.stderr
    offsets = [int(o) for o in given.stdout.split()]
    assert len(offsets) == 2 and offsets[1] == offsets[0] + 1

    first, last = produced_range(dcl("produce", stdin=b"one\ntwo\nthree"))
    assert last == first + 2
    back = dcl("consume", "--from", str(offsets[0]), "--count", "2")
    assert back.stdout.splitlines() == ["alpha", "beta"]
    back = dcl("consume", "--from", str(first), "--count", "3")
    assert back.stdout.splitlines() == ["one", "two", "three"]


def test_status_shows_every_node_and_exactly_one_leader(dcl: Dcl) -> None:
    names = sorted(n.name for n in dcl.cluster.nodes)
    deadline = time.monotonic() + 30
    while True:
        result = dcl("status", "--output", "json")
        assert result.returncode == 0, result.stderr
        rows = json.loads(result.stdout)
        assert sorted(r["node"] for r in rows) == names
        leaders = [r for r in rows if r["role"] == "leader"]
        if len(leaders) == 1 and all(r["role"] == "follower" for r in rows if r not in leaders):
            break
        assert time.monotonic() < deadline, f"no single leader in {rows}"
        time.sleep(0.2)
    assert all(r["lag"] is not None and r["term"] == leaders[0]["term"] for r in rows)
    # Each node's own commit-log range and size (no retention here: every log starts at 0).
    by_name = {n.name: n for n in dcl.cluster.nodes}
    for r in rows:
        assert r["first_offset"] == 0 and r["next_offset"] >= 0, r
        assert (r["log_bytes"] > 0) == (r["next_offset"] > 0), r
        # Its disk's free space (statvfs of its data dir) against the default reserve.
        st = os.statvfs(by_name[r["node"]].data_dir)
        assert abs(r["disk_free_bytes"] - st.f_bavail * st.f_frsize) < 1 << 30, r
        assert r["disk_reserve_bytes"] == DEFAULT_RESERVE_BYTES, r

    table = dcl("status")
    assert table.returncode == 0, table.stderr
    body = [line.split() for line in table.stdout.splitlines() if line.strip()]
    assert body[0] == ["node", "address", "role", "term", "last", "applied", "lag", "offsets",
                       "log", "disk", "gossip"]
    node_rows = [row for row in body if row[0] in names]
    assert len(node_rows) == 3
    assert [row[2] for row in node_rows].count("leader") == 1
    assert all(re.fullmatch(r"\d+(\.\d)?[KMGT]", row[9]) for row in node_rows), node_rows


def test_commands_default_to_the_dcl_dev_certificates_and_read_env(
    cluster: Cluster, cli_pki: PkiFiles, tmp_path: Path
) -> None:
    (tmp_path / ".dcl-dev").mkdir()
    (tmp_path / ".dcl-dev" / "pki").symlink_to(cli_pki.directory)
    result = run_dcl("status", cwd=tmp_path, env={"DCL_ADDR": cluster.nodes[1].rpc_addr})
    assert result.returncode == 0, result.stderr
    assert "leader" in result.stdout

    missing = run_dcl("status", cwd=tmp_path.parent, env={"DCL_ADDR": cluster.nodes[1].rpc_addr})
    assert "no such file: .dcl-dev/pki/ca.pem" in one_line_error(missing)


def test_nobody_certificate_is_refused_with_one_line(dcl: Dcl) -> None:
    for args in (["produce", "hello"], ["consume"], ["status"]):
        line = one_line_error(dcl(*args, identity="nobody"))
        assert "permission denied" in line and "nobody" in line, line


def test_certificate_from_another_ca_is_refused_with_one_line(
    dcl: Dcl, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    assert run_dcl("certs", "init", str(other)).returncode == 0
    foreign = PkiFiles(other)
    line = one_line_error(run_dcl(
        "consume", "--addr", dcl.cluster.nodes[0].rpc_addr, "--ca-file", str(dcl.pki.ca_cert),
        "--cert-file", str(foreign.root_client_cert),
        "--key-file", str(foreign.root_client_key)))
    assert "does not accept this client certificate" in line, line
    line = one_line_error(run_dcl(
        "consume", "--addr", dcl.cluster.nodes[0].rpc_addr, "--ca-file", str(foreign.ca_cert),
        "--cert-file", str(dcl.pki.root_client_cert),
        "--key-file", str(dcl.pki.root_client_key)))
    assert "--ca-file does not trust" in line, line


def test_user_errors_are_one_line(dcl: Dcl, tmp_path: Path) -> None:
    line = one_line_error(dcl("consume", "--from", str(10**12)))
    assert "offset out of range" in line, line

    line = one_line_error(dcl("status", addr=f"127.0.0.1:{free_port()}"))
    assert "cannot reach the cluster" in line and "connection refused" in line, line

    line = one_line_error(dcl("produce", "--file", str(tmp_path / "missing.txt")))
    assert "No such file" in line, line

    line = one_line_error(run_dcl(
        "status", "--ca-file", str(tmp_path / "nope.pem"),
        "--cert-file", str(dcl.pki.root_client_cert), "--key-file", str(dcl.pki.root_client_key)))
    assert "no such file" in line and "--ca-file" in line, line


def test_bench_prints_throughput_and_latency_percentiles(dcl: Dcl) -> None:
    result = dcl("bench", "--records", "600", "--batch", "50", "--size", "32",
                 "--concurrency", "2", "--json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line.split() for line in lines if line.strip().startswith("phase"))
    assert header == ["phase", "records", "seconds", "records/s", "MiB/s", "p50", "ms",
                      "p90", "ms", "p99", "ms", "max", "ms"]
    phases = {line.split()[0]: line.split() for line in lines
              if line.strip().startswith(("produce ", "consume "))}
    assert set(phases) == {"produce", "consume"}
    assert phases["produce"][1] == phases["consume"][1] == "600"
    summary = json.loads(lines[-1])
    for phase in summary["results"]:
        assert phase["records"] == 600 and phase["records_per_second"] > 0
        assert 0 < phase["p50_ms"] <= phase["p90_ms"] <= phase["p99_ms"] <= phase["max_ms"]


def test_status_config_shows_what_each_nodes_reloads_left_in_use(dcl: Dcl) -> None:
    """`dcl status --config`: the check between the steps of a rotation (no reload yet
    here: see test_reload.py for the counts going up)."""
    pki = dcl.pki
    expires = min(x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc
                  for path in (pki.server_cert, pki.peer_cert))
    key = key_fingerprint(load_keyring(pki.gossip_key)[0])
    result = dcl("status", "--config", "--output", "json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 3
    for row in rows:
        assert (row["reloads_ok"], row["reloads_failed"]) == (0, 0), row
        assert row["certificates_expire"] == int(expires.timestamp()), row
        assert row["gossip_key"] == key, row

    table = dcl("status", "--config")
    assert table.returncode == 0, table.stderr
    body = [line.split() for line in table.stdout.splitlines() if line.strip()]
    assert body[0] == ["node", "address", "reloads", "failed", "certificates", "expire",
                       "gossip", "key"]
    node_rows = [row for row in body if row[0] in {n.name for n in dcl.cluster.nodes}]
    assert len(node_rows) == 3
    for row in node_rows:
        assert row[2:4] == ["0", "0"] and row[4] == expires.strftime("%Y-%m-%d"), row
        assert row[-1] == key, row
