"""`dcl agent` options that reach the agent: `--peer-dial-override ID=HOST:PORT` (flags, env,
YAML) reaches the Raft transport; `--commit-announce-ms`, sizes and connection limits are
checked and kept; the open-file limit is raised."""

from __future__ import annotations

import resource
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from dcl.cli.agent import build_config
from dcl.server.certs import PkiFiles, generate_pki
from dcl.server.raft_transport import GrpcTransport


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiFiles:
    return generate_pki(tmp_path_factory.mktemp("pki"))


def files(pki: PkiFiles) -> dict[str, object]:
    return {
        "acl_model_file": pki.acl_model, "acl_policy_file": pki.acl_policy,
        "server_tls_cert_file": pki.server_cert, "server_tls_key_file": pki.server_key,
        "server_tls_ca_file": pki.ca_cert, "peer_tls_cert_file": pki.peer_cert,
        "peer_tls_key_file": pki.peer_key, "peer_tls_ca_file": pki.ca_cert,
        "insecure_gossip": True,
    }


def test_repeated_flags_become_a_peer_to_address_map(pki: PkiFiles) -> None:
    config = build_config({**files(pki), "peer_dial_overrides": [
        "node-1=127.0.0.1:9001", "node-2=127.0.0.1:9002"]}, None)
    assert config.peer_dial_overrides == {"node-1": "127.0.0.1:9001",
                                          "node-2": "127.0.0.1:9002"}


def test_the_config_file_may_give_a_mapping(pki: PkiFiles, tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("peer_dial_overrides:\n  node-1: 127.0.0.1:9001\n")
    assert build_config(files(pki), path).peer_dial_overrides == {"node-1": "127.0.0.1:9001"}
    assert build_config(files(pki), None).peer_dial_overrides == {}


@pytest.mark.parametrize("item", ["node-1:9001", "node-1=127.0.0.1", "node-1=host:port",
                                  "=127.0.0.1:9001"])
def test_a_malformed_override_is_refused(pki: PkiFiles, item: str) -> None:
    with pytest.raises(typer.Exit):
        build_config({**files(pki), "peer_dial_overrides": [item]}, None)


def test_the_transport_dials_the_override_and_else_the_advertised_address() -> None:
    book = {"node-1": "127.0.0.1:8401", "node-2": "127.0.0.1:8402"}
    transport = GrpcTransport(ssl.create_default_context(), "127.0.0.1:8400", book.get,
                              dial_overrides={"node-1": "127.0.0.1:9001"})
    assert transport.dial_address("node-1") == "127.0.0.1:9001"
    assert transport.dial_address("node-2") == "127.0.0.1:8402"
    assert transport.dial_address("node-3") is None


def test_commit_announcements_are_held_only_when_asked(pki: PkiFiles) -> None:
    assert build_config(files(pki), None).commit_announce_seconds == 0.0
    config = build_config({**files(pki), "commit_announce_ms": 2.5}, None)
    assert config.commit_announce_seconds == pytest.approx(0.0025)


@pytest.mark.parametrize("value", [-1, "soon", 5000])
def test_a_bad_commit_announce_delay_is_refused_in_one_line(
    pki: PkiFiles, value: object, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(typer.Exit):
        build_config({**files(pki), "commit_announce_ms": value}, None)
    assert "--commit-announce-ms must be" in capsys.readouterr().err


def test_the_raft_log_memory_limit_is_passed_on_when_given(pki: PkiFiles) -> None:
    """0 (the default) leaves the driver its own limit, twice the snapshot cap."""
    assert build_config(files(pki), None).raft_log_memory_bytes == 0
    config = build_config({**files(pki), "raft_log_memory_bytes": "3145728"}, None)
    assert config.raft_log_memory_bytes == 3 << 20


def test_retention_is_off_unless_given_and_passed_on_in_bytes_and_seconds(
    pki: PkiFiles, tmp_path: Path
) -> None:
    config = build_config(files(pki), None)
    assert (config.retention_bytes, config.retention_seconds) == (0, 0.0)
    yml = tmp_path / "node.yaml"
    yml.write_text("retention-bytes: 1073741824\nretention-ms: 604800000\n")
    config = build_config(files(pki), yml)
    assert (config.retention_bytes, config.retention_seconds) == (1 << 30, 7 * 24 * 3600.0)
    config = build_config({**files(pki), "retention_ms": "1500"}, yml)  # a flag wins
    assert config.retention_seconds == 1.5


@pytest.mark.parametrize("key", ["raft_log_memory_bytes", "snapshot_log_bytes",
                                 "raft_retain_bytes", "segment_bytes", "snapshot_threshold",
                                 "retention_bytes", "retention_ms", "metrics_port",
                                 "max_connections", "max_connections_per_host",
                                 "tls_handshake_timeout_ms"])
@pytest.mark.parametrize("value", [-1, "lots", 1.5])
def test_a_bad_size_is_refused_in_one_line(
    pki: PkiFiles, key: str, value: object, capsys: pytest.CaptureFixture[str]
) -> None:
    """From a flag, the environment or a config file: a negative number, a word or a
    fraction stops the agent with one line naming the option, not a traceback."""
    with pytest.raises(typer.Exit):
        build_config({**files(pki), key: value}, None)
    err = capsys.readouterr().err
    least = 1 if key in ("segment_bytes", "tls_handshake_timeout_ms") else 0
    assert f"--{key.replace('_', '-')} must be a whole number, {least} or more" in err


def test_a_zero_segment_size_is_refused_in_one_line(
    pki: PkiFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    """0 means "off" for the other sizes, but a segment must hold bytes: it used to pass
    here and stop the agent with a traceback from the storage layer."""
    with pytest.raises(typer.Exit):
        build_config({**files(pki), "segment_bytes": 0}, None)
    assert "--segment-bytes must be a whole number, 1 or more, not 0" in capsys.readouterr().err


def test_the_metrics_endpoint_is_off_unless_a_port_is_given(
    pki: PkiFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert build_config(files(pki), None).metrics_port is None
    assert build_config({**files(pki), "metrics_port": 0}, None).metrics_port is None
    yml = tmp_path / "node.yaml"
    yml.write_text("metrics-port: 9100\n")
    assert build_config(files(pki), yml).metrics_port == 9100
    assert build_config({**files(pki), "metrics_port": "9200"}, yml).metrics_port == 9200
    with pytest.raises(typer.Exit):
        build_config({**files(pki), "metrics_port": 70000}, None)
    assert "--metrics-port must be a TCP port (1-65535), or 0 for none, not 70000" in (
        capsys.readouterr().err)


def test_an_ipv6_bind_address_binds_without_brackets_and_advertises_with_them(
    pki: PkiFiles,
) -> None:
    """`--bind-addr [::1]:8401` used to keep the brackets in the RPC host, so the RPC
    server could not bind; the advertised address must keep them, or no client parses it."""
    config = build_config({**files(pki), "bind_addr": "[::1]:8401", "rpc_port": 8400,
                           "join_rpc_addrs": "[::1]:9400,127.0.0.1:9401"}, None)
    assert (config.rpc_host, config.rpc_addr) == ("::1", "[::1]:8400")
    assert config.join_rpc_addrs == ["[::1]:9400", "127.0.0.1:9401"]
    # Without brackets, as earlier versions took it: the same node, advertised bracketed.
    legacy = build_config({**files(pki), "bind_addr": "::1:8401", "rpc_port": 8400}, None)
    assert (legacy.rpc_host, legacy.rpc_addr) == ("::1", "[::1]:8400")


@pytest.mark.parametrize(("key", "value"), [
    ("bind_addr", "fe80::zz:8401"), ("bind_addr", ":8401"), ("bind_addr", "node-1"),
    ("join_rpc_addrs", "127.0.0.1"), ("start_join_addrs", ["127.0.0.1:8401", "[::1:8401"]),
])
def test_a_malformed_address_is_refused_in_one_line(
    pki: PkiFiles, key: str, value: object, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before anything starts (a bad join address used to fail later, in a
    background task), naming the option and how an IPv6 host is written."""
    with pytest.raises(typer.Exit):
        build_config({**files(pki), key: value}, None)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: --{key.replace('_', '-')}: not a host:port address")
    assert "[::1]:8400" in err


def test_connection_limits_default_to_the_descriptor_budget_and_take_flags(
    pki: PkiFiles, tmp_path: Path
) -> None:
    config = build_config(files(pki), None)
    assert (config.max_connections, config.max_connections_per_host) == (0, 0)  # 0: sized
    assert config.tls_handshake_timeout == 10.0
    yml = tmp_path / "node.yaml"
    yml.write_text("max-connections: 5000\nmax-connections-per-host: 100\n"
                   "tls-handshake-timeout-ms: 2500\n")
    config = build_config(files(pki), yml)
    assert (config.max_connections, config.max_connections_per_host) == (5000, 100)
    assert config.tls_handshake_timeout == 2.5


def test_an_agent_raises_its_open_file_limit_and_sizes_its_connection_cap_from_it() -> None:
    """In a child with soft 256 / hard 1024 descriptors (the common soft 1024 in small)."""
    code = ("from dcl.cli.agent import raise_open_file_limit\n"
            "from dcl.server.server import default_max_connections\n"
            "print(*raise_open_file_limit(), default_max_connections())\n")
    ran = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 1024)))
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["256", "1024", "512"]
