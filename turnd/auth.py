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


class Credentials(Protocol):
    supports_userhash: bool  # can a USERHASH be mapped back to a user name?

    def keys_for(self, username: str, realm: str, algorithm: int, now: float) -> list[bytes]: ...

    def username_for_userhash(self, digest: bytes, realm: str) -> str | None: ...


def parse_hex_key(value: str) -> bytes | None:
    """ "0x" + 32 hex digits: a precomputed MD5(user:realm:password) key."""
    if value.startswith("0x") and len(value) == 34:
        try:
            return bytes.fromhex(value[2:])
        except ValueError:
            return None
    return None


class StaticUsers:
    """``[auth] users``: user -> password, or user -> "0x" + hex MD5 key."""

    supports_userhash = True

    def __init__(self, users: dict[str, str], realm: str):
        self._md5: dict[str, bytes] = {}
        self._sha256: dict[str, bytes] = {}
        self._by_hash: dict[bytes, str] = {}
        for user, secret in users.items():
            key = parse_hex_key(secret)
            if key is not None:
                self._md5[user] = key  # no password: SHA-256 keys can't be derived
            else:
                self._md5[user] = long_term_key(user, realm, secret, c.ALGORITHM_MD5)
                self._sha256[user] = long_term_key(user, realm, secret, c.ALGORITHM_SHA256)
            self._by_hash[userhash(user, realm)] = user
        self.realm = realm

    def keys_for(self, username: str, realm: str, algorithm: int, now: float) -> list[bytes]:
        if realm != self.realm:
            return []
        table = self._sha256 if algorithm == c.ALGORITHM_SHA256 else self._md5
        key = table.get(username)
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

    def keys_for(self, username: str, realm: str, algorithm: int, now: float) -> list[bytes]:
        return [k for b in self.backends for k in b.keys_for(username, realm, algorithm, now)]

    def username_for_userhash(self, digest: bytes, realm: str) -> str | None:
        for b in self.backends:
            found = b.username_for_userhash(digest, realm)
            if found is not None:
                return found
        return None
