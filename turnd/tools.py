"""Tools for operators and web back ends: TURN REST credentials, the users file, the TURN
URLs of a config, and the first-run secret.  (``turnd migrate-coturn`` is in migrate.py.)"""

from __future__ import annotations

import json
import os
import secrets

from .auth import rest_password
from .config import Config, ConfigError, read_users_file
from .stun import constants as c
from .stun.integrity import long_term_key, saslprep


def read_secret_file(path: str) -> list[str]:
    """REST secrets, one per line (blank lines and # comments skipped)."""
    try:
        with open(path) as f:
            lines = [ln.strip() for ln in f]
    except OSError as exc:
        raise ConfigError("secret file", f"{path}: {exc.strerror or exc}") from None
    found = [ln for ln in lines if ln and not ln.startswith("#")]
    if not found:
        raise ConfigError("secret file", f"{path}: holds no secret")
    return found


def rest_credential(secret: str, user: str, ttl: int, now: float) -> tuple[str, str]:
    """(username, password) of the TURN REST API (coturn's use-auth-secret): the user name
    is "<expiry unix time>:<user>", the password base64(HMAC-SHA1(secret, user name))."""
    username = f"{int(now) + ttl}:{user}" if user else str(int(now) + ttl)
    return username, rest_password(secret, username)


def turn_urls(config: Config, host: str | None = None) -> list[str]:
    """The URLs clients enter for this config: turn: over UDP and TCP on each listen port,
    turns: on each tls_listen port.  ``host``: the name clients use (default: the public
    address of the first listen address, relay.external's if it has one)."""
    external = dict(config.relay.external)
    listen = config.server.listen
    if host is None:
        first = listen[0].host if listen else "127.0.0.1"
        host = external.get(first, first)
        if host in ("0.0.0.0", "::"):
            addrs = config.relay_addresses()
            host = external.get(addrs[0], addrs[0]) if addrs else host
    shown = f"[{host}]" if ":" in host else host
    urls = []
    ports = []
    for ep in listen:
        if ep.port not in ports:
            ports.append(ep.port)
    for port in ports:
        urls.append(f"turn:{shown}:{port}?transport=udp")
        urls.append(f"turn:{shown}:{port}?transport=tcp")
    for port in dict.fromkeys(ep.port for ep in config.server.tls_listen):
        urls.append(f"turns:{shown}:{port}?transport=tcp")
    return urls


def ice_server(urls: list[str], username: str, credential: str) -> str:
    """An RTCIceServer object, as JSON."""
    return json.dumps({"urls": urls, "username": username, "credential": credential})


# --- [auth] users_file --------------------------------------------------------------------

def user_keys(user: str, realm: str, password: str) -> list[str]:
    """The keys stored for a user: MD5 (what browsers use) and SHA-256 (RFC 8489), never the
    password itself."""
    saslprep(password)  # refuses what RFC 8489 does not allow
    return ["0x" + long_term_key(user, realm, password, alg).hex()
            for alg in (c.ALGORITHM_MD5, c.ALGORITHM_SHA256)]


_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}


def toml_string(text: str) -> str:
    """A TOML basic string of ``text`` (any Unicode; control characters escaped)."""
    out = []
    for ch in text:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_key(key: str) -> str:
    bare = key and all(ch.isascii() and (ch.isalnum() or ch in "-_") for ch in key)
    return key if bare else toml_string(key)


def toml_value(value) -> str:
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    return str(value).lower() if isinstance(value, bool) else str(value)


def write_users_file(path: str, users: dict[str, list[str] | str]) -> None:
    """Write ``users`` (user -> keys) atomically: a fresh temporary file in the same
    directory (never one someone planted), checked to read back, then renamed over the old
    one with the old one's owner, group and mode (new files: 0600)."""
    import tempfile
    lines = ["# turnd users: user = [MD5 key, SHA-256 key] (turnd user add / delete)\n"]
    for user, keys in users.items():
        lines.append(f"{toml_key(user)} = {toml_value(keys)}\n")
    text = "".join(lines)
    import tomllib
    if tomllib.loads(text) != {u: list(k) if isinstance(k, tuple) else k for u, k in users.items()}:
        raise ValueError("the users file would not read back as written")  # never expected
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".users-")
    try:
        with os.fdopen(fd, "w") as f:
            if st is not None:
                os.fchmod(f.fileno(), st.st_mode & 0o777)
                try:
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
                except PermissionError:
                    pass
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_users(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    return {u: list(k) if isinstance(k, tuple) else k for u, k in read_users_file(path)}


def add_user(path: str, user: str, realm: str, password: str) -> bool:
    """Add or replace ``user``; True when it was new."""
    if not user or len(user.encode()) > 512 or any(ord(ch) < 0x20 for ch in user):
        raise ValueError("user names must be 1-512 bytes without control characters")
    users = load_users(path)
    new = user not in users
    users[user] = user_keys(user, realm, password)
    write_users_file(path, users)
    return new


def delete_user(path: str, user: str) -> bool:
    users = load_users(path)
    if user not in users:
        return False
    del users[user]
    write_users_file(path, users)
    return True


# --- the first run (make run) --------------------------------------------------------------

def first_run_secret(path: str) -> tuple[str, bool]:
    """The REST secret in ``path`` (made, mode 0600, when missing): (secret, made now)."""
    if os.path.exists(path):
        return read_secret_file(path)[0], False
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# TURN REST API secret made by turnd's first run (make run); keep it private\n")
        f.write(secret + "\n")
    return secret, True

