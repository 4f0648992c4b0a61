"""`dcl agent` (one node) and `dcl dev` (a local 3-node cluster in the foreground).

Configuration precedence: flags > DCL_* environment variables > YAML config file > defaults.
Flags and environment variables arrive through typer (both fill the parameter); anything still
unset is taken from the config file, then from AgentConfig's defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from dcl.addresses import split_host_port
from dcl.agent.agent import Agent, AgentConfig, ReloadFailed
from dcl.raft.storage import DEFAULT_RETAIN_BYTES
from dcl.storage.space import DEFAULT_RESERVE_BYTES

log = logging.getLogger("dcl.agent")

_KEYS = (
    "data_dir", "node_name", "bind_addr", "rpc_port", "start_join_addrs", "join_rpc_addrs",
    "bootstrap", "acl_model_file", "acl_policy_file", "server_tls_cert_file",
    "server_tls_key_file", "server_tls_ca_file", "peer_tls_cert_file", "peer_tls_key_file",
    "peer_tls_ca_file", "gossip_key_file", "snapshot_threshold", "snapshot_log_bytes",
    "raft_retain_bytes", "raft_log_memory_bytes", "segment_bytes", "retention_bytes",
    "retention_ms", "min_free_bytes", "log_level",
    "peer_dial_overrides", "insecure_gossip", "commit_announce_ms", "metrics_port",
    "max_connections", "max_connections_per_host", "tls_handshake_timeout_ms",
)
_REQUIRED_FILES = (
    "acl_model_file", "acl_policy_file", "server_tls_cert_file", "server_tls_key_file",
    "server_tls_ca_file", "peer_tls_cert_file", "peer_tls_key_file", "peer_tls_ca_file",
)


def _opt(name: str, help_text: str) -> Any:
    return typer.Option(f"--{name.replace('_', '-')}", envvar=f"DCL_{name.upper()}",
                        help=help_text)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def build_config(values: dict[str, Any], config_file: Path | None) -> AgentConfig:
    """Merge flag/env values over the YAML file; raise typer.Exit with one clear line."""
    merged: dict[str, Any] = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(config_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise _fail(f"cannot read config file {config_file}: {exc}") from None
        if not isinstance(loaded, dict):
            raise _fail(f"config file {config_file} is not a mapping")
        unknown = set(k.replace("-", "_") for k in loaded) - set(_KEYS)
        if unknown:
            raise _fail(f"unknown keys in {config_file}: {', '.join(sorted(unknown))}")
        merged.update({k.replace("-", "_"): v for k, v in loaded.items()})
    merged.update({k: v for k, v in values.items() if v is not None and v != []})
    for key in _REQUIRED_FILES:
        path = merged.get(key)
        if not path:
            raise _fail(f"--{key.replace('_', '-')} is required")
        if not Path(path).is_file():
            raise _fail(f"no such file: {path} (--{key.replace('_', '-')})")
    key_file = merged.get("gossip_key_file")
    if key_file and not Path(key_file).is_file():
        raise _fail(f"no such file: {key_file} (--gossip-key-file)")
    if not key_file and not merged.get("insecure_gossip"):
        raise _fail("gossip needs a shared key: pass --gossip-key-file (dcl certs init writes "
                    "gossip.key), or --insecure-gossip on a trusted network only")
    bind_addr = str(merged.get("bind_addr", "127.0.0.1:8401"))
    try:
        host, _ = split_host_port(bind_addr)
    except ValueError as exc:
        raise _fail(f"--bind-addr: {exc}") from None
    try:
        announce_ms = float(merged.get("commit_announce_ms", 0.0))
    except (TypeError, ValueError):
        announce_ms = -1.0
    if not 0.0 <= announce_ms <= 1000.0:
        raise _fail(f"--commit-announce-ms must be a number of milliseconds from 0 to 1000, "
                    f"not {merged.get('commit_announce_ms')!r}")

    def count(key: str, default: int, least: int = 0) -> int:
        """A size or count option: a whole number, `least` or more, or one clear line."""
        raw = merged.get(key, default)
        try:
            value = int(raw)
        except (TypeError, ValueError):
            value = least - 1
        if value < least or isinstance(raw, float | bool):
            raise _fail(f"--{key.replace('_', '-')} must be a whole number, {least} or more, "
                        f"not {raw!r}")
        return value

    metrics_port = count("metrics_port", 0)
    if metrics_port > 65535:
        raise _fail(f"--metrics-port must be a TCP port (1-65535), or 0 for none, "
                    f"not {metrics_port}")

    def addrs(key: str) -> list[str]:
        raw = merged.get(key) or []
        items = raw.split(",") if isinstance(raw, str) else [str(a) for a in raw]
        found = [a.strip() for s in items for a in s.split(",") if a.strip()]
        for address in found:
            try:
                split_host_port(address)
            except ValueError as exc:
                raise _fail(f"--{key.replace('_', '-')}: {exc}") from None
        return found

    return AgentConfig(
        peer_dial_overrides=_dial_overrides(merged.get("peer_dial_overrides")),
        data_dir=Path(merged.get("data_dir", "./dcl-data")),
        node_name=str(merged.get("node_name") or os.uname().nodename),
        rpc_host=host,
        bind_addr=bind_addr,
        gossip_key_file=Path(key_file) if key_file else None,
        insecure_gossip=bool(merged.get("insecure_gossip", False)),
        rpc_port=int(merged.get("rpc_port", 8400)),
        bootstrap=bool(merged.get("bootstrap", False)),
        start_join_addrs=addrs("start_join_addrs"),
        join_rpc_addrs=addrs("join_rpc_addrs"),
        server_tls_cert_file=Path(merged["server_tls_cert_file"]),
        server_tls_key_file=Path(merged["server_tls_key_file"]),
        server_tls_ca_file=Path(merged["server_tls_ca_file"]),
        peer_tls_cert_file=Path(merged["peer_tls_cert_file"]),
        peer_tls_key_file=Path(merged["peer_tls_key_file"]),
        peer_tls_ca_file=Path(merged["peer_tls_ca_file"]),
        acl_model_file=Path(merged["acl_model_file"]),
        acl_policy_file=Path(merged["acl_policy_file"]),
        snapshot_threshold_entries=count("snapshot_threshold", 100_000),
        snapshot_log_bytes=count("snapshot_log_bytes", 1 << 30),
        raft_retain_bytes=count("raft_retain_bytes", DEFAULT_RETAIN_BYTES),
        raft_log_memory_bytes=count("raft_log_memory_bytes", 0),
        segment_bytes=count("segment_bytes", 64 << 20, least=1),  # a segment holds bytes
        retention_bytes=count("retention_bytes", 0),
        retention_seconds=count("retention_ms", 0) / 1000,
        min_free_bytes=count("min_free_bytes", DEFAULT_RESERVE_BYTES),
        log_level=str(merged.get("log_level", "INFO")),
        commit_announce_seconds=announce_ms / 1000,
        metrics_port=metrics_port or None,
        max_connections=count("max_connections", 0),
        max_connections_per_host=count("max_connections_per_host", 0),
        tls_handshake_timeout=count("tls_handshake_timeout_ms", 10_000, least=1) / 1000,
    )


def _dial_overrides(raw: Any) -> dict[str, str]:
    """`ID=HOST:PORT` items (flags, env, a YAML list or comma-separated string) or a YAML
    mapping, as peer id -> dial address."""
    if not raw:
        return {}
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    items = raw.split(",") if isinstance(raw, str) else [str(a) for a in raw]
    overrides: dict[str, str] = {}
    for item in (a.strip() for s in items for a in s.split(",")):
        if not item:
            continue
        peer, sep, addr = item.partition("=")
        try:
            split_host_port(addr.strip())
        except ValueError:
            sep = ""
        if not sep or not peer:
            raise _fail(f"--peer-dial-override wants ID=HOST:PORT, got {item!r}")
        overrides[peer.strip()] = addr.strip()
    return overrides


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft open-file limit to its hard limit (as the Go runtime does
    for every program), and return (before, after). The soft limit is often 1024: a node
    holds a descriptor per connection and per segment file, and the connection cap is
    sized from it (`default_max_connections`)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return soft, soft
    ceiling = 1 << 20 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)
    # The kernel may refuse the hard limit itself (Linux: above fs.nr_open; macOS: above
    # its own ceiling with an unlimited hard limit): then the next smaller that it takes.
    for target in (ceiling, 65536, 10240):
        if soft < target <= ceiling:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (ValueError, OSError):
                continue
            return soft, target
    return soft, soft


async def run_agent(config: AgentConfig) -> None:
    """Run until SIGTERM/SIGINT; a second signal exits at once. SIGHUP reloads the
    certificate and ACL files (see Agent.reload)."""
    limits = raise_open_file_limit()
    agent = Agent(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    started, reload_asked = False, False

    def on_signal() -> None:
        if stop.is_set():
            os._exit(130)
        stop.set()

    def on_reload() -> None:
        nonlocal reload_asked
        if not started:  # not every context is built yet: reload once they are
            reload_asked = True
            return
        try:
            agent.reload()
        except ReloadFailed as exc:
            log.error("reload failed, the node goes on as it was: %s", exc)
        except Exception:  # a signal handler must not end the loop; counted nowhere else
            agent.reloads["error"] += 1
            log.exception("reload failed")

    # Installed before start: a signal during startup still gets the graceful path (and
    # SIGHUP, whose default is to end the process, does not end it).
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    await agent.start()
    started = True
    if limits[1] != limits[0]:
        log.info("open-file limit raised from %d to %d", *limits)
    elif 0 <= limits[1] < 4096:
        log.warning("open-file limit is %d and could not be raised: connections and log "
                    "segments share it (raise LimitNOFILE / ulimit -n)", limits[1])
    if reload_asked:
        on_reload()
    typer.echo(f"node {config.node_name} serving on {config.rpc_addr} "
               f"(gossip {config.bind_addr})", err=True)
    stopped, failed = (asyncio.ensure_future(e.wait()) for e in (stop, agent.failed))
    await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    failed.cancel()
    await agent.shutdown()
    if agent.server is not None and agent.server.left_running:
        # Everything is closed and flushed, but asyncio.run would wait for those calls
        # forever: leave without them.
        log.error("exiting with calls still running: %s", ", ".join(agent.server.left_running))
        logging.shutdown()
        sys.stderr.flush()
        os._exit(1)
    if agent.failure is not None:
        raise _fail(f"node {config.node_name} stopped: {agent.failure}")


def agent(
    config_file: Annotated[Path | None, _opt("config_file", "YAML config file.")] = None,
    data_dir: Annotated[Path | None, _opt("data_dir", "Directory for logs and state.")] = None,
    node_name: Annotated[str | None, _opt("node_name", "Unique node id.")] = None,
    bind_addr: Annotated[str | None, _opt(
        "bind_addr", "Gossip address (host used for RPC too); default 127.0.0.1:8401.")] = None,
    rpc_port: Annotated[int | None, _opt("rpc_port", "Client and Raft port; default 8400.")] = None,
    start_join_addrs: Annotated[list[str] | None, _opt(
        "start_join_addrs", "Gossip addresses (--bind-addr) of members to join.")] = None,
    join_rpc_addrs: Annotated[list[str] | None, _opt(
        "join_rpc_addrs", "RPC addresses of members to ask for admission.")] = None,
    bootstrap: Annotated[bool | None, _opt("bootstrap", "Start a new cluster.")] = None,
    acl_model_file: Annotated[Path | None, _opt("acl_model_file", "casbin model.")] = None,
    acl_policy_file: Annotated[Path | None, _opt("acl_policy_file", "casbin policy.")] = None,
    server_tls_cert_file: Annotated[Path | None, _opt("server_tls_cert_file", "")] = None,
    server_tls_key_file: Annotated[Path | None, _opt("server_tls_key_file", "")] = None,
    server_tls_ca_file: Annotated[Path | None, _opt("server_tls_ca_file", "")] = None,
    peer_tls_cert_file: Annotated[Path | None, _opt("peer_tls_cert_file", "")] = None,
    peer_tls_key_file: Annotated[Path | None, _opt("peer_tls_key_file", "")] = None,
    peer_tls_ca_file: Annotated[Path | None, _opt("peer_tls_ca_file", "")] = None,
    gossip_key_file: Annotated[Path | None, _opt(
        "gossip_key_file", "Shared gossip key (hex or base64); dcl certs init writes one.")] = None,
    insecure_gossip: Annotated[bool | None, _opt(
        "insecure_gossip", "Run gossip unencrypted (trusted networks only).")] = None,
    snapshot_threshold: Annotated[int | None, _opt(
        "snapshot_threshold",
        "Entries between snapshots (also waits for as many bytes as the last one).")] = None,
    snapshot_log_bytes: Annotated[int | None, _opt(
        "snapshot_log_bytes",
        "Raft log bytes (held in memory) that force a snapshot whatever the count.")] = None,
    raft_retain_bytes: Annotated[int | None, _opt(
        "raft_retain_bytes",
        "Raft log kept below the snapshot, so a follower briefly behind catches up from the "
        "log, not by a copy of the whole snapshot. 0: off (it always gets the snapshot).")] = None,
    raft_log_memory_bytes: Annotated[int | None, _opt(
        "raft_log_memory_bytes",
        "Raft log bytes held in memory past which the node takes no new entries until a "
        "snapshot frees memory (writers wait). 0 (the default): twice --snapshot-log-bytes.")
    ] = None,
    segment_bytes: Annotated[int | None, _opt("segment_bytes", "Max store segment size.")] = None,
    retention_bytes: Annotated[int | None, _opt(
        "retention_bytes",
        "Commit log this node keeps: its oldest segments go while the rest still hold this "
        "many bytes (as Kafka's retention.bytes). 0 (the default): all of it.")] = None,
    retention_ms: Annotated[int | None, _opt(
        "retention_ms",
        "Drop a commit log segment once its newest record is this old (as Kafka's "
        "retention.ms). 0 (the default): never.")] = None,
    min_free_bytes: Annotated[int | None, _opt(
        "min_free_bytes",
        "Free disk space the node keeps for itself: below it, the leader refuses new records "
        "(RESOURCE_EXHAUSTED, nothing appended) and a follower takes none, until retention or "
        "an operator frees space; reads go on. A disk that fills stops the node. Default "
        "268435456 (256 MiB); 0: no reserve.")] = None,
    commit_announce_ms: Annotated[float | None, _opt(
        "commit_announce_ms",
        "While writes are steady, hold a commit's notice to followers up to this long for "
        "the next write to carry: less CPU per write, but readers on followers see records "
        "that much later. 0 (the default): at once.")] = None,
    metrics_port: Annotated[int | None, _opt(
        "metrics_port",
        "Serve Prometheus metrics at https://HOST:PORT/metrics (HOST: --bind-addr's), with the "
        "server certificate; scrapers need a client certificate the ACL grants 'metrics' or "
        "'admin'. 0 (the default): no endpoint.")] = None,
    max_connections: Annotated[int | None, _opt(
        "max_connections",
        "Connections the RPC port holds open at once, counted from accept; when full, the "
        "oldest one still in its TLS handshake is cut for a new one, and if there is none the "
        "new one is closed unread. 0 (the default): half the open-file limit, at most 4096.")
    ] = None,
    max_connections_per_host: Annotated[int | None, _opt(
        "max_connections_per_host",
        "The same, from one host (as Kafka's max.connections.per.ip). 0 (the default): no "
        "such cap.")] = None,
    tls_handshake_timeout_ms: Annotated[int | None, _opt(
        "tls_handshake_timeout_ms",
        "Milliseconds a new connection has to finish its TLS handshake; default 10000.")
    ] = None,
    log_level: Annotated[str | None, _opt("log_level", "DEBUG, INFO, WARNING...")] = None,
    peer_dial_overrides: Annotated[list[str] | None, typer.Option(
        "--peer-dial-override", envvar="DCL_PEER_DIAL_OVERRIDES",
        help="ID=HOST:PORT: dial that peer's Raft traffic there (a test proxy); repeatable.",
    )] = None,
) -> None:
    """Run one DCL Store node."""
    values = {k: v for k, v in locals().items() if k in _KEYS}
    config = build_config(values, config_file)
    try:
        asyncio.run(run_agent(config))
    except OSError as exc:
        raise _fail(f"cannot start node: {exc}") from None
    except Exception as exc:  # one clear line, not a traceback
        if type(exc).__module__.startswith("dcl"):
            raise _fail(str(exc)) from None
        raise


#: `dcl dev`: each node's metrics port is its RPC port plus this (8500-8502 by default).
METRICS_PORT_OFFSET = 100

#: Printed by `dcl dev`: the client commands default to its first node and root certificate.
_DEV_EXAMPLES = (
    "dcl status",
    "dcl produce hello world",
    "seq 1 10000 | dcl produce",
    "dcl consume --from 0 --count 5",
    "dcl consume --from end --follow",
    "dcl bench --records 50000",
)


def dev(
    directory: Annotated[Path, typer.Option("--dir", help="Work directory.")] = Path(".dcl-dev"),
    base_port: Annotated[int, typer.Option("--base-port", help="First RPC port.")] = 8400,
) -> None:
    """Start a local 3-node cluster in the foreground (certificates created on first run)."""
    from dcl.server.certs import PkiFiles, generate_pki

    pki_dir = directory / "pki"
    existing = PkiFiles(pki_dir)
    complete = existing.ca_cert.exists() and existing.gossip_key.exists()
    pki = existing if complete else generate_pki(pki_dir)
    ports = [base_port + i for i in range(3)]
    # SIGTERM stops the cluster like Ctrl-C (the nodes run in their own sessions, so they
    # would outlive this process); SIGINT explicitly too, in case it was inherited ignored;
    # and SIGHUP, which here means the terminal went away (it used to end this process
    # alone). To reload a node's certificates and ACL, send SIGHUP to the node itself.
    # Installed before the first node starts, and only noted until then: an interrupt
    # raised inside Popen could lose a started node.
    stop = {"asked": False, "waiting": False}

    def interrupt(signum: int, frame: object) -> None:
        stop["asked"] = True
        if stop["waiting"]:
            raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, port in enumerate(ports):
            args = [
                sys.executable, "-m", "dcl.cli.main", "agent",
                "--node-name", f"node-{i}", "--data-dir", str(directory / f"node-{i}"),
                "--rpc-port", str(port), "--bind-addr", f"127.0.0.1:{port + 1000}",
                "--acl-model-file", str(pki.acl_model), "--acl-policy-file", str(pki.acl_policy),
                "--server-tls-cert-file", str(pki.server_cert),
                "--server-tls-key-file", str(pki.server_key),
                "--server-tls-ca-file", str(pki.ca_cert),
                "--peer-tls-cert-file", str(pki.peer_cert),
                "--peer-tls-key-file", str(pki.peer_key),
                "--peer-tls-ca-file", str(pki.ca_cert), "--log-level", "WARNING",
                "--gossip-key-file", str(pki.gossip_key),
                "--metrics-port", str(port + METRICS_PORT_OFFSET),
            ]
            args += (["--bootstrap"] if i == 0
                     else ["--start-join-addrs", f"127.0.0.1:{ports[0] + 1000}"])
            # Own session: Ctrl-C reaches only this process, which then sends each node one
            # SIGTERM (a second signal would make a node skip its graceful shutdown).
            procs.append(subprocess.Popen(args, start_new_session=True))
            if stop["asked"]:
                break
        typer.echo(f"DCL Store dev cluster: {', '.join(f'127.0.0.1:{p}' for p in ports)}")
        typer.echo(f"certificates in {pki_dir}; client identity root-client.pem (CN root)")
        metrics_url = f"https://127.0.0.1:{ports[0] + METRICS_PORT_OFFSET}/metrics"
        typer.echo(f"Prometheus metrics: {metrics_url} (and the next two ports), "
                   "root certificate")
        typer.echo("Try, in another shell in this directory (dcl on PATH: . .venv/bin/activate):")
        for example in _DEV_EXAMPLES:
            typer.echo(f"  {example}")
        typer.echo("Ctrl-C stops all nodes.")
        stop["waiting"] = True  # first, then the check: a signal in between still counts
        if not stop["asked"]:
            for proc in procs:
                proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        # Once: a second signal (a closing terminal sends two) must not cut this short.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except Exception:
                proc.kill()
