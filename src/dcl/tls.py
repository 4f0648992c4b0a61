"""Mutual-TLS contexts for grpclib servers and clients, and the peer identity they yield.

Every connection on the RPC port is mutually authenticated: the server demands a client
certificate signed by the cluster CA (CERT_REQUIRED), so an unknown or missing certificate
fails the TLS handshake and the connection never reaches HTTP/2, let alone a handler. The
authenticated identity is the certificate's common name; the ACL keys on it.

Shared by dcl.server, dcl.client and dcl.agent, so it depends on neither of them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "ANONYMOUS",
    "CertificateError",
    "LiveContext",
    "TlsFiles",
    "ca_certificates",
    "certificate_validity",
    "client_context",
    "common_name",
    "format_utc",
    "issued_by_any",
    "peer_common_name",
    "server_context",
]

StrPath = str | PathLike[str]

#: Subject used when a connection carries no certificate; the ACL grants it nothing.
ANONYMOUS = "<anonymous>"

# HTTP/2 (RFC 7540 §9.2.2) forbids the legacy ciphers still enabled by default for TLS 1.2;
# a strict peer (grpcio) would reset the connection with INADEQUATE_SECURITY.
_H2_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def _configure(context: ssl.SSLContext, alpn: tuple[str, ...]) -> None:
    # Both ends demand and check the other's certificate; a client also checks the name.
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # No renegotiation (HTTP/2 forbids it anyway): a connection's peer identity is fixed.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_ciphers(_H2_CIPHERS)
    context.set_alpn_protocols(list(alpn))


class LiveContext(ssl.SSLContext):
    """A TLS context a reload replaces whole: connections begun after `use` get the
    context it was given, built from the new files by `renewed`.

    Whole, not loaded into: OpenSSL adds CAs to a context but never drops one, so loading
    new files into the same context would keep a CA taken out of the CA file trusted until
    a restart. Connections already open keep the context they began with (each SSLObject
    holds its own). Every user of a context (asyncio, grpclib) starts a connection through
    `wrap_bio`, which is where the swap takes effect.
    """

    _alpn: tuple[str, ...]
    _current: ssl.SSLContext

    def __new__(cls, protocol: ssl._SSLMethod, alpn: tuple[str, ...] = ("h2",)) -> LiveContext:
        context = super().__new__(cls, protocol)
        _configure(context, alpn)
        context._alpn = alpn
        context._current = context
        return context

    def renewed(self, files: TlsFiles) -> ssl.SSLContext:
        """A fresh context like this one (side, ALPN, hardening) holding only ``files``:
        their certificate and key, and their CAs as the only ones trusted."""
        fresh = ssl.SSLContext(self.protocol)
        _configure(fresh, self._alpn)
        files.load_into(fresh)
        return fresh

    def use(self, context: ssl.SSLContext) -> None:
        """New connections from now on use ``context`` (from `renewed`)."""
        self._current = context

    # Each goes to the context in use: this one until the first `use`. Called through
    # ssl.SSLContext itself, so that this one, when in use, gets the base behaviour.
    # Settings changed on this one after a `use` reach no connection: build a context
    # with them instead.
    def get_ca_certs(self, binary_form: bool = False) -> Any:
        return ssl.SSLContext.get_ca_certs(self._current, binary_form)

    def cert_store_stats(self) -> dict[str, int]:
        return ssl.SSLContext.cert_store_stats(self._current)

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: str | bytes | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        return ssl.SSLContext.wrap_bio(self._current, incoming, outgoing, server_side,
                                       server_hostname, session)

    def wrap_socket(self, sock: socket.socket, server_side: bool = False,
                    do_handshake_on_connect: bool = True, suppress_ragged_eofs: bool = True,
                    server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        return ssl.SSLContext.wrap_socket(self._current, sock, server_side,
                                          do_handshake_on_connect, suppress_ragged_eofs,
                                          server_hostname, session)


def server_context(
    cert_file: StrPath, key_file: StrPath, ca_file: StrPath, alpn: tuple[str, ...] = ("h2",)
) -> LiveContext:
    """A server context that only completes handshakes with clients the CA vouches for.
    ``alpn``: HTTP/2 for gRPC; the metrics endpoint speaks HTTP/1.1."""
    context = LiveContext(ssl.PROTOCOL_TLS_SERVER, alpn)
    context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    context.load_verify_locations(cafile=ca_file)
    return context


def client_context(
    cert_file: StrPath, key_file: StrPath, ca_file: StrPath, alpn: tuple[str, ...] = ("h2",)
) -> LiveContext:
    """A client context presenting our certificate and checking the server's name.

    grpclib passes the channel's host as ``server_hostname``, so connect by a name or IP the
    server certificate lists in its SANs (or set ``ssl_target_name_override``).
    """
    context = LiveContext(ssl.PROTOCOL_TLS_CLIENT, alpn)  # checks names by default
    context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    context.load_verify_locations(cafile=ca_file)
    return context


class CertificateError(ValueError):
    """A certificate, key or CA file that cannot serve: unreadable, not PEM, a key that is
    not the certificate's, or a certificate outside its validity period."""


def certificate_validity(cert_pem: bytes) -> tuple[float, float]:
    """(not before, not after) of the first certificate in PEM data, in Unix seconds."""
    from cryptography import x509  # here: only nodes read validity, clients never do

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate: {exc}") from None
    return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()


def ca_certificates(pem: bytes) -> frozenset[bytes]:
    """The certificates of a CA file, as DER: to compare two versions of the file."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        return frozenset(c.public_bytes(Encoding.DER)
                         for c in x509.load_pem_x509_certificates(pem))
    except ValueError as exc:
        raise CertificateError(f"not a PEM CA file: {exc}") from None


def issued_by_any(cert_der: bytes, cas: Iterable[bytes]) -> bool:
    """Whether one of ``cas`` (DER) signed this certificate (DER) itself. Only direct
    issue: a certificate under an intermediate CA is never matched (a connection showed
    us its leaf only), so what this picks out is certain."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError:
        return False
    for ca_der in cas:
        try:
            cert.verify_directly_issued_by(x509.load_der_x509_certificate(ca_der))
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


@dataclass(frozen=True)
class TlsFiles:
    """A certificate, its key and the trusted CAs, read and checked, to load into contexts."""

    cert: bytes
    key: bytes = field(repr=False)
    ca: bytes
    not_before: float
    not_after: float

    @classmethod
    def read(cls, cert_file: StrPath, key_file: StrPath, ca_file: StrPath, *,
             client_auth: bool = False, now: float | None = None) -> TlsFiles:
        """Each file read once, then checked: a certificate expired or not yet valid, a key
        that is not the certificate's (a file swapped in between, or half written), or a
        certificate the CA file does not vouch for raises CertificateError.

        The last is a real handshake, in memory, between scratch contexts holding these
        files: the certificate as a server's and, with ``client_auth`` (the peer
        certificate, which dials), also as a client's. So what peers would refuse after a
        reload is refused before it.
        """
        try:
            cert, key, ca = (Path(p).read_bytes() for p in (cert_file, key_file, ca_file))
        except OSError as exc:
            raise CertificateError(str(exc)) from None
        not_before, not_after = certificate_validity(cert)
        now = time.time() if now is None else now
        if not not_before <= now <= not_after:
            raise CertificateError(f"{cert_file} is valid from {format_utc(not_before)} "
                                   f"to {format_utc(not_after)}, not now "
                                   f"({format_utc(now)})")
        files = cls(cert, key, ca, not_before, not_after)
        try:
            files._trial_handshake(client_auth)
        except (ssl.SSLError, ValueError) as exc:
            raise CertificateError(f"{cert_file} / {key_file} / {ca_file}: {exc}") from None
        return files

    def _trial_handshake(self, client_auth: bool) -> None:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.load_into(server)  # raises if the key is not the certificate's
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False  # names are the renewal's business, not checked here
        if client_auth:
            server.verify_mode = ssl.CERT_REQUIRED
            self.load_into(client)
        else:
            client.load_verify_locations(cadata=self.ca.decode("ascii", errors="replace"))
        client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
        ends = (client.wrap_bio(client_in, client_out),
                server.wrap_bio(server_in, server_out, server_side=True))
        for _ in range(8):  # TLS 1.3 with a client certificate: done in four turns
            done = 0
            for end in ends:
                with contextlib.suppress(ssl.SSLWantReadError):
                    end.do_handshake()
                    done += 1
            server_in.write(client_out.read())
            client_in.write(server_out.read())
            if done == len(ends):
                return
        raise ValueError("a trial handshake with these files did not finish")

    def load_into(self, context: ssl.SSLContext) -> None:
        """Present this certificate and trust these CAs (besides any already trusted: to
        trust only these, load into a fresh context, as `LiveContext.renewed` does)."""
        with contextlib.ExitStack() as stack:
            # ssl loads only from paths: in-memory files, so the key never touches a disk.
            cert, key, ca = (stack.enter_context(_memory_file(d))
                             for d in (self.cert, self.key, self.ca))
            context.load_cert_chain(certfile=cert, keyfile=key)
            context.load_verify_locations(cafile=ca)


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    fd = os.memfd_create("dcl-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def format_utc(seconds: float) -> str:
    """Unix seconds as an ISO 8601 UTC time, for log lines and errors."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def common_name(cert: Mapping[str, Any] | None) -> str:
    """The subject CN of a ``getpeercert()`` dict, or ANONYMOUS when there is none."""
    if not cert:
        return ANONYMOUS
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ANONYMOUS


class _HasPeer(Protocol):
    # grpclib.protocol.Peer; typed structurally so both server streams and events fit.
    def cert(self) -> dict[str, Any] | None: ...


class _HasStreamPeer(Protocol):
    @property
    def peer(self) -> _HasPeer: ...


#: CN per TLS connection: ``getpeercert()`` builds a dict from the certificate on every call,
#: and a connection's verified peer certificate never changes (renegotiation is off).
_CN_BY_CONNECTION: weakref.WeakKeyDictionary[ssl.SSLObject, str] = weakref.WeakKeyDictionary()


def peer_common_name(stream: _HasStreamPeer) -> str:
    """The verified client CN of a grpclib server stream (or RecvRequest event)."""
    peer = stream.peer
    # grpclib's Peer keeps its transport private; without it, fall back to the uncached path.
    transport = getattr(peer, "_transport", None)
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if not isinstance(ssl_object, ssl.SSLObject):
        return common_name(peer.cert())
    cn = _CN_BY_CONNECTION.get(ssl_object)
    if cn is None:
        cn = _CN_BY_CONNECTION[ssl_object] = common_name(ssl_object.getpeercert())
    return cn
