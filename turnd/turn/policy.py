"""Which peers a client may reach (sans-I/O).

By default every loopback, private (RFC 1918, CGNAT, ULA), link-local,
multicast, reserved or unspecified address is refused, and so is the same
address carried inside IPv6 (IPv4-mapped, IPv4-compatible, 6to4, NAT64,
Teredo).  ``[peers] allow`` and ``[peers] deny`` CIDRs override the
defaults; between them the most specific match decides (deny on a tie).
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_DENY_V4 = [
    "0.0.0.0/8",        # "this network", incl. 0.0.0.0 (CVE-2020-26262)
    "10.0.0.0/8",       # RFC 1918
    "100.64.0.0/10",    # CGNAT (RFC 6598)
    "127.0.0.0/8",      # loopback
    "169.254.0.0/16",   # link-local, incl. 169.254.169.254 cloud metadata
    "172.16.0.0/12",    # RFC 1918
    "192.0.0.0/24",     # IETF protocol assignments
    "192.0.2.0/24",     # TEST-NET-1
    "192.88.99.0/24",   # 6to4 relay anycast
    "192.168.0.0/16",   # RFC 1918
    "198.18.0.0/15",    # benchmarking
    "198.51.100.0/24",  # TEST-NET-2
    "203.0.113.0/24",   # TEST-NET-3
    "224.0.0.0/4",      # multicast
    "240.0.0.0/4",      # reserved, incl. broadcast
]
DEFAULT_DENY_V6 = [
    "::/128",           # unspecified
    "::1/128",          # loopback
    "::/96",            # IPv4-compatible (deprecated) - the embedded address is checked too
    "100::/64",         # discard-only
    "2001:db8::/32",    # documentation
    "fc00::/7",         # unique local (ULA)
    "fe80::/10",        # link-local
    "fec0::/10",        # site-local (deprecated)
    "ff00::/8",         # multicast
]
DEFAULT_DENY = [ipaddress.ip_network(n) for n in DEFAULT_DENY_V4 + DEFAULT_DENY_V6]

# Every check below works on integers: parsing a peer's text once costs microseconds,
# and a CreatePermission full of fresh IPv6 peers can't make the policy expensive.
Range = tuple[int, int, int]  # (first, last, prefix length)


def _range(net: IPNetwork) -> Range:
    return int(net.network_address), int(net.broadcast_address), net.prefixlen


def _ranges(nets) -> tuple[list[Range], list[Range]]:
    """(IPv4 ranges, IPv6 ranges)"""
    v4 = [_range(n) for n in nets if n.version == 4]
    v6 = [_range(n) for n in nets if n.version == 6]
    return v4, v6


_DEFAULT = _ranges(DEFAULT_DENY)
_MAPPED_OR_COMPAT = 0           # n >> 32 == 0 (compatible) or 0xFFFF (mapped)
_SIXTOFOUR = 0x2002             # n >> 112
_NAT64 = int(ipaddress.IPv6Address("64:ff9b::")) >> 32
_NAT64_LOCAL = int(ipaddress.IPv6Address("64:ff9b:1::")) >> 80
_TEREDO = 0x20010000            # n >> 96


def parse_ip(ip: str) -> tuple[int, int] | None:
    """(4 or 6, the address as an integer), or None for text that is not an IP."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return addr.version, int(addr)


def embedded_ipv4_ints(n: int) -> list[int]:
    """The IPv4 addresses an IPv6 address (as an integer) carries, and could be
    translated to: IPv4-mapped, -compatible, 6to4, NAT64 (both prefixes), Teredo."""
    out = []
    high = n >> 32
    if high == 0xFFFF or (high == _MAPPED_OR_COMPAT and n > 1):
        out.append(n & 0xFFFFFFFF)
    if n >> 112 == _SIXTOFOUR:
        out.append((n >> 80) & 0xFFFFFFFF)
    if high == _NAT64 or n >> 80 == _NAT64_LOCAL:
        out.append(n & 0xFFFFFFFF)
    if n >> 96 == _TEREDO:
        out.append((n >> 64) & 0xFFFFFFFF)  # Teredo server
        out.append(~n & 0xFFFFFFFF)         # client, obfuscated
    return out


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (and could be translated to)."""
    return [ipaddress.IPv4Address(v4) for v4 in embedded_ipv4_ints(int(ip))]


class PeerPolicy:
    """Decides by IP address; the port-level rules (turnd's own endpoints)
    live in the protocol core, which knows which relays are live."""

    def __init__(self, allow: Iterable[str | IPNetwork] = (),
                 deny: Iterable[str | IPNetwork] = ()):
        self.allow = [ipaddress.ip_network(n, strict=False) for n in allow]
        self.deny = [ipaddress.ip_network(n, strict=False) for n in deny]
        self._allow = _ranges(self.allow)
        self._deny = _ranges(self.deny)
        self._cache: dict[str, bool] = {}

    def _explicit(self, version: int, n: int) -> bool | None:
        i = 0 if version == 4 else 1
        best_len, verdict = -1, None
        for first, last, plen in self._deny[i]:
            if first <= n <= last and plen >= best_len:
                best_len, verdict = plen, False
        for first, last, plen in self._allow[i]:
            if first <= n <= last and plen > best_len:
                best_len, verdict = plen, True
        return verdict

    def explicitly_allowed(self, ip: str) -> bool:
        parsed = parse_ip(ip)
        return parsed is not None and self._explicit(*parsed) is True

    def _allowed_one(self, version: int, n: int) -> bool:
        verdict = self._explicit(version, n)
        if verdict is not None:
            return verdict
        return not any(first <= n <= last for first, last, _ in _DEFAULT[0 if version == 4 else 1])

    def allowed(self, ip: str) -> bool:
        """True when ``ip`` (text) may be a peer.  Cached: the answer never changes."""
        cached = self._cache.get(ip)
        if cached is not None:
            return cached
        parsed = parse_ip(ip)
        if parsed is None:
            return False
        version, n = parsed
        ok = self._allowed_one(version, n)
        if ok and version == 6:
            # An explicit allow of the IPv6 address itself stands; otherwise every
            # IPv4 address it carries must be allowed too.
            if self._explicit(6, n) is not True:
                ok = all(self._allowed_one(4, v4) for v4 in embedded_ipv4_ints(n))
        if len(self._cache) > 65536:
            self._cache.clear()
        self._cache[ip] = ok
        return ok
