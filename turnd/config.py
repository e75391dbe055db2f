"""Configuration: TOML read with tomllib into frozen attrs classes.

Every problem is a ``ConfigError`` whose message names the dotted key, e.g.
``server.listen[1]: "[::1]:99999": port must be 1-65535``.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from typing import Any

import attrs

from .auth import offered_algorithms, parse_hex_key
from .stun.integrity import saslprep


class ConfigError(Exception):
    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


@attrs.frozen
class Endpoint:
    host: str  # an IP address literal, IPv6 without brackets
    port: int

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.host).version

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@attrs.frozen
class ServerConfig:
    listen: tuple[Endpoint, ...] = (Endpoint("127.0.0.1", 3478), Endpoint("::1", 3478))
    realm: str = "turnd"
    software: str = ""
    workers: int = 1  # processes sharing the listen ports ("auto": one per CPU)
    tls_listen: tuple[Endpoint, ...] = ()  # TURN over TLS ("turns:"), usually 5349 or 443
    proxy_protocol: tuple[str, ...] = ()   # CIDRs of trusted proxies that send a PROXY header
    alternate: Endpoint | None = None      # while draining: 300 Try Alternate to this server


@attrs.frozen
class TlsConfig:
    cert: str = ""  # PEM: the certificate, then any chain
    key: str = ""   # PEM: its private key


@attrs.frozen
class AuthConfig:
    # (user, password) or (user, ("0x" + hex MD5 and/or SHA-256 key, ...))
    users: tuple[tuple[str, str | tuple[str, ...]], ...] = ()
    secrets: tuple[str, ...] = ()             # TURN REST API shared secrets
    nonce_lifetime: int = 600
    users_file: str = ""                      # more users, "user = key" lines (turnd user add)


@attrs.frozen
class RelayConfig:
    ports: tuple[int, int] = (49152, 65535)
    addresses: tuple[str, ...] = ()           # empty: the listen addresses
    external: tuple[tuple[str, str], ...] = ()  # (relay or listen IP, public IP)
    default_family: str = "ipv4"
    legacy_channel_numbers: bool = False      # also accept RFC 5766's 0x5000-0x7FFF


@attrs.frozen
class PeersConfig:
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()


@attrs.frozen
class LimitsConfig:
    user_quota: int = 0
    total_quota: int = 0
    ip_quota: int = 1000
    max_lifetime: int = 3600
    permissions_per_allocation: int = 64
    channels_per_allocation: int = 64
    unauthenticated_rate: int = 200
    max_attributes: int = 64
    tcp_connections: int = 4096
    tcp_connections_per_ip: int = 256
    tcp_first_message_timeout: int = 10
    tcp_idle_timeout: int = 300
    tls_handshake_timeout: int = 10
    tcp_connection_rate: int = 200  # new TCP/TLS connections per second per client address


@attrs.frozen
class LogConfig:
    level: str = "info"     # debug, info, warning, error
    format: str = "text"    # "text" or "json" (one object per line)
    client_addresses: str = "truncated"  # in logs: "truncated", "hashed", "full", "none"


@attrs.frozen
class MetricsConfig:
    listen: Endpoint | None = None  # Prometheus /metrics; None: off (a file's default: METRICS_DEFAULT)
    admin_token_file: str = ""      # /sessions from other than loopback: Bearer this token


METRICS_DEFAULT = "127.0.0.1:9641"  # coturn's prometheus port


@attrs.frozen
class SelftestConfig:
    enabled: bool = True  # GET / on the TCP and TLS ports answers the self-test page


@attrs.frozen
class Config:
    server: ServerConfig = ServerConfig()
    tls: TlsConfig = TlsConfig()
    auth: AuthConfig = AuthConfig()
    relay: RelayConfig = RelayConfig()
    peers: PeersConfig = PeersConfig()
    limits: LimitsConfig = LimitsConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    selftest: SelftestConfig = SelftestConfig()

    def relay_addresses(self) -> tuple[str, ...]:
        """The relay IP per family: [relay] addresses, else the first listen IP of each family."""
        if self.relay.addresses:
            return self.relay.addresses
        out: dict[int, str] = {}
        for ep in self.server.listen:
            out.setdefault(ep.family, ep.host)
        return tuple(out.values())


def parse_endpoint(text: str, key: str, *, allow_port_zero: bool = False) -> Endpoint:
    """Parse "host:port" ("[v6]:port" for IPv6)."""
    def fail(msg: str) -> ConfigError:
        return ConfigError(key, f'"{text}": {msg}')

    if not isinstance(text, str):
        raise ConfigError(key, f"must be a string like \"127.0.0.1:3478\", not {_tname(text)}")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise fail('expected "[IPv6]:port"')
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise fail('expected "host:port"')
        if ":" in host:
            raise fail('IPv6 addresses go in brackets: "[::1]:3478"')
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise fail(f"{host!r} is not an IP address") from None
    if not port_text.isdigit():
        raise fail("port must be a number")
    port = int(port_text)
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise fail("port must be 1-65535")
    return Endpoint(str(ip), port)


def _key_part(name: str) -> str:
    """A TOML key as it would be written in a dotted key: bare when it can be, else quoted
    ("10.0.0.5" holds dots, so it must be quoted to be read back)."""
    if name and all(ch.isascii() and (ch.isalnum() or ch in "-_") for ch in name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tname(value: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


_KIND_NAMES = {str: "a string", int: "an integer", bool: "a boolean", list: "a list",
               dict: "a table"}


class _Section:
    """Reads one TOML table, tracking which keys were used so unknown ones are errors."""

    def __init__(self, data: Any, name: str):
        if not isinstance(data, dict):
            raise ConfigError(name, f"must be a table, not {_tname(data)}")
        self.data = data
        self.name = name

    def key(self, k: str) -> str:
        return f"{self.name}.{k}"

    def get(self, k: str, kind: type, default: Any) -> Any:
        if k not in self.data:
            return default
        value = self.data[k]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ConfigError(self.key(k), f"must be {_KIND_NAMES[kind]}, not {_tname(value)}")
        return value

    def check_unknown(self, known: set[str]) -> None:
        for k in self.data:
            if k not in known:
                raise ConfigError(self.key(k), "unknown key")


def _text(section: _Section, k: str, default: str, *, max_chars: int = 127) -> str:
    value = section.get(k, str, default)
    if len(value) > max_chars or len(value.encode()) > 763:
        raise ConfigError(section.key(k), f"must be at most {max_chars} characters")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ConfigError(section.key(k), "must not contain control characters")
    return value


def _parse_server(raw: Any) -> ServerConfig:
    s = _Section(raw, "server")
    s.check_unknown({"listen", "realm", "software", "workers", "tls_listen", "proxy_protocol",
                     "alternate"})
    listen = ServerConfig().listen
    if "listen" in s.data:
        listen = _endpoints(s, "listen")
        if not listen:
            raise ConfigError("server.listen", "must list at least one \"host:port\"")
    tls_listen = _endpoints(s, "tls_listen") if "tls_listen" in s.data else ()
    for i, ep in enumerate(tls_listen):
        if ep.port and ep in listen:
            raise ConfigError(f"server.tls_listen[{i}]", f'"{ep}": also in server.listen (a plain '
                              "TCP port serves a TLS ClientHello anyway when tls.cert is set)")
    realm = _text(s, "realm", ServerConfig().realm)
    if not realm:
        raise ConfigError("server.realm", "must not be empty")
    workers = s.data.get("workers", 1)
    if workers == "auto":
        workers = os.cpu_count() or 1
    elif not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 256:
        raise ConfigError("server.workers", f'{workers!r}: must be 1-256 or "auto"')
    return ServerConfig(listen=listen, realm=realm, software=_text(s, "software", ""),
                        workers=workers, tls_listen=tls_listen,
                        proxy_protocol=_cidrs(s, "proxy_protocol"),
                        alternate=_optional_endpoint(s, "alternate"))


def _optional_endpoint(s: "_Section", k: str) -> Endpoint | None:
    """One "host:port", or "" (the default) for none."""
    text = s.get(k, str, "")
    return parse_endpoint(text, s.key(k)) if text else None


def _endpoints(s: "_Section", k: str) -> tuple[Endpoint, ...]:
    """A list of "host:port" (port 0: any free port, the same for UDP and TCP; tests)."""
    items = s.get(k, list, [])
    out = tuple(parse_endpoint(item, f"{s.key(k)}[{i}]", allow_port_zero=True)
                for i, item in enumerate(items))
    seen = set()
    for i, ep in enumerate(out):
        if ep in seen:
            raise ConfigError(f"{s.key(k)}[{i}]", f'"{ep}": listed twice')
        seen.add(ep)
    return out


def _int(section: _Section, k: str, default: int, low: int, high: int) -> int:
    value = section.get(k, int, default)
    if not low <= value <= high:
        raise ConfigError(section.key(k), f"{value}: must be {low}-{high}")
    return value


def _ip(text: Any, key: str) -> str:
    if not isinstance(text, str):
        raise ConfigError(key, f"must be an IP address string, not {_tname(text)}")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ConfigError(key, f'"{text}": not an IP address') from None


def _str_list(section: _Section, k: str) -> list:
    items = section.get(k, list, [])
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ConfigError(f"{section.key(k)}[{i}]", f"must be a string, not {_tname(item)}")
    return items


def _user_secret(secret: Any, key: str) -> str | tuple[str, ...]:
    """A password, one precomputed key, or a list of precomputed keys (MD5 and SHA-256)."""
    if isinstance(secret, list):
        if not 1 <= len(secret) <= 2 or not all(isinstance(k, str) for k in secret):
            raise ConfigError(key, 'a list holds one or two keys: ["0x<MD5>", "0x<SHA-256>"]')
        parsed = [parse_hex_key(k) for k in secret]
        if None in parsed or len({p[0] for p in parsed}) != len(parsed):
            raise ConfigError(key, 'a list holds keys only, at most one of each algorithm: '
                              '"0x" + 32 hex digits (MD5), "0x" + 64 (SHA-256)')
        return tuple(secret)
    if not isinstance(secret, str):
        raise ConfigError(key, f"must be a password string, not {_tname(secret)}")
    if secret.startswith("0x"):
        if parse_hex_key(secret) is None:
            raise ConfigError(key, 'a key must be "0x" + 32 hex digits (MD5 of user:realm:password) '
                              'or 64 (SHA-256)')
        return secret
    try:
        saslprep(secret)
    except ValueError as exc:
        raise ConfigError(key, f"password not allowed: {exc}") from None
    if not secret:
        raise ConfigError(key, "password must not be empty")
    return secret


def _parse_auth(raw: Any) -> AuthConfig:
    s = _Section(raw, "auth")
    s.check_unknown({"users", "secrets", "nonce_lifetime", "users_file"})
    users = s.get("users", dict, {})
    parsed = []
    for user, secret in users.items():
        key = f"auth.users.{_key_part(user)}"
        if not user or len(user.encode()) > 512 or any(ord(ch) < 0x20 for ch in user):
            raise ConfigError(key, "user names must be 1-512 bytes without control characters")
        parsed.append((user, _user_secret(secret, key)))
    if not offered_algorithms(dict(parsed)):
        raise ConfigError("auth.users", "no password algorithm is shared by every user: give "
                          "each user an MD5 key (or a password)")
    secrets = _str_list(s, "secrets")
    for i, secret in enumerate(secrets):
        if not secret:
            raise ConfigError(f"auth.secrets[{i}]", "must not be empty")
    return AuthConfig(users=tuple(parsed), secrets=tuple(secrets),
                      nonce_lifetime=_int(s, "nonce_lifetime", 600, 30, 86400),
                      users_file=s.get("users_file", str, ""))


def read_users_file(path: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``[auth] users_file``: TOML lines ``user = "0x<key>"`` or ``user = ["0x<MD5>",
    "0x<SHA-256>"]`` (what ``turnd user add`` writes): keys only, never passwords."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError("auth.users_file", f"{path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise ConfigError("auth.users_file", f"{path}: not valid TOML: {_toml_why(exc)}") from None
    out = []
    for user, secret in data.items():
        key = f"auth.users_file: {path}: {_key_part(user)}"
        if isinstance(secret, str) and not secret.startswith("0x"):
            raise ConfigError(key, "holds keys only (\"0x...\"), never a password: use turnd user add")
        out.append((user, _user_secret(secret, key)))
    return tuple(out)


def _parse_log(raw: Any) -> LogConfig:
    s = _Section(raw, "log")
    s.check_unknown({"level", "format", "client_addresses"})
    level = s.get("level", str, "info")
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log.level", f'"{level}": must be "debug", "info", "warning" or "error"')
    fmt = s.get("format", str, "text")
    if fmt not in ("text", "json"):
        raise ConfigError("log.format", f'"{fmt}": must be "text" or "json"')
    clients = s.get("client_addresses", str, "truncated")
    if clients not in ("full", "truncated", "hashed", "none"):
        raise ConfigError("log.client_addresses",
                          f'"{clients}": must be "truncated", "hashed", "full" or "none"')
    return LogConfig(level=level, format=fmt, client_addresses=clients)


def _parse_selftest(raw: Any) -> SelftestConfig:
    s = _Section(raw, "selftest")
    s.check_unknown({"enabled"})
    return SelftestConfig(enabled=s.get("enabled", bool, True))


def _parse_metrics(raw: Any) -> MetricsConfig:
    s = _Section(raw, "metrics")
    s.check_unknown({"listen", "admin_token_file"})
    token_file = s.get("admin_token_file", str, "")
    if "listen" not in s.data:
        return MetricsConfig(listen=parse_endpoint(METRICS_DEFAULT, "metrics.listen"),
                             admin_token_file=token_file)
    return MetricsConfig(listen=_optional_endpoint(s, "listen"), admin_token_file=token_file)


def _parse_relay(raw: Any) -> RelayConfig:
    s = _Section(raw, "relay")
    s.check_unknown({"ports", "addresses", "external", "default_family", "legacy_channel_numbers"})
    ports = RelayConfig().ports
    if "ports" in s.data:
        text = s.get("ports", str, "")
        low, sep, high = text.partition("-")
        if not sep or not low.strip().isdigit() or not high.strip().isdigit():
            raise ConfigError("relay.ports", f'"{text}": expected "min-max", e.g. "49152-65535"')
        ports = (int(low), int(high))
        if not 1024 <= ports[0] <= ports[1] <= 65535:
            raise ConfigError("relay.ports", f'"{text}": need 1024 <= min <= max <= 65535')
    addresses = tuple(_ip(a, f"relay.addresses[{i}]") for i, a in enumerate(_str_list(s, "addresses")))
    families = [ipaddress.ip_address(a).version for a in addresses]
    if len(set(families)) != len(families):
        raise ConfigError("relay.addresses", "at most one IPv4 and one IPv6 address")
    external = []
    for internal, public in s.get("external", dict, {}).items():
        key = f"relay.external.{_key_part(internal)}"
        internal_ip = _ip(internal, key)
        public_ip = _ip(public, key)
        if ipaddress.ip_address(internal_ip).version != ipaddress.ip_address(public_ip).version:
            raise ConfigError(key, "internal and public address must be of one family")
        external.append((internal_ip, public_ip))
    family = s.get("default_family", str, "ipv4")
    if family not in ("ipv4", "ipv6", "keep"):
        raise ConfigError("relay.default_family", f'"{family}": must be "ipv4", "ipv6" or "keep"')
    return RelayConfig(ports=ports, addresses=addresses, external=tuple(external),
                       default_family=family,
                       legacy_channel_numbers=s.get("legacy_channel_numbers", bool, False))


def _cidrs(section: _Section, k: str) -> tuple[str, ...]:
    out = []
    for i, item in enumerate(_str_list(section, k)):
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ConfigError(f"{section.key(k)}[{i}]", f'"{item}": not a CIDR like "10.0.0.0/8"') from None
    return tuple(out)


def _parse_peers(raw: Any) -> PeersConfig:
    s = _Section(raw, "peers")
    s.check_unknown({"allow", "deny"})
    return PeersConfig(allow=_cidrs(s, "allow"), deny=_cidrs(s, "deny"))


def _parse_limits(raw: Any) -> LimitsConfig:
    s = _Section(raw, "limits")
    d = LimitsConfig()
    s.check_unknown({f.name for f in attrs.fields(LimitsConfig)})
    limits = LimitsConfig(
        user_quota=_int(s, "user_quota", 0, 0, 10**6),
        total_quota=_int(s, "total_quota", 0, 0, 10**6),
        ip_quota=_int(s, "ip_quota", d.ip_quota, 0, 10**6),
        channels_per_allocation=_int(s, "channels_per_allocation", d.channels_per_allocation, 1, 4096),
        unauthenticated_rate=_int(s, "unauthenticated_rate", d.unauthenticated_rate, 0, 10**6),
        max_lifetime=_int(s, "max_lifetime", 3600, 60, 3600),
        permissions_per_allocation=_int(s, "permissions_per_allocation",
                                        d.permissions_per_allocation, 1, 10000),
        max_attributes=_int(s, "max_attributes", d.max_attributes, 16, 4096),
        tcp_connections=_int(s, "tcp_connections", d.tcp_connections, 1, 10**6),
        tcp_connections_per_ip=_int(s, "tcp_connections_per_ip", d.tcp_connections_per_ip, 1, 10**6),
        tcp_first_message_timeout=_int(s, "tcp_first_message_timeout",
                                       d.tcp_first_message_timeout, 1, 300),
        tcp_idle_timeout=_int(s, "tcp_idle_timeout", d.tcp_idle_timeout, 10, 86400),
        tls_handshake_timeout=_int(s, "tls_handshake_timeout", d.tls_handshake_timeout, 1, 120),
        tcp_connection_rate=_int(s, "tcp_connection_rate", d.tcp_connection_rate, 0, 10**6))
    if limits.tcp_connections_per_ip > limits.tcp_connections:
        raise ConfigError("limits.tcp_connections_per_ip",
                          f"{limits.tcp_connections_per_ip}: must not exceed limits.tcp_connections "
                          f"({limits.tcp_connections})")
    return limits


def _parse_tls(raw: Any) -> TlsConfig:
    s = _Section(raw, "tls")
    s.check_unknown({"cert", "key"})
    return TlsConfig(cert=s.get("cert", str, ""), key=s.get("key", str, ""))


SECTIONS = {"server": _parse_server, "tls": _parse_tls, "auth": _parse_auth, "relay": _parse_relay,
            "peers": _parse_peers, "limits": _parse_limits, "log": _parse_log,
            "metrics": _parse_metrics, "selftest": _parse_selftest}


def parse_config(data: dict[str, Any]) -> Config:
    for name in data:
        if name not in SECTIONS:
            raise ConfigError(name, "unknown section")
    data = {"metrics": {}, **data}  # [metrics] listen has a default even without the section
    config = Config(**{name: parse(data[name]) for name, parse in SECTIONS.items() if name in data})
    if config.server.tls_listen and not (config.tls.cert and config.tls.key):
        raise ConfigError("tls.cert" if not config.tls.cert else "tls.key",
                          "needed by server.tls_listen (PEM paths; turnd gen-cert makes a test pair)")
    listen_ips = {ep.host for ep in config.server.listen}
    for i, addr in enumerate(config.relay.addresses):
        if ipaddress.ip_address(addr).is_unspecified:
            raise ConfigError(f"relay.addresses[{i}]", f'"{addr}": must be a concrete address')
    for ip in config.relay_addresses():
        if ipaddress.ip_address(ip).is_unspecified:
            raise ConfigError("relay.addresses", "needed when server.listen uses 0.0.0.0 or [::]")
    for internal, _ in config.relay.external:
        if internal not in listen_ips and internal not in config.relay_addresses():
            raise ConfigError(f"relay.external.{_key_part(internal)}",
                              "is neither a listen nor a relay address")
    return config


def _toml_why(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 (byte {exc.start})"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc)


def load_config(path: str, read_users: bool = True) -> Config:
    """The config in ``path``; with ``read_users``, auth.users_file's users are read in
    (else only its path is resolved: ``turnd user add`` makes the file)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(path, exc.strerror or str(exc)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise ConfigError(path, f"not valid TOML: {_toml_why(exc)}") from None
    config = parse_config(data)
    here = os.path.dirname(os.path.abspath(path))
    if config.metrics.admin_token_file:
        config = attrs.evolve(config, metrics=attrs.evolve(
            config.metrics, admin_token_file=os.path.join(here, config.metrics.admin_token_file)))
    if config.auth.users_file:
        users_file = os.path.join(os.path.dirname(os.path.abspath(path)), config.auth.users_file)
        if not read_users:
            return attrs.evolve(config, auth=attrs.evolve(config.auth, users_file=users_file))
        more = read_users_file(users_file)
        known = {u for u, _ in config.auth.users}
        for user, _ in more:
            if user in known:
                raise ConfigError("auth.users_file", f"{users_file}: {user!r} is in auth.users too")
        users = config.auth.users + more
        if not offered_algorithms(dict(users)):
            raise ConfigError("auth.users_file", "no password algorithm is shared by every user")
        config = attrs.evolve(config, auth=attrs.evolve(config.auth, users=users,
                                                        users_file=users_file))
    return config
