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

_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_COMPAT = ipaddress.ip_network("::/96")
_SIXTOFOUR = ipaddress.ip_network("2002::/16")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_TEREDO = ipaddress.ip_network("2001::/32")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (and could be translated to)."""
    n = int(ip)
    out = []
    if ip in _MAPPED or (ip in _COMPAT and n > 1):
        out.append(ipaddress.IPv4Address(n & 0xFFFFFFFF))
    if ip in _SIXTOFOUR:
        out.append(ipaddress.IPv4Address((n >> 80) & 0xFFFFFFFF))
    if ip in _NAT64 or ip in _NAT64_LOCAL:
        out.append(ipaddress.IPv4Address(n & 0xFFFFFFFF))
    if ip in _TEREDO:
        out.append(ipaddress.IPv4Address((n >> 64) & 0xFFFFFFFF))  # Teredo server
        out.append(ipaddress.IPv4Address(~n & 0xFFFFFFFF))  # client, obfuscated
    return out


class PeerPolicy:
    """Decides by IP address; the port-level rules (turnd's own endpoints)
    live in the protocol core, which knows which relays are live."""

    def __init__(self, allow: Iterable[str | IPNetwork] = (),
                 deny: Iterable[str | IPNetwork] = ()):
        self.allow = [ipaddress.ip_network(n, strict=False) for n in allow]
        self.deny = [ipaddress.ip_network(n, strict=False) for n in deny]
        self._cache: dict[str, bool] = {}

    def _explicit(self, ip: IPAddr) -> bool | None:
        best_len, verdict = -1, None
        for net in self.deny:
            if ip.version == net.version and ip in net and net.prefixlen >= best_len:
                best_len, verdict = net.prefixlen, False
        for net in self.allow:
            if ip.version == net.version and ip in net and net.prefixlen > best_len:
                best_len, verdict = net.prefixlen, True
        return verdict

    def explicitly_allowed(self, ip: str) -> bool:
        return self._explicit(ipaddress.ip_address(ip)) is True

    def _allowed_one(self, ip: IPAddr) -> bool:
        verdict = self._explicit(ip)
        if verdict is not None:
            return verdict
        return not any(ip.version == net.version and ip in net for net in DEFAULT_DENY)

    def allowed(self, ip: str) -> bool:
        """True when ``ip`` (text) may be a peer.  Cached: the answer never changes."""
        cached = self._cache.get(ip)
        if cached is not None:
            return cached
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        ok = self._allowed_one(addr)
        if ok and addr.version == 6:
            # An explicit allow of the IPv6 address itself stands; otherwise every
            # IPv4 address it carries must be allowed too.
            if self._explicit(addr) is not True:
                ok = all(self._allowed_one(v4) for v4 in embedded_ipv4(addr))
        if len(self._cache) > 65536:
            self._cache.clear()
        self._cache[ip] = ok
        return ok
