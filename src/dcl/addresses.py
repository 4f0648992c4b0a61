"""``host:port`` strings, IPv6 included, and the listening sockets bound to them.

One parser for every place an address is read (flags, GetServers, the `dcl-leader` hint,
Raft peers, gossip seeds), so an IPv6 literal is written ``[::1]:8400`` everywhere and a
socket is never handed a host with its brackets still on.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from typing import Any

__all__ = ["ConnectionCap", "join_host_port", "split_host_port", "tcp_listener"]


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as (host without brackets, port).

    An IPv6 literal without brackets (``::1:8400``, as earlier versions advertised it) is
    still read, port last: it can mean nothing else, since the port is required. Raises
    ValueError naming the address when it is not one: no port, a port that is not a
    number from 0 to 65535, an empty host, whitespace, or a stray bracket.
    """
    host, sep, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if ("[" in host or "]" in host or any(c.isspace() for c in address)
            or (":" in host and not bracketed and not _is_ipv6(host))):
        host = ""
    if (not sep or not host or not (port.isascii() and port.isdigit())
            or int(port) > 65535):
        raise ValueError(f"not a host:port address: {address!r} (an IPv6 host goes in "
                         "brackets: [::1]:8400)")
    return host, int(port)


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def join_host_port(host: str, port: int) -> str:
    """The inverse of `split_host_port`: brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ConnectionCap:
    """At most `total` connections open at once on a listening socket, and at most
    `per_host` from one address (0: no such cap), counted from accept.

    Every connection holds a file descriptor from accept on, before TLS or any byte: a
    host that opens connections and sends nothing would otherwise use up the process's
    descriptors, and the node then fails to open its own files and stops. Past a cap a
    connection is closed at once, unread, which costs no TLS work.
    """

    #: A full cap looks for connections closed since at most this often: pruning is
    #: O(open), and a flood must not turn every refused accept into such a pass.
    PRUNE_SECONDS = 0.1

    def __init__(self, total: int, per_host: int = 0) -> None:
        if total < 1 or per_host < 0:
            raise ValueError(f"a connection cap needs total >= 1 and per_host >= 0, "
                             f"not {total}, {per_host}")
        self.total = total
        self.per_host = per_host
        #: Connections refused since start, by the cap that refused them.
        self.refused = {"total": 0, "per_host": 0}
        self._open: list[tuple[socket.socket, str]] = []
        self._by_host: dict[str, int] = {}
        self._pruned_at = float("-inf")

    @property
    def open(self) -> int:
        """Connections accepted and not yet closed."""
        self._prune()
        return len(self._open)

    def admit(self, conn: socket.socket, host: str) -> bool:
        """Count ``conn`` (from ``host``) in, or say it is one too many."""
        over = self._over(host)
        if over and time.monotonic() - self._pruned_at >= self.PRUNE_SECONDS:
            self._prune()
            over = self._over(host)
        if over:
            self.refused[over] += 1
            return False
        self._open.append((conn, host))
        self._by_host[host] = self._by_host.get(host, 0) + 1
        return True

    def _over(self, host: str) -> str | None:
        if len(self._open) >= self.total:
            return "total"
        if self.per_host and self._by_host.get(host, 0) >= self.per_host:
            return "per_host"
        return None

    def _prune(self) -> None:
        # A socket its transport closed reads fileno() -1; the transport holds the same
        # object accept returned.
        self._pruned_at = time.monotonic()
        self._open = [(conn, host) for conn, host in self._open if conn.fileno() != -1]
        self._by_host = {}
        for _, host in self._open:
            self._by_host[host] = self._by_host.get(host, 0) + 1


class _CappedListener(socket.socket):
    """A listening socket whose accept applies a ConnectionCap. asyncio accepts through
    it; a ConnectionAbortedError there means "nothing to serve", and the next pending
    connection is accepted on the next turn."""

    cap: ConnectionCap

    def accept(self) -> tuple[socket.socket, Any]:
        conn, addr = super().accept()
        if not self.cap.admit(conn, str(addr[0])):
            conn.close()
            raise ConnectionAbortedError("connection cap reached")
        return conn, addr


def tcp_listener(host: str, port: int, backlog: int,
                 cap: ConnectionCap | None = None) -> socket.socket:
    """A non-blocking listening TCP socket on host (an IPv6 literal without brackets, or
    IPv4), for servers that must know their port (0: a free one) without reaching into
    the library that serves on it; with ``cap``, accept applies it.

    proto is IPPROTO_TCP: asyncio only sets TCP_NODELAY on accepted sockets whose proto
    says TCP, and without it Nagle + delayed ACK add ~40 ms to every small reply.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = (socket.socket if cap is None else _CappedListener)(
        family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    if isinstance(sock, _CappedListener) and cap is not None:
        sock.cap = cap
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
