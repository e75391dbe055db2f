"""``turnd migrate-coturn``: a turnd.toml from coturn's turnserver.conf (the options in common
use), and, line by line, what could not be mapped and why.

coturn's syntax: one option per line, ``name``, ``name=value`` or ``name value``, ``#``
comments; options may repeat (listening-ip, user, denied-peer-ip, ...).
"""

from __future__ import annotations

import ipaddress

from .tools import toml_value

# Options that need nothing in turnd: (reason).  Everything else unknown is reported too.
NOT_NEEDED = {
    "lt-cred-mech": "long-term credentials are turnd's only mechanism",
    "fingerprint": "turnd adds FINGERPRINT when the request had one",
    "no-multicast-peers": "turnd's default peer policy refuses multicast",
    "no-loopback-peers": "turnd's default peer policy refuses loopback",
    "no-cli": "turnd has no telnet CLI",
    "syslog": "turnd logs to stderr; under systemd that is the journal",
    "simple-log": "turnd logs to stderr; under systemd that is the journal",
    "verbose": "[log] level = \"debug\" if you want more",
    "Verbose": "[log] level = \"debug\" if you want more",
    "no-rfc5780": "turnd does not implement RFC 5780 NAT behaviour discovery",
    "no-stun-backward-compatibility": "turnd speaks RFC 8489 (and answers RFC 5389 clients)",
    "response-origin-only-with-rfc5780": "turnd sends no RESPONSE-ORIGIN",
    "pidfile": "systemd tracks turnd's process; turnd drain/reload find it",
    "no-tlsv1": "turnd serves TLS 1.2 and 1.3 only",
    "no-tlsv1_1": "turnd serves TLS 1.2 and 1.3 only",
    "no-dtls": "turnd serves no DTLS",
    "mobility": "RFC 8016 mobility is not implemented (browsers don't use it)",
    "secure-stun": "turnd answers Binding requests without authentication, as RFC 8489 does",
    "server-name": "the realm is server.realm",
    "no-software-attribute": "turnd sends SOFTWARE only when server.software is set",
    "cli-password": "turnd has no telnet CLI",
    "web-admin": "turnd has no web admin; metrics at [metrics] listen",
}


class Migration:
    def __init__(self) -> None:
        self.listen_ips: list[str] = []
        self.port = 3478
        self.tls_port = 5349
        self.relay_ips: list[str] = []
        self.external: list[str] = []
        self.min_port, self.max_port = 49152, 65535
        self.realm = ""
        self.users: dict[str, str] = {}
        self.secrets: list[str] = []
        self.use_auth_secret = False
        self.cert = self.key = ""
        self.deny: list[str] = []
        self.allow: list[str] = []
        self.limits: dict[str, int] = {}
        self.nonce_lifetime: int | None = None
        self.no_tls = False
        self.no_udp = self.no_tcp = False
        self.metrics = False
        self.metrics_port = 9641
        self.alternate = ""
        self.notes: list[str] = []  # "line N: option: why not mapped"

    def note(self, lineno: int, option: str, why: str) -> None:
        self.notes.append(f"line {lineno}: {option}: {why}")


def _ranges(value: str) -> list[str]:
    """coturn peer ranges: "a.b.c.d", "a-b" or a CIDR -> CIDRs."""
    if "-" in value:
        lo, hi = (ipaddress.ip_address(v.strip()) for v in value.split("-", 1))
        if lo.version != hi.version:
            raise ValueError("a range of two address families")
        return [str(n) for n in ipaddress.summarize_address_range(lo, hi)]
    return [str(ipaddress.ip_network(value.strip(), strict=False))]


def parse_coturn(text: str) -> Migration:
    m = Migration()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "=" in line:
            name, value = (p.strip() for p in line.split("=", 1))
        else:
            name, _, value = line.partition(" ")
            value = value.strip()
        name = name.lstrip("-")
        try:
            _option(m, lineno, name, value)
        except ValueError as exc:
            m.note(lineno, name, f"not understood ({exc})")
    return m


def _option(m: Migration, n: int, name: str, value: str) -> None:
    if name in ("listening-port", "port"):
        m.port = int(value)
    elif name in ("tls-listening-port",):
        m.tls_port = int(value)
    elif name in ("listening-ip", "L"):
        m.listen_ips.append(str(ipaddress.ip_address(value)))
    elif name in ("relay-ip", "E"):
        m.relay_ips.append(str(ipaddress.ip_address(value)))
    elif name in ("external-ip", "X"):
        m.external.append(value)
    elif name == "min-port":
        m.min_port = int(value)
    elif name == "max-port":
        m.max_port = int(value)
    elif name in ("realm", "r"):
        m.realm = value
    elif name in ("user", "u"):
        user, sep, password = value.partition(":")
        if not sep:
            raise ValueError("expected user:password")
        m.users[user] = password
    elif name == "use-auth-secret":
        m.use_auth_secret = True
    elif name == "static-auth-secret":
        m.secrets.append(value)
    elif name == "cert":
        m.cert = value
    elif name == "pkey":
        m.key = value
    elif name == "denied-peer-ip":
        m.deny += _ranges(value)
    elif name == "allowed-peer-ip":
        m.allow += _ranges(value)
    elif name == "allow-loopback-peers":
        m.allow += ["127.0.0.0/8", "::1/128"]
    elif name == "user-quota":
        m.limits["user_quota"] = int(value)
    elif name == "total-quota":
        m.limits["total_quota"] = int(value)
    elif name == "max-allocate-lifetime":
        lifetime = int(value)
        m.limits["max_lifetime"] = min(max(lifetime, 60), 3600)
        if not 60 <= lifetime <= 3600:
            m.note(n, name, f"{lifetime} s is outside turnd's 60-3600: limits.max_lifetime = "
                   f"{m.limits['max_lifetime']}")
    elif name == "stale-nonce":
        m.nonce_lifetime = int(value) if value else 600
    elif name in ("channel-lifetime", "permission-lifetime"):
        fixed = 600 if name == "channel-lifetime" else 300
        if value and int(value) != fixed:
            m.note(n, name, f"turnd uses RFC 8656's {fixed} s; {value} is not configurable")
    elif name == "no-udp":
        m.no_udp = True
        m.note(n, name, "turnd always serves UDP on server.listen (browsers need it)")
    elif name == "no-tcp":
        m.no_tcp = True
        m.note(n, name, "turnd always serves TCP on server.listen's ports")
    elif name == "no-tls":
        m.no_tls = True
    elif name == "log-file":
        m.note(n, name, "turnd logs to stderr (the journal under systemd); [log] format = "
               "\"json\" for machines")
    elif name == "prometheus":
        m.metrics = True
    elif name == "prometheus-port":
        m.metrics_port = int(value)
    elif name == "alternate-server":
        if m.alternate:
            m.note(n, name, "turnd names one server.alternate; the first is kept")
        else:
            m.alternate = value
    elif name == "proc-user" or name == "proc-group":
        m.note(n, name, "systemd/turnd.service runs turnd as its own unprivileged user "
               "(turnd, from systemd/turnd.sysusers)")
    elif name in NOT_NEEDED:
        m.note(n, name, f"not needed: {NOT_NEEDED[name]}")
    else:
        m.note(n, name, "not known to turnd")


def _endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def to_toml(m: Migration) -> str:
    out = ["# Made by turnd migrate-coturn; check it with: turnd check-config FILE", ""]
    listen_ips = m.listen_ips or ["0.0.0.0", "::"]
    out.append("[server]")
    out.append(f"listen = {toml_value([_endpoint(ip, m.port) for ip in listen_ips])}")
    if m.cert and m.key and not m.no_tls:
        out.append(f"tls_listen = {toml_value([_endpoint(ip, m.tls_port) for ip in listen_ips])}")
    if m.realm:
        out.append(f"realm = {toml_value(m.realm)}")
    if m.alternate:
        host, sep, port = m.alternate.rpartition(":")
        out.append(f"alternate = {toml_value(_alternate(m.alternate))}")
    if m.cert and m.key and not m.no_tls:
        out += ["", "[tls]", f"cert = {toml_value(m.cert)}", f"key = {toml_value(m.key)}"]
    out += ["", "[auth]"]
    if m.users:
        out.append(f"users = {toml_value(m.users)}")
    if m.secrets and m.use_auth_secret:
        out.append(f"secrets = {toml_value(m.secrets)}")
    if m.nonce_lifetime is not None:
        out.append(f"nonce_lifetime = {min(max(m.nonce_lifetime, 30), 86400)}")
    out += ["", "[relay]", f'ports = "{m.min_port}-{m.max_port}"']
    relay_ips = m.relay_ips or [ip for ip in m.listen_ips if not ipaddress.ip_address(ip).is_unspecified]
    if not relay_ips and not m.listen_ips:
        relay_ips = _guess_relay_addresses()
        if relay_ips:
            m.notes.append(f"no listening-ip or relay-ip: relay.addresses {relay_ips} is this "
                           "host's first global address of each family: check it")
    if relay_ips:
        out.append(f"addresses = {toml_value(relay_ips)}")
    external = {}
    for value in m.external:
        public, sep, private = value.partition("/")
        if sep:
            external[private] = public
        elif len(relay_ips) == 1:
            external[relay_ips[0]] = public
        else:
            m.notes.append(f"external-ip={value}: with no private address after '/', turnd "
                           "needs relay.addresses to know which address it replaces; set "
                           "relay.external by hand")
    if external:
        out.append(f"external = {toml_value(external)}")
    if m.allow or m.deny:
        out += ["", "[peers]"]
        if m.allow:
            out.append(f"allow = {toml_value(m.allow)}")
        if m.deny:
            out.append(f"deny = {toml_value(m.deny)}")
    if m.limits:
        out += ["", "[limits]"] + [f"{k} = {v}" for k, v in m.limits.items()]
    out += ["", "[metrics]", f'listen = "{f"127.0.0.1:{m.metrics_port}" if m.metrics else ""}"']
    if not relay_ips:
        m.notes.append("no listening-ip: coturn listens everywhere; turnd listens on 0.0.0.0 and "
                       "[::] and needs relay.addresses (the host's public IPv4 and IPv6): set it")
    if m.users and not m.realm:
        m.notes.append("no realm: turnd's default realm is \"turnd\"; keys of users given as "
                       "0x... were made with coturn's realm and must use the same one")
    return "\n".join(out) + "\n"


def _guess_relay_addresses() -> list[str]:
    from .sockets import host_addresses
    out: dict[int, str] = {}
    for ip in host_addresses():
        addr = ipaddress.ip_address(ip)
        if addr.is_global:
            out.setdefault(addr.version, ip)
    return [out[v] for v in sorted(out)]


def _alternate(value: str) -> str:
    """coturn's alternate-server: "ip", "ip:port", "[v6]:port" or a bare IPv6 address."""
    try:
        return _endpoint(str(ipaddress.ip_address(value.strip("[]"))), 3478)  # no port
    except ValueError:
        return value
