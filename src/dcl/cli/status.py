"""``dcl status``: one row per server — role, term, log and apply progress, the commit-log
offsets it holds and their size on disk, gossip state; with ``--config``, its reloads,
certificate expiry and gossip key.

Each server is asked (Admin Cluster, in parallel) about itself, because only a node knows
its own applied index exactly; the leader's answer supplies the gossip state of every
member (what the leader's gossip sees) and the last index that lag is measured against.
Lag is the leader's last log index minus the server's applied index: Raft entries the
server has yet to apply. A server that does not answer is shown as unreachable.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
from dataclasses import asdict, dataclass
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from dcl.cli.connection import (
    DEFAULT_CA_FILE,
    DEFAULT_CERT_FILE,
    DEFAULT_KEY_FILE,
    DEFAULT_TIMEOUT,
    AddrOpt,
    CaFileOpt,
    CertFileOpt,
    Connection,
    KeyFileOpt,
    TimeoutOpt,
)
from dcl.cli.output import stdout_console
from dcl.client import ClusterStatus, DclClient, NodeStatus, ServerInfo
from dcl.errors import PermissionDenied, Unavailable
from dcl.tls import format_utc

__all__ = ["StatusFormat", "status"]

UNREACHABLE = "unreachable"


class StatusFormat(enum.StrEnum):
    table = "table"
    json = "json"


@dataclass(frozen=True, slots=True)
class Row:
    node: str
    address: str
    role: str
    term: int | None
    last_index: int | None
    applied_index: int | None
    lag: int | None
    voter: bool | None
    gossip_state: str
    first_offset: int | None = None
    next_offset: int | None = None
    log_bytes: int | None = None
    reloads_ok: int | None = None
    reloads_failed: int | None = None
    certificates_expire: int | None = None
    gossip_key: str | None = None
    disk_free_bytes: int | None = None
    disk_reserve_bytes: int | None = None


async def _ask(client: DclClient, address: str) -> ClusterStatus | None:
    if not address:  # a member whose address the log has not recorded yet
        return None
    try:
        return await client.cluster_status(address)
    except PermissionDenied:
        raise
    except Unavailable:
        return None


async def _rows(client: DclClient) -> list[Row]:
    servers: list[ServerInfo] = sorted(await client.get_servers(), key=lambda s: s.id)
    answers = await asyncio.gather(*(_ask(client, s.rpc_addr) for s in servers))
    own = {s.id: a.self_row(s.id) if a else None for s, a in zip(servers, answers, strict=True)}
    leader_view = next((a for s, a in zip(servers, answers, strict=True)
                        if a is not None and s.is_leader), None)
    leader_row = own.get(leader_view.leader_id) if leader_view else None
    rows = []
    for server in servers:
        mine: NodeStatus | None = own[server.id]
        seen = leader_view.self_row(server.id) if leader_view else None
        gossip = (seen.gossip_state if seen else "") or (mine.gossip_state if mine else "")
        if mine is None:
            rows.append(Row(server.id, server.rpc_addr, UNREACHABLE, None, None, None, None,
                            seen.voter if seen else None, gossip))
            continue
        lag = max(leader_row.last_index - mine.applied_index, 0) if leader_row else None
        rows.append(Row(server.id, server.rpc_addr, mine.role, mine.term, mine.last_index,
                        mine.applied_index, lag, mine.voter, gossip, mine.first_offset,
                        mine.next_offset, mine.log_bytes, mine.reloads_ok,
                        mine.reloads_failed, mine.certificates_expire or None,
                        mine.gossip_key or None, mine.disk_free_bytes,
                        mine.disk_reserve_bytes))
    return rows


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _size(nbytes: int) -> str:
    """Bytes in the largest binary unit that keeps a number >= 1 (1.5K, 64M, 2.0G)."""
    value = float(nbytes)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" or value >= 100 else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _disk(row: Row) -> str:
    """Free disk space; in red, beside the reserve, when below it (the node takes no records)."""
    free, reserve = row.disk_free_bytes, row.disk_reserve_bytes
    if free is None or reserve is None:
        return "-"
    if reserve and free < reserve:
        return f"[bold red]{_size(free)} < {_size(reserve)}[/]"
    return _size(free)


_ROLE_STYLE = {"leader": "bold green", "follower": "green", "learner": "yellow",
               UNREACHABLE: "bold red"}


def _table(rows: list[Row]) -> Table:
    # Learners are the non-voters, so the role column also says who votes (json has both).
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("node", "address", "role"):
        table.add_column(name, no_wrap=True)
    for name in ("term", "last", "applied", "lag", "offsets", "log", "disk"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("gossip", no_wrap=True)
    for row in rows:
        style = _ROLE_STYLE.get(row.role, "yellow")
        offsets = ("-" if row.first_offset is None else
                   f"{row.first_offset}-{row.next_offset}")
        table.add_row(
            row.node, row.address, f"[{style}]{row.role}[/]", _cell(row.term),
            _cell(row.last_index), _cell(row.applied_index), _cell(row.lag), offsets,
            "-" if row.log_bytes is None else _size(row.log_bytes), _disk(row),
            row.gossip_state or "-",
        )
    return table


def _config_table(rows: list[Row], now: float) -> Table:
    """What each node's reloads left in use: the check between steps of a rotation."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("node", "address"):
        table.add_column(name, no_wrap=True)
    for name in ("reloads", "failed", "certificates expire"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("gossip key", no_wrap=True)
    for row in rows:
        failed = _cell(row.reloads_failed)
        expire = "-"
        if row.certificates_expire is not None:
            days = (row.certificates_expire - now) / 86400
            expire = (f"{format_utc(row.certificates_expire)[:10]} ({days:.0f} d)"
                      if days >= 0 else f"[bold red]{format_utc(row.certificates_expire)}[/]")
        table.add_row(row.node, row.address, _cell(row.reloads_ok),
                      f"[bold red]{failed}[/]" if row.reloads_failed else failed, expire,
                      row.gossip_key or "-")
    return table


def status(
    output: Annotated[StatusFormat, typer.Option(
        "--output", "-o", help="table, or json (one object per server).")
    ] = StatusFormat.table,
    config: Annotated[bool, typer.Option(
        "--config", help="Instead of Raft and the log: each node's reloads (SIGHUP), when "
                         "its first certificate expires and the gossip key it seals with; "
                         "check it between the steps of a rotation.")] = False,
    addr: AddrOpt = None,
    ca_file: CaFileOpt = DEFAULT_CA_FILE,
    cert_file: CertFileOpt = DEFAULT_CERT_FILE,
    key_file: KeyFileOpt = DEFAULT_KEY_FILE,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
) -> None:
    """Show each server's role, term, last log index, applied index, lag and gossip state
    (or, with --config, what its configuration reloads left in use)."""
    conn = Connection.from_options(addr, ca_file, cert_file, key_file, timeout)
    rows = conn.run(_rows)
    if output is StatusFormat.json:
        typer.echo(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        stdout_console.print(_config_table(rows, time.time()) if config else _table(rows))
