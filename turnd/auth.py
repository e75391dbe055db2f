"""Credential back-ends behind one small interface that returns keys, never passwords.

``Credentials.keys_for(username, realm, algorithm, now)`` returns the candidate
long-term keys for a user (several when several REST secrets are configured,
for rotation); an empty list means "unknown user" (401).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Iterable, Protocol

from .stun import constants as c
from .stun.integrity import long_term_key, userhash


ALGORITHMS = (c.ALGORITHM_MD5, c.ALGORITHM_SHA256)


class Credentials(Protocol):
    supports_userhash: bool  # can a USERHASH be mapped back to a user name?
    algorithms: tuple[int, ...]  # password algorithms every user of this back-end can use

    def keys_for(self, username: str, realm: str, algorithm: int, now: float) -> list[bytes]: ...

    def username_for_userhash(self, digest: bytes, realm: str) -> str | None: ...


def parse_hex_key(value: str) -> tuple[int, bytes] | None:
    """A precomputed long-term key: "0x" + 32 hex digits is MD5(user:realm:password),
    "0x" + 64 hex digits SHA-256(user:realm:password).  (algorithm, key) or None."""
    if value.startswith("0x") and len(value) in (34, 66):
        try:
            key = bytes.fromhex(value[2:])
        except ValueError:
            return None
        return (c.ALGORITHM_MD5 if len(key) == 16 else c.ALGORITHM_SHA256), key
    return None


def algorithms_of(secret: str | tuple[str, ...]) -> set[int]:
    """The password algorithms a user's configured secret gives keys for."""
    values = (secret,) if isinstance(secret, str) else secret
    out: set[int] = set()
    for value in values:
        parsed = parse_hex_key(value)
        out |= {parsed[0]} if parsed is not None else set(ALGORITHMS)
    return out


def offered_algorithms(users: dict) -> tuple[int, ...]:
    """Offer an algorithm only when every user has a key for it (RFC 8489 §9.2.4: the
    client picks from what the 401 offers, before the server knows who it is)."""
    common = set(ALGORITHMS)
    for secret in users.values():
        common &= algorithms_of(secret)
    return tuple(a for a in ALGORITHMS if a in common)


class StaticUsers:
    """``[auth] users``: user -> password, or user -> precomputed keys ("0x" + hex MD5
    and/or SHA-256 key, one string or a list of both)."""

    supports_userhash = True

    def __init__(self, users: dict[str, str | tuple[str, ...]], realm: str):
        self._keys = {c.ALGORITHM_MD5: {}, c.ALGORITHM_SHA256: {}}
        self._by_hash: dict[bytes, str] = {}
        for user, secret in users.items():
            for value in ((secret,) if isinstance(secret, str) else secret):
                parsed = parse_hex_key(value)
                if parsed is not None:
                    self._keys[parsed[0]][user] = parsed[1]
                else:
                    for alg in ALGORITHMS:
                        self._keys[alg][user] = long_term_key(user, realm, value, alg)
            self._by_hash[userhash(user, realm)] = user
        self.algorithms = offered_algorithms(users)
        self.realm = realm

    def keys_for(self, username: str, realm: str, algorithm: int, now: float) -> list[bytes]:
        if realm != self.realm:
            return []
        key = self._keys.get(algorithm, {}).get(username)
        return [key] if key is not None else []

    def username_for_userhash(self, digest: bytes, realm: str) -> str | None:
        return self._by_hash.get(digest) if realm == self.realm else None


def rest_password(secret: str, username: str) -> str:
    """The TURN REST API password: base64(HMAC-SHA1(secret, username))."""
    mac = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode()


class RestSecrets:
    """``[auth] secrets``: TURN REST API shared secrets (coturn's use-auth-secret).

    The username is "<expiry unix time>" or "<expiry>:<user>"; it is valid
    until that time.  Every listed secret is tried, so secrets can rotate.
    """

    supports_userhash = False  # the user name is derived per request: no table to look up
    algorithms = ALGORITHMS

    def __init__(self, secrets: Iterable[str]):
        self.secrets = list(secrets)

    @staticmethod
    def expiry_of(username: str) -> int | None:
        head = username.split(":", 1)[0]
        return int(head) if head.isascii() and head.isdigit() and len(head) <= 12 else None

    def keys_for(self, username: str, realm: str, algorithm: int, now: float) -> list[bytes]:
        expiry = self.expiry_of(username)
        if expiry is None or expiry < now:
            return []
        return [long_term_key(username, realm, rest_password(s, username), algorithm)
                for s in self.secrets]

    def username_for_userhash(self, digest: bytes, realm: str) -> str | None:
        return None


class AnyOf:
    """Several back-ends at once: the keys of all of them."""

    def __init__(self, *backends: Credentials):
        self.backends = backends
        self.supports_userhash = any(b.supports_userhash for b in backends)
        self.algorithms = tuple(a for a in ALGORITHMS if all(a in b.algorithms for b in backends))

    def keys_for(self, username: str, realm: str, algorithm: int, now: float) -> list[bytes]:
        return [k for b in self.backends for k in b.keys_for(username, realm, algorithm, now)]

    def username_for_userhash(self, digest: bytes, realm: str) -> str | None:
        for b in self.backends:
            found = b.username_for_userhash(digest, realm)
            if found is not None:
                return found
        return None
