"""MESSAGE-INTEGRITY(-SHA256), FINGERPRINT and long-term credential keys.

Integrity is computed over the message up to the attribute, with the header
length patched to end just after it, and verified over the bytes as received
(padding included).  Every comparison uses ``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import stringprep
import struct
import unicodedata

from . import constants as c
from .message import Message, fingerprint_value


def hmac_sha1(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha1).digest()


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _patched(raw: bytes, offset: int, attr_value_len: int) -> bytes:
    """raw[:offset] with the header length covering the attribute at ``offset``."""
    length = offset - c.HEADER_SIZE + 4 + attr_value_len
    return raw[:2] + struct.pack("!H", length) + raw[4:offset]


def verify_integrity(msg: Message, key: bytes) -> bool:
    """True when the message's integrity attribute verifies with ``key``.

    MESSAGE-INTEGRITY-SHA256 is checked when present (truncated values of
    16-32 bytes included), else MESSAGE-INTEGRITY.  False when neither is there.
    """
    raw = msg.raw
    if raw is None:
        return False
    off = msg.integrity_sha256_offset
    if off is not None:
        n = struct.unpack_from("!H", raw, off + 2)[0]
        expected = hmac_sha256(key, _patched(raw, off, n))[:n]
        return hmac.compare_digest(expected, raw[off + 4:off + 4 + n])
    off = msg.integrity_offset
    if off is not None:
        expected = hmac_sha1(key, _patched(raw, off, 20))
        return hmac.compare_digest(expected, raw[off + 4:off + 24])
    return False


def verify_fingerprint(msg: Message) -> bool:
    """True when FINGERPRINT is present, last, and matches."""
    raw = msg.raw
    off = msg.fingerprint_offset
    if raw is None or off is None or off + 8 != len(raw):
        return False
    expected = fingerprint_value(_patched(raw, off, 4)).to_bytes(4, "big")
    return hmac.compare_digest(expected, raw[off + 4:off + 8])


# --- string preparation -------------------------------------------------------

def _in_prohibited(ch: str) -> bool:
    return (stringprep.in_table_c12(ch) or stringprep.in_table_c21_c22(ch)
            or stringprep.in_table_c3(ch) or stringprep.in_table_c4(ch)
            or stringprep.in_table_c5(ch) or stringprep.in_table_c6(ch)
            or stringprep.in_table_c7(ch) or stringprep.in_table_c8(ch)
            or stringprep.in_table_c9(ch))


def saslprep(text: str, *, allow_unassigned: bool = False) -> str:
    """SASLprep (RFC 4013), which STUN uses for passwords and realms.

    Raises ValueError for prohibited characters or bad bidirectional text.
    RFC 8489's OpaqueString gives the same result for the strings STUN clients
    use; SASLprep is what deployed clients (and the RFC 5769 vectors) expect.
    """
    if text.isascii() and text.isprintable():
        # Printable ASCII maps to itself: nothing in B.1 or C.1.2, NFKC leaves it, no
        # prohibited character (C.2.1 is the controls) and no right-to-left text.  This
        # keeps key derivation (REST passwords are base64) to a few microseconds.
        return text
    mapped = "".join(" " if stringprep.in_table_c12(ch) else ch
                     for ch in text if not stringprep.in_table_b1(ch))
    out = unicodedata.normalize("NFKC", mapped)
    if not out:
        return out
    for ch in out:
        if _in_prohibited(ch):
            raise ValueError(f"prohibited character U+{ord(ch):04X}")
        if not allow_unassigned and stringprep.in_table_a1(ch):
            raise ValueError(f"unassigned character U+{ord(ch):04X}")
    if any(stringprep.in_table_d1(ch) for ch in out):
        if any(stringprep.in_table_d2(ch) for ch in out):
            raise ValueError("mixed right-to-left and left-to-right text")
        if not (stringprep.in_table_d1(out[0]) and stringprep.in_table_d1(out[-1])):
            raise ValueError("right-to-left text must start and end with RTL characters")
    return out


opaque_string = saslprep


def long_term_key(username: str, realm: str, password: str,
                  algorithm: int = c.ALGORITHM_MD5) -> bytes:
    """The long-term credential key (RFC 8489 §9.2.2)."""
    text = f"{username}:{saslprep(realm, allow_unassigned=True)}:{saslprep(password)}"
    data = text.encode("utf-8")
    if algorithm == c.ALGORITHM_MD5:
        return hashlib.md5(data).digest()
    if algorithm == c.ALGORITHM_SHA256:
        return hashlib.sha256(data).digest()
    raise ValueError(f"unknown password algorithm {algorithm}")


def userhash(username: str, realm: str) -> bytes:
    """USERHASH = SHA-256(username ":" OpaqueString(realm)) (RFC 8489 §14.4)."""
    return hashlib.sha256(
        f"{username}:{saslprep(realm, allow_unassigned=True)}".encode("utf-8")).digest()
