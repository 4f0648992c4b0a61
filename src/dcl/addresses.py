"""``host:port`` strings, IPv6 included, and the listening sockets bound to them.

One parser for every place an address is read (flags, GetServers, the `dcl-leader` hint,
Raft peers, gossip seeds), so an IPv6 literal is written ``[::1]:8400`` everywhere and a
socket is never handed a host with its brackets still on.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import weakref
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

    Every connection holds a file descriptor from accept on, before TLS or any byte (and,
    once asyncio starts TLS on it, a 256 KiB buffer): a host that opens connections and
    sends nothing would otherwise use up the process's descriptors, and the node then
    fails to open its own files and stops.

    When the cap is full, the oldest connection that has not yet been `established` (its
    TLS handshake not finished: a legitimate one takes milliseconds) is cut to make room;
    only when every open connection is established is the new one refused. So a flood of
    silent connections cannot lock peers and clients out: each new one displaces the
    flood's oldest. Past `per_host`, a host's new connection is refused. A refused
    connection is closed unread, which costs no TLS work. Counts are exact: an accepted
    socket gives its place back when it is closed (or collected).
    """

    def __init__(self, total: int, per_host: int = 0) -> None:
        if total < 1 or per_host < 0:
            raise ValueError(f"a connection cap needs total >= 1 and per_host >= 0, "
                             f"not {total}, {per_host}")
        self.total = total
        self.per_host = per_host
        #: Connections shed since start: `evicted` (cut before its handshake finished, to
        #: make room), `total` and `per_host` (refused at accept by that cap).
        self.shed = {"evicted": 0, "total": 0, "per_host": 0}
        self._open = 0
        self._by_host: dict[str, int] = {}
        # Accepted and not yet established, oldest first: fd -> the socket, weakly (the
        # transport owns it).
        self._pending: dict[int, weakref.ref[socket.socket]] = {}

    @property
    def open(self) -> int:
        """Connections accepted and not yet closed."""
        return self._open

    def admit(self, conn: socket.socket, host: str) -> bool:
        """Count ``conn`` (from ``host``) in, cutting the oldest pending connection if the
        cap is full, or say it is one too many (the caller closes it)."""
        if self.per_host and self._by_host.get(host, 0) >= self.per_host:
            self.shed["per_host"] += 1
            return False
        if self._open >= self.total and not self._evict_oldest_pending():
            self.shed["total"] += 1
            return False
        self._open += 1
        self._by_host[host] = self._by_host.get(host, 0) + 1
        self._pending[conn.fileno()] = weakref.ref(conn)
        # Given back once, whichever comes first: close() or collection.
        conn._release = weakref.finalize(conn, self._release, host, conn.fileno())  # type: ignore[attr-defined]
        return True

    def established(self, fd: int) -> None:
        """The connection on ``fd`` finished its handshake: it is no longer cut to make
        room."""
        self._pending.pop(fd, None)

    def _evict_oldest_pending(self) -> bool:
        while self._pending:
            fd, ref = next(iter(self._pending.items()))
            del self._pending[fd]
            victim = ref()
            if victim is None or victim.fileno() == -1:
                continue
            # shutdown, not close: the descriptor stays its transport's until it sees the
            # end of the stream and closes it (a close here could hand the number to the
            # next accept while the transport still polls it).
            with contextlib.suppress(OSError):
                victim.shutdown(socket.SHUT_RDWR)
            victim._release()  # type: ignore[attr-defined]
            self.shed["evicted"] += 1
            return True
        return False

    def _release(self, host: str, fd: int) -> None:
        self._open -= 1
        left = self._by_host[host] - 1
        if left:
            self._by_host[host] = left
        else:
            del self._by_host[host]
        self._pending.pop(fd, None)


class _CountedSocket(socket.socket):
    """An accepted socket that gives its place in a ConnectionCap back when closed."""

    _release: weakref.finalize[[str, int], None]

    def close(self) -> None:
        super().close()
        release = getattr(self, "_release", None)
        if release is not None:
            release()

    def detach(self) -> int:
        release = getattr(self, "_release", None)
        if release is not None:
            release()
        return super().detach()


class _CappedListener(socket.socket):
    """A listening socket whose accept applies a ConnectionCap. asyncio accepts through
    it; a ConnectionAbortedError there means "nothing to serve", and what is still pending
    is accepted on the next turn."""

    cap: ConnectionCap
    #: Refused connections closed per accept call before giving the loop back: a flood is
    #: drained quickly, and the loop still turns.
    DRAIN = 64

    def accept(self) -> tuple[socket.socket, Any]:
        for _ in range(self.DRAIN):
            fd, addr = self._accept()  # type: ignore[attr-defined]
            conn = _CountedSocket(self.family, self.type, self.proto, fileno=fd)
            if socket.getdefaulttimeout() is None and self.gettimeout():
                conn.setblocking(True)  # as socket.accept does
            if self.cap.admit(conn, str(addr[0])):
                return conn, addr
            conn.close()
        raise ConnectionAbortedError("connection cap reached")


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
