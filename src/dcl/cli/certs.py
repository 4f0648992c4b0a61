"""``dcl certs``: create the cluster's certificates, ACL files and gossip key."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from dcl.server.certs import (
    DEFAULT_HOSTS,
    begin_ca_rotation,
    finish_ca_rotation,
    generate_pki,
    issue_client_certificate,
    renew_node_certificates,
)

app = typer.Typer(name="certs", help="Certificates and ACL files.", no_args_is_help=True)


@app.command("init")
def init(
    directory: Annotated[Path, typer.Argument(help="Directory to write into (created).")],
    hosts: Annotated[
        list[str] | None,
        typer.Option(
            "--hosts",
            help="Extra server/peer SANs: comma-separated and/or repeated. "
            f"{', '.join(DEFAULT_HOSTS)} are always included.",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite existing files (invalidates old certs).")
    ] = False,
) -> None:
    """Generate CA, server, peer and client certificates plus model.conf and policy.csv."""
    names = [h.strip() for value in hosts or [] for h in value.split(",") if h.strip()]
    try:
        files = generate_pki(directory, names, force=force)
    except FileExistsError as exc:
        typer.echo(f"error: {exc} (use --force to replace them)", err=True)
        raise typer.Exit(code=1) from None
    for path in files.all():
        typer.echo(str(path))


@app.command("renew")
def renew(
    directory: Annotated[Path, typer.Argument(help="The directory `dcl certs init` wrote.")],
    hosts: Annotated[
        list[str] | None,
        typer.Option("--hosts", help="Further SANs beyond those the current certificate has."),
    ] = None,
) -> None:
    """Replace the server and peer certificates with new ones from the same CA; then send
    each agent SIGHUP (kill -HUP PID) to serve them without a restart."""
    names = [h.strip() for value in hosts or [] for h in value.split(",") if h.strip()]
    try:
        paths = renew_node_certificates(directory, names)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    for path in paths:
        typer.echo(str(path))
    typer.echo("send each agent SIGHUP to load them (kill -HUP PID)", err=True)


@app.command("client")
def client(
    directory: Annotated[Path, typer.Argument(help="The directory `dcl certs init` wrote.")],
    name: Annotated[str, typer.Argument(help="Common name of the new client identity.")],
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite an existing certificate of that name.")
    ] = False,
) -> None:
    """Issue a client certificate signed by the cluster CA; grant it rights in policy.csv."""
    try:
        paths = issue_client_certificate(directory, name, force=force)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    for path in paths:
        typer.echo(str(path))
    typer.echo(f"grant rights with lines like 'p, {name}, *, produce' in policy.csv", err=True)


class RotationStep(enum.StrEnum):
    BEGIN = "begin"
    FINISH = "finish"


_NEXT_STEP = {
    RotationStep.BEGIN: (
        "next: SIGHUP every node (kill -HUP PID) and give clients the new ca.pem, which "
        "trusts both CAs; then `dcl certs renew DIR` and `dcl certs client DIR NAME --force` "
        "for each client, SIGHUP every node; then `dcl certs rotate-ca finish DIR`"),
    RotationStep.FINISH: (
        "next: SIGHUP every node; from then on certificates the old CA signed are refused"),
}


@app.command("rotate-ca")
def rotate_ca(
    step: Annotated[RotationStep, typer.Argument(
        help="begin: add a new CA beside the old one and sign with it from now on; "
             "finish: take the old CA out once every certificate is from the new one.")],
    directory: Annotated[Path, typer.Argument(help="The directory `dcl certs init` wrote.")],
) -> None:
    """Replace the cluster CA without a restart or a moment when nodes refuse each other."""
    rotate = begin_ca_rotation if step is RotationStep.BEGIN else finish_ca_rotation
    try:
        paths = rotate(directory)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    for path in paths:
        typer.echo(str(path))
    typer.echo(_NEXT_STEP[step], err=True)
