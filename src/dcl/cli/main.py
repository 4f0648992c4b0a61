"""The `dcl` command: one entry point for operators."""

from __future__ import annotations

import typer

import dcl
from dcl.cli import agent, bench, certs, consume, produce, status

app = typer.Typer(
    name="dcl",
    help="DCL Store: a distributed, strongly consistent, append-only commit log.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(certs.app, name="certs")
app.command("agent")(agent.agent)
app.command("dev")(agent.dev)
app.command("produce")(produce.produce)
app.command("consume")(consume.consume)
app.command("status")(status.status)
app.command("bench")(bench.bench)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(dcl.__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
