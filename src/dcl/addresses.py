"""``host:port`` strings, IPv6 included.

One parser for every place an address is read (flags, GetServers, the `dcl-leader` hint,
Raft peers, gossip seeds), so an IPv6 literal is written ``[::1]:8400`` everywhere and a
socket is never handed a host with its brackets still on.
"""

from __future__ import annotations

__all__ = ["join_host_port", "split_host_port"]


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as (host without brackets, port).

    Raises ValueError naming the address when it is not one: no port, a port that is not
    a number from 0 to 65535, an empty host, or an IPv6 literal without brackets (whose
    last group would otherwise be taken for the port).
    """
    host, sep, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if ("[" in host or "]" in host) or (":" in host and not bracketed):
        host = ""  # a stray bracket, or an IPv6 literal whose last group looks like a port
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"not a host:port address: {address!r} (an IPv6 host goes in "
                         "brackets: [::1]:8400)")
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    """The inverse of `split_host_port`: brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
