"""Mutual-TLS contexts for grpclib servers and clients, and the peer identity they yield.

Every connection on the RPC port is mutually authenticated: the server demands a client
certificate signed by the cluster CA (CERT_REQUIRED), so an unknown or missing certificate
fails the TLS handshake and the connection never reaches HTTP/2, let alone a handler. The
authenticated identity is the certificate's common name; the ACL keys on it.

Shared by dcl.server, dcl.client and dcl.agent, so it depends on neither of them.
"""

from __future__ import annotations

import ssl
import weakref
from collections.abc import Mapping
from os import PathLike
from typing import Any, Protocol

__all__ = [
    "ANONYMOUS",
    "client_context",
    "common_name",
    "peer_common_name",
    "server_context",
]

StrPath = str | PathLike[str]

#: Subject used when a connection carries no certificate; the ACL grants it nothing.
ANONYMOUS = "<anonymous>"

# HTTP/2 (RFC 7540 §9.2.2) forbids the legacy ciphers still enabled by default for TLS 1.2;
# a strict peer (grpcio) would reset the connection with INADEQUATE_SECURITY.
_H2_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def _harden(context: ssl.SSLContext, alpn: tuple[str, ...] = ("h2",)) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # No renegotiation (HTTP/2 forbids it anyway): a connection's peer identity is fixed.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_ciphers(_H2_CIPHERS)
    context.set_alpn_protocols(list(alpn))
    return context


def server_context(
    cert_file: StrPath, key_file: StrPath, ca_file: StrPath, alpn: tuple[str, ...] = ("h2",)
) -> ssl.SSLContext:
    """A server context that only completes handshakes with clients the CA vouches for.
    ``alpn``: HTTP/2 for gRPC; the metrics endpoint speaks HTTP/1.1."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    context.load_verify_locations(cafile=ca_file)
    return _harden(context, alpn)


def client_context(
    cert_file: StrPath, key_file: StrPath, ca_file: StrPath, alpn: tuple[str, ...] = ("h2",)
) -> ssl.SSLContext:
    """A client context presenting our certificate and checking the server's name.

    grpclib passes the channel's host as ``server_hostname``, so connect by a name or IP the
    server certificate lists in its SANs (or set ``ssl_target_name_override``).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    context.load_verify_locations(cafile=ca_file)
    return _harden(context, alpn)


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
