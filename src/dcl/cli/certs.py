"""``dcl certs``: create the cluster's certificates, ACL files and gossip key, and replace
them on a running cluster (renewal, CA rotation, gossip key rotation)."""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from dcl.membership.crypto import MAX_KEYS, key_fingerprint, load_keyring
from dcl.membership.errors import InvalidGossipKey
from dcl.server.certs import (
    DEFAULT_HOSTS,
    begin_ca_rotation,
    finish_ca_rotation,
    generate_pki,
    issue_client_certificate,
    one_at_a_time,
    renew_node_certificates,
)
from dcl.storage.files import replace_atomically


def _fail(problem: object) -> NoReturn:
    """One `error:` line and exit 1."""
    typer.echo(f"error: {problem}", err=True)
    raise typer.Exit(code=1)


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
        _fail(f"{exc} (use --force to replace them)")
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
    except (OSError, ValueError) as exc:
        _fail(exc)
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
    except (OSError, ValueError) as exc:
        _fail(exc)
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
        "next: SIGHUP every node: it then refuses certificates the old CA signed and closes "
        "the connections they opened; give clients the new ca.pem (only the new CA)"),
}


@app.command("rotate-ca")
def rotate_ca(
    step: Annotated[RotationStep, typer.Argument(
        help="begin: add a new CA beside the old one and sign with it from now on; "
             "finish: take the old CA out once every certificate is from the new one.")],
    directory: Annotated[Path, typer.Argument(help="The directory `dcl certs init` wrote.")],
) -> None:
    """Replace the cluster CA without a restart or a moment when nodes refuse each other."""
    replaced = None
    try:
        if step is RotationStep.BEGIN:
            paths, replaced = begin_ca_rotation(directory)
        else:
            paths = finish_ca_rotation(directory)
    except (OSError, ValueError) as exc:
        _fail(exc)
    if replaced is not None:
        typer.echo(f"replaced {replaced}, a CA whose key was never written (an earlier "
                   "begin cut short)", err=True)
    for path in paths:
        typer.echo(str(path))
    typer.echo(_NEXT_STEP[step], err=True)


gossip_app = typer.Typer(
    name="gossip-key", no_args_is_help=True,
    help="The gossip keyring file: the first key seals, every key opens. To change the key "
         "with no moment when nodes cannot hear each other: `add`, SIGHUP every node; `use` "
         "the new one, SIGHUP every node; `remove` the old one, SIGHUP every node.")
app.add_typer(gossip_app)

_KeyFile = Annotated[Path, typer.Argument(help="The gossip key file (dcl certs init writes "
                                                "gossip.key).")]
_Fingerprint = Annotated[str, typer.Argument(help="A key's fingerprint, as `list` shows it.")]


def _read_keyring(path: Path) -> list[bytes]:
    try:
        return list(load_keyring(path))
    except InvalidGossipKey as exc:
        _fail(exc)


def _find(keys: list[bytes], fingerprint: str, path: Path) -> int:
    for i, key in enumerate(keys):
        if key_fingerprint(key) == fingerprint.strip().lower():
            return i
    _fail(f"no key with fingerprint {fingerprint!r} in {path} (see `dcl certs gossip-key "
          f"list {path}`)")


def _write_keyring(path: Path, keys: list[bytes]) -> None:
    lines = ["# gossip keys: the first seals, every key opens (dcl certs gossip-key --help)",
             *(key.hex() for key in keys)]
    replace_atomically(path, [("\n".join(lines) + "\n").encode()], mode=0o600)
    _show(keys)


def _show(keys: list[bytes]) -> None:
    for i, key in enumerate(keys):
        typer.echo(f"{key_fingerprint(key)} {'primary' if i == 0 else 'secondary'}")


@gossip_app.command("list")
def gossip_list(path: _KeyFile) -> None:
    """Each key's fingerprint and role (primary: seals), never the key itself."""
    _show(_read_keyring(path))


def _edit_keyring(path: Path, change: Callable[[list[bytes]], list[bytes]]) -> None:
    """Read, change and write the keyring under the directory's lock (`one_at_a_time`), so
    two edits at once do not lose one."""

    def edit(_directory: object) -> None:
        _write_keyring(path, change(_read_keyring(path)))

    try:
        one_at_a_time(edit)(path.parent)
    except OSError as exc:  # the lock file or the new key file, say, not writable
        _fail(exc)



@gossip_app.command("add")
def gossip_add(path: _KeyFile) -> None:
    """Add a new random key as a secondary: nodes open frames sealed with it after SIGHUP,
    and still seal with the primary."""
    key = secrets.token_bytes(32)

    def add(keys: list[bytes]) -> list[bytes]:
        if len(keys) >= MAX_KEYS:
            _fail(f"{path} holds {len(keys)} keys already, at most {MAX_KEYS}: remove one "
                  "first")
        return [*keys, key]

    _edit_keyring(path, add)
    typer.echo(f"next: copy {path} to every node and SIGHUP each; then `dcl certs gossip-key "
               f"use {path} {key_fingerprint(key)}`", err=True)


@gossip_app.command("use")
def gossip_use(path: _KeyFile, fingerprint: _Fingerprint) -> None:
    """Make a key the primary: nodes seal with it after SIGHUP, and still open the others
    (so nodes not yet reloaded are heard)."""

    def use(keys: list[bytes]) -> list[bytes]:
        key = keys.pop(_find(keys, fingerprint, path))
        return [key, *keys]

    _edit_keyring(path, use)
    typer.echo(f"next: copy {path} to every node and SIGHUP each; once every node's "
               "dcl_gossip_key_info shows it primary, `remove` the old key", err=True)


@gossip_app.command("remove")
def gossip_remove(path: _KeyFile, fingerprint: _Fingerprint) -> None:
    """Take a secondary key out: nodes no longer open frames sealed with it after SIGHUP.
    The primary cannot be removed (`use` another first)."""

    def remove(keys: list[bytes]) -> list[bytes]:
        index = _find(keys, fingerprint, path)
        if index == 0:
            _fail(f"{fingerprint} is the primary key: `use` another key first")
        return keys[:index] + keys[index + 1:]

    _edit_keyring(path, remove)
    typer.echo(f"next: copy {path} to every node and SIGHUP each", err=True)
