"""Connection options shared by the client commands (produce, consume, status, bench).

Defaults point at what ``dcl dev`` (``make run``) creates in the working directory: its
first node on 127.0.0.1:8400 and the root client certificate under ``./.dcl-dev/pki``, so
the commands work against a dev cluster with no flags. Each option also reads ``DCL_<NAME>``
from the environment (``DCL_ADDR`` may hold several addresses, separated by spaces or commas).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from dcl.addresses import split_host_port
from dcl.cli.errors import CliError, user_errors
from dcl.client import DclClient
from dcl.tls import client_context

__all__ = ["AddrOpt", "CaFileOpt", "CertFileOpt", "Connection", "KeyFileOpt", "TimeoutOpt"]

_T = TypeVar("_T")

DEV_PKI = Path(".dcl-dev") / "pki"
DEFAULT_ADDR = "127.0.0.1:8400"
_PANEL = "Connection"

AddrOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--addr", envvar="DCL_ADDR", rich_help_panel=_PANEL,
        help=f"Seed address host:port (repeatable or comma-separated); default {DEFAULT_ADDR}.",
    ),
]
CaFileOpt = Annotated[
    Path,
    typer.Option("--ca-file", envvar="DCL_CA_FILE", rich_help_panel=_PANEL,
                 help="CA certificate that signed the servers' certificates."),
]
CertFileOpt = Annotated[
    Path,
    typer.Option("--cert-file", envvar="DCL_CERT_FILE", rich_help_panel=_PANEL,
                 help="Client certificate (its CN is the identity the ACL checks)."),
]
KeyFileOpt = Annotated[
    Path,
    typer.Option("--key-file", envvar="DCL_KEY_FILE", rich_help_panel=_PANEL,
                 help="Private key of --cert-file."),
]
TimeoutOpt = Annotated[
    float,
    typer.Option("--timeout", envvar="DCL_TIMEOUT", min=0.1, rich_help_panel=_PANEL,
                 help="Seconds to wait for each call before trying elsewhere."),
]

DEFAULT_CA_FILE = DEV_PKI / "ca.pem"
DEFAULT_CERT_FILE = DEV_PKI / "root-client.pem"
DEFAULT_KEY_FILE = DEV_PKI / "root-client-key.pem"
DEFAULT_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Connection:
    """Where the cluster is and who we are; ``run`` executes a command against it."""

    addrs: tuple[str, ...]
    ca_file: Path
    cert_file: Path
    key_file: Path
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_options(
        cls,
        addr: list[str] | None,
        ca_file: Path,
        cert_file: Path,
        key_file: Path,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Connection:
        addrs = tuple(a for value in addr or [DEFAULT_ADDR]
                      for a in value.replace(",", " ").split())
        return cls(addrs or (DEFAULT_ADDR,), ca_file, cert_file, key_file, timeout)

    def _check(self) -> ssl.SSLContext:
        for address in self.addrs:
            try:
                split_host_port(address)
            except ValueError:
                raise CliError(f"not a host:port address: {address!r} (--addr)") from None
        for path, flag, default in (
            (self.ca_file, "--ca-file", DEFAULT_CA_FILE),
            (self.cert_file, "--cert-file", DEFAULT_CERT_FILE),
            (self.key_file, "--key-file", DEFAULT_KEY_FILE),
        ):
            if not path.is_file():
                hint = (" (the default from `dcl dev`; run `make run` in this directory, or "
                        f"pass {flag})" if path == default else f" ({flag})")
                raise CliError(f"no such file: {path}{hint}")
        try:
            return client_context(self.cert_file, self.key_file, self.ca_file)
        except ssl.SSLError as exc:
            raise CliError(
                f"cannot load the client certificate {self.cert_file} with key "
                f"{self.key_file} and CA {self.ca_file}: {getattr(exc, 'reason', None) or exc}"
            ) from None
        except OSError as exc:
            raise CliError(f"cannot read TLS files: {exc}") from None

    def client(self) -> DclClient:
        """A client (not yet connected) for these options; CliError if they are unusable."""
        return DclClient(list(self.addrs), self._check(), timeout=self.timeout)

    def run(self, command: Callable[[DclClient], Awaitable[_T]]) -> _T:
        """Connect, run command(client) on a fresh event loop, close; user errors become one
        line on stderr and a non-zero exit (see dcl.cli.errors)."""

        async def main() -> _T:
            async with self.client() as client:
                return await command(client)

        with user_errors(self.addrs):
            return asyncio.run(main())
