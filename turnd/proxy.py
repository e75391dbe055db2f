"""The PROXY protocol, versions 1 and 2 (HAProxy's proxy-protocol.txt), sans-I/O: what a
trusted reverse proxy or load balancer (nginx's stream module with ``proxy_protocol on``,
HAProxy with ``send-proxy`` or ``send-proxy-v2``) writes at the start of a TCP connection to
say whose it is.  turnd reads it only from ``[server] proxy_protocol`` sources.

``parse_untrusted(buf)`` looks at the first bytes of a connection: None while more bytes are
needed, else ``(client, consumed)`` where ``client`` is the (ip, port) the proxy speaks for,
or None for a LOCAL / UNKNOWN header (the proxy's own connection, e.g. a health check: the
connection's own address stands).  Anything else raises ``ProxyHeaderError``.  Work is
linear in ``len(buf)``, which the caller bounds (``MAX_HEADER``).
"""

from __future__ import annotations

import socket

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included (proxy-protocol.txt §2.1)
MAX_HEADER = 16 + 1024  # v2: the fixed part and the addresses, TLVs up to 1 KiB (ours are ignored)


class ProxyHeaderError(Exception):
    """Not a PROXY header turnd accepts (the caller closes the connection and counts it)."""


def looks_like_proxy(first: bytes) -> bool:
    """Do these first bytes start a PROXY header (to tell one from an untrusted source)?"""
    n = min(len(first), 12)
    return n > 0 and (first[:n] == V2_SIGNATURE[:n] or first[:min(n, 6)] == V1_PREFIX[:min(n, 6)])


def parse_untrusted(buf: bytes) -> tuple[tuple[str, int] | None, int] | None:
    if buf[:1] == b"P":
        return _v1(buf)
    if buf[:1] == b"\r":
        return _v2(buf)
    raise ProxyHeaderError("no PROXY header")


def _v1(buf: bytes):
    end = buf.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buf) >= V1_MAX or buf[:len(V1_PREFIX)] != V1_PREFIX[:len(buf)]:
            raise ProxyHeaderError("v1: no CRLF within 107 bytes")
        return None
    fields = buf[:end].split(b" ")
    if fields[0] != b"PROXY" or len(fields) < 2:
        raise ProxyHeaderError("v1: not a PROXY line")
    if fields[1] == b"UNKNOWN":
        return None, end + 2
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("v1: expected PROXY TCP4|TCP6 src dst sport dport")
    family = socket.AF_INET if fields[1] == b"TCP4" else socket.AF_INET6
    ip = _ip(family, fields[2].decode("ascii", "replace"))
    _ip(family, fields[3].decode("ascii", "replace"))
    port = _port(fields[4])
    _port(fields[5])
    return (ip, port), end + 2


def _ip(family: int, text: str) -> str:
    try:
        return _text(family, socket.inet_pton(family, text))
    except (OSError, ValueError):
        raise ProxyHeaderError("v1: bad address") from None


def _text(family: int, raw: bytes) -> str:
    """inet_ntop's text, as recvfrom and accept give it; an IPv4-mapped IPv6 address (a
    dual-stack proxy's way of writing an IPv4 client) is the IPv4 address."""
    if family == socket.AF_INET6 and raw[:12] == b"\0" * 10 + b"\xff\xff":
        family, raw = socket.AF_INET, raw[12:]
    return socket.inet_ntop(family, raw)


def _port(field: bytes) -> int:
    if not field.isdigit() or len(field) > 5 or (len(field) > 1 and field[:1] == b"0"):
        raise ProxyHeaderError("v1: bad port")
    port = int(field)
    if port > 65535:
        raise ProxyHeaderError("v1: bad port")
    return port


def _v2(buf: bytes):
    n = min(len(buf), 12)
    if buf[:n] != V2_SIGNATURE[:n]:
        raise ProxyHeaderError("v2: bad signature")
    if len(buf) < 16:
        return None
    version, command = buf[12] >> 4, buf[12] & 0x0F
    if version != 2 or command > 1:
        raise ProxyHeaderError("v2: unknown version or command")
    length = (buf[14] << 8) | buf[15]
    if 16 + length > MAX_HEADER:
        raise ProxyHeaderError("v2: header too long")
    if len(buf) < 16 + length:
        return None
    consumed = 16 + length
    if command == 0:  # LOCAL: the proxy's own connection (a health check)
        return None, consumed
    family = buf[13]
    if family == 0x11:  # TCP over IPv4: src, dst (4 bytes each), sport, dport
        if length < 12:
            raise ProxyHeaderError("v2: short IPv4 addresses")
        ip = _text(socket.AF_INET, bytes(buf[16:20]))
        return (ip, (buf[24] << 8) | buf[25]), consumed
    if family == 0x21:  # TCP over IPv6: src, dst (16 bytes each), sport, dport
        if length < 36:
            raise ProxyHeaderError("v2: short IPv6 addresses")
        ip = _text(socket.AF_INET6, bytes(buf[16:32]))
        return (ip, (buf[48] << 8) | buf[49]), consumed
    if family == 0x00:  # UNSPEC: as LOCAL
        return None, consumed
    raise ProxyHeaderError("v2: not TCP over IPv4 or IPv6")
