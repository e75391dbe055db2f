"""Stateless nonces: an HMAC over the client's address and a timestamp.

NONCE = "obMatJos2" + 4 characters of security-feature bits (RFC 8489 §9.2)
+ base64url(timestamp (4 bytes) + HMAC-SHA256(secret, address|timestamp)[:8]).
A 64-bit MAC is plenty for a value that lives minutes, and keeps 401s small.
Nothing is stored per nonce; a nonce from another address, forged or older
than the lifetime is rejected (438).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct

NONCE_COOKIE = "obMatJos2"
FEATURE_PASSWORD_ALGORITHMS = 0x800000  # bit 0 of the 24 (leftmost)
FEATURE_USERNAME_ANONYMITY = 0x400000   # bit 1


def _features_text(bits: int) -> str:
    return base64.b64encode(bits.to_bytes(3, "big")).decode()


class NonceMaker:
    def __init__(self, secret: bytes, lifetime: float, features: int = 0):
        self._secret = secret
        self.lifetime = lifetime
        self.features = features
        self._prefix = NONCE_COOKIE + _features_text(features)

    def _mac(self, client_key: str, stamp: int) -> bytes:
        return hmac.new(self._secret, f"{client_key}|{stamp}".encode(),
                        hashlib.sha256).digest()[:8]

    def make(self, client_key: str, now: float) -> str:
        stamp = int(now) & 0xFFFFFFFF
        token = struct.pack("!I", stamp) + self._mac(client_key, stamp)
        return self._prefix + base64.urlsafe_b64encode(token).decode()

    def check_untrusted(self, nonce: str, client_key: str, now: float) -> bool:
        """True when ``nonce`` is one of ours, for this client, and fresh."""
        if not nonce.startswith(self._prefix):
            return False
        try:
            token = base64.urlsafe_b64decode(nonce[len(self._prefix):].encode("ascii"))
        except (ValueError, UnicodeError):
            return False
        if len(token) != 12:
            return False
        stamp = struct.unpack_from("!I", token)[0]
        if not hmac.compare_digest(token[4:], self._mac(client_key, stamp)):
            return False
        age = (int(now) - stamp) & 0xFFFFFFFF  # wraps like the stamp does
        return age <= self.lifetime
