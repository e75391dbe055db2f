"""Opening sockets: listen sockets and relay sockets, separate IPv4 and IPv6
sockets (IPV6_V6ONLY), non-blocking."""

from __future__ import annotations

import errno
import socket

from .config import Endpoint

SOCKET_BUFFER = 4 * 1024 * 1024
RELAY_SOCKET_BUFFER = 1024 * 1024

_IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
_IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
_IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
_IPV6_PMTUDISC_DO = getattr(socket, "IPV6_PMTUDISC_DO", 2)


class StartupError(Exception):
    """A one-line reason turnd cannot start (port in use, address not on this host)."""


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _describe(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "address not available on this host"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    return exc.strerror or str(exc)


def set_buffers(sock: socket.socket, size: int) -> None:
    """SO_RCVBUF and SO_SNDBUF (the kernel grants up to net.core.rmem_max / wmem_max)."""
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
        except OSError:
            pass


def _bound(kind: str, host: str, port: int, *, dont_fragment: bool = False,
           reuseport: bool = False) -> socket.socket:
    """A bound, non-blocking socket; kind is "udp", "relay" (UDP) or "tcp" (listening).
    ``reuseport``: SO_REUSEPORT, so that worker processes each have a socket on the port.
    Raises OSError."""
    fam = _family(host)
    sock = socket.socket(fam, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    try:
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if fam == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == "tcp":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            set_buffers(sock, SOCKET_BUFFER if kind == "udp" else RELAY_SOCKET_BUFFER)
        if dont_fragment:
            if fam == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DO)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER, _IPV6_PMTUDISC_DO)
        sock.bind((host, port))
        if kind == "tcp":
            sock.listen(512)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def open_socket(kind: str, host: str, port: int, reuseport: bool = False,
                what: str | None = None) -> socket.socket:
    """A bound, non-blocking listen socket; kind is "udp" or "tcp"."""
    try:
        return _bound(kind, host, port, reuseport=reuseport)
    except OSError as exc:
        raise StartupError(f"cannot listen on {what or kind} {Endpoint(host, port)}: "
                           f"{_describe(exc)}") from None


def open_relay_socket(host: str, port: int, dont_fragment: bool) -> socket.socket:
    """A bound, non-blocking UDP relay socket (DONT-FRAGMENT: IP_MTU_DISCOVER=DO).
    Raises OSError (EADDRINUSE when another program has the port)."""
    return _bound("relay", host, port, dont_fragment=dont_fragment)


def host_addresses() -> tuple[str, ...]:
    """Every IP address of this host (Linux: /proc/net/fib_trie's local /32s and
    /proc/net/if_inet6), in the text recvfrom uses.  turnd counts them as its own: a
    client may not relay to them (another service on the host, or turnd itself through a
    wildcard listen) unless ``[peers] allow`` names them.  Empty where /proc can't tell."""
    found: set[str] = set()
    try:
        with open("/proc/net/fib_trie") as f:
            current = None
            for line in f:
                text = line.strip()
                if text.startswith("|--"):
                    current = text[3:].strip()
                elif current and text.startswith("/32 host LOCAL"):
                    found.add(current)
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                fields = line.split()
                if fields and len(fields[0]) == 32:
                    found.add(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(fields[0])))
    except (OSError, ValueError):
        pass
    return tuple(sorted(found))


def local_address(sock: socket.socket) -> tuple[str, int]:
    addr = sock.getsockname()
    return (addr[0], addr[1])
