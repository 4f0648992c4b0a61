"""The one place where failures a user can cause become one line on stderr and an exit code.

Client commands run inside ``user_errors()``: a failure the user can fix or must know about
(missing or unreadable file, a certificate the cluster does not accept, an unreachable
cluster, a refused permission, an offset out of range, a produce whose outcome is unknown)
prints ``error: <one line>`` and exits with status 1; Ctrl-C exits with 130 and no output.
Anything not listed here is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

import typer
from grpclib.exceptions import ProtocolError, StreamTerminatedError

from dcl.client import BatchPartiallyWritten, ProduceOutcomeUnknown, RemoteError
from dcl.errors import (
    DclError,
    InvalidRequest,
    NotLeader,
    OffsetOutOfRange,
    PermissionDenied,
    Unavailable,
)

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "CliError", "PartialProduce", "describe", "fail",
           "user_errors"]

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


class CliError(Exception):
    """A problem the command found itself, with its message already worded for the user."""


class PartialProduce(Exception):
    """A produce failed after ``acknowledged`` records of the input were appended."""

    def __init__(self, acknowledged: int, last_offset: int | None, cause: DclError):
        self.acknowledged = acknowledged
        self.last_offset = last_offset
        self.cause = cause
        super().__init__(f"produce failed after {acknowledged} records: {cause}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _unreachable(exc: Unavailable, addrs: Sequence[str]) -> str:
    where = ", ".join(addrs) if addrs else "the cluster"
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        reason = getattr(cause, "verify_message", None) or cause
        return (f"the server at {where} presented a certificate that --ca-file does not "
                f"trust ({reason})")
    if isinstance(cause, ssl.SSLError):
        return f"TLS handshake with {where} failed: {getattr(cause, 'reason', None) or cause}"
    if isinstance(cause, (StreamTerminatedError, ProtocolError, ConnectionResetError, EOFError)):
        # With TLS 1.3 the server checks the client certificate after the client considers
        # the handshake done, so a rejected certificate looks like a dropped connection.
        return (f"{where} closed the connection: the cluster does not accept this client "
                "certificate (is --cert-file signed by the cluster's CA?), or it holds as "
                "many connections as it takes (see dcl_rpc_connections)")
    if isinstance(cause, ConnectionRefusedError):
        return (f"cannot reach the cluster at {where}: connection refused "
                "(is it running? `make run` starts a local one)")
    if isinstance(cause, TimeoutError):
        return f"cannot reach the cluster at {where}: timed out"
    if isinstance(cause, OSError):
        return f"cannot reach the cluster at {where}: {cause.strerror or cause}"
    return f"cluster unavailable at {where}: {exc}"


def describe(exc: BaseException, addrs: Sequence[str] = ()) -> str | None:
    """One line for a failure the user caused or must act on; None for a bug."""
    if isinstance(exc, CliError):
        return str(exc)
    if isinstance(exc, PartialProduce):
        done = (f"{exc.acknowledged} records were appended (up to offset {exc.last_offset})"
                if exc.acknowledged else "no record was appended")
        cause = describe(exc.cause, addrs) or str(exc.cause)
        return f"{cause}; {done}"
    if isinstance(exc, ProduceOutcomeUnknown):
        return (f"no answer from {exc.address} for a produce: its records may or may not "
                f"have been appended ({_one_line(repr(exc.cause))})")
    if isinstance(exc, BatchPartiallyWritten):
        return describe(exc.cause, addrs)
    if isinstance(exc, OffsetOutOfRange):
        return str(exc)
    if isinstance(exc, PermissionDenied):
        return (f"permission denied: {exc} (the certificate's CN lacks this right in the "
                "cluster's ACL policy)")
    if isinstance(exc, Unavailable):
        return _one_line(_unreachable(exc, addrs))
    if isinstance(exc, NotLeader):
        return f"no leader accepted the write: {exc}"
    if isinstance(exc, InvalidRequest):
        return f"invalid request: {exc}"
    if isinstance(exc, RemoteError):
        return f"server error: {exc}"
    if isinstance(exc, DclError):
        return _one_line(str(exc))
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return None


def fail(message: str) -> NoReturn:
    """Print ``error: message`` (one line) on stderr and exit 1."""
    typer.echo(f"error: {_one_line(message)}", err=True)
    raise typer.Exit(EXIT_ERROR)


@contextlib.contextmanager
def user_errors(addrs: Sequence[str] = ()) -> Iterator[None]:
    """Turn what ``describe`` knows into ``error: ...`` on stderr and exit 1."""
    try:
        yield
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:
        # The reader went away (`dcl consume | head`): stop quietly, as `cat` does, and keep
        # the interpreter from complaining while it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(EXIT_BROKEN_PIPE) from None
    except Exception as exc:
        message = describe(exc, addrs)
        if message is None:
            raise
        fail(message)
