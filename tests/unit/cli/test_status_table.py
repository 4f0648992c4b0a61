"""`dcl status`'s table: what an operator reads at a glance."""

from __future__ import annotations

from rich.console import Console

from dcl.cli.status import Row, _table


def render(*rows: Row) -> str:
    console = Console(width=200, record=True, color_system="truecolor")
    console.print(_table(list(rows)))
    return console.export_text(styles=True)


def row(node: str, free: int | None, reserve: int | None) -> Row:
    return Row(node, "127.0.0.1:1", "follower", 1, 5, 5, 0, True, "alive", 0, 5, 100,
               disk_free_bytes=free, disk_reserve_bytes=reserve)


def test_the_disk_column_marks_a_node_below_its_reserve_in_red() -> None:
    text = render(row("ok", 80 << 30, 256 << 20), row("low", 100 << 20, 256 << 20),
                  row("off", 1 << 20, 0), row("gone", None, None))
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert "80.0G" in lines["ok"] and "<" not in lines["ok"]
    assert "100M < 256M" in lines["low"]
    assert "\x1b[1;31m100M < 256M" in lines["low"]  # bold red
    assert "1.0M" in lines["off"] and "<" not in lines["off"]  # no reserve: never low
    assert lines["gone"].split()[9] == "-"
