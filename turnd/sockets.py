"""Opening listen sockets: separate IPv4 and IPv6 sockets, IPV6_V6ONLY, non-blocking."""

from __future__ import annotations

import errno
import socket

from .config import Endpoint

SOCKET_BUFFER = 4 * 1024 * 1024


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


def _set_buffers(sock: socket.socket) -> None:
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass


def open_socket(kind: str, host: str, port: int) -> socket.socket:
    """A bound, non-blocking socket; kind is "udp" or "tcp" (listening)."""
    fam = _family(host)
    sock = socket.socket(fam, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
    try:
        if fam == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == "tcp":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            _set_buffers(sock)
        sock.bind((host, port))
        if kind == "tcp":
            sock.listen(512)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        ep = Endpoint(host, port)
        raise StartupError(f"cannot listen on {kind} {ep}: {_describe(exc)}") from None
    return sock


def local_address(sock: socket.socket) -> tuple[str, int]:
    addr = sock.getsockname()
    return (addr[0], addr[1])
