"""``host:port`` strings, IPv6 included, and the listening sockets bound to them.

One parser for every place an address is read (flags, GetServers, the `dcl-leader` hint,
Raft peers, gossip seeds), so an IPv6 literal is written ``[::1]:8400`` everywhere and a
socket is never handed a host with its brackets still on.
"""

from __future__ import annotations

import ipaddress
import socket

__all__ = ["join_host_port", "split_host_port", "tcp_listener"]


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


def tcp_listener(host: str, port: int, backlog: int) -> socket.socket:
    """A non-blocking listening TCP socket on host (an IPv6 literal without brackets, or
    IPv4), for servers that must know their port (0: a free one) without reaching into
    the library that serves on it.

    proto is IPPROTO_TCP: asyncio only sets TCP_NODELAY on accepted sockets whose proto
    says TCP, and without it Nagle + delayed ACK add ~40 ms to every small reply.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
