"""Configuration: TOML read with tomllib into frozen attrs classes.

Every problem is a ``ConfigError`` whose message names the dotted key, e.g.
``server.listen[1]: "[::1]:99999": port must be 1-65535``.
"""

from __future__ import annotations

import ipaddress
import tomllib
from typing import Any

import attrs


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


@attrs.frozen
class Config:
    server: ServerConfig = ServerConfig()


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
    s.check_unknown({"listen", "realm", "software"})
    listen = ServerConfig().listen
    if "listen" in s.data:
        items = s.get("listen", list, [])
        if not items:
            raise ConfigError("server.listen", "must list at least one \"host:port\"")
        listen = tuple(parse_endpoint(item, f"server.listen[{i}]") for i, item in enumerate(items))
        seen = set()
        for i, ep in enumerate(listen):
            if ep in seen:
                raise ConfigError(f"server.listen[{i}]", f'"{ep}": listed twice')
            seen.add(ep)
    realm = _text(s, "realm", ServerConfig().realm)
    if not realm:
        raise ConfigError("server.realm", "must not be empty")
    return ServerConfig(listen=listen, realm=realm, software=_text(s, "software", ""))


SECTIONS = {"server": _parse_server}


def parse_config(data: dict[str, Any]) -> Config:
    for name in data:
        if name not in SECTIONS:
            raise ConfigError(name, "unknown section")
    return Config(**{name: parse(data[name]) for name, parse in SECTIONS.items() if name in data})


def load_config(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(path, exc.strerror or str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"not valid TOML: {exc}") from None
    return parse_config(data)
