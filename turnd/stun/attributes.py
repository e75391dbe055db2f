"""One codec table for every attribute type, with typed values.

Each entry maps an attribute type to ``(name, decode, encode)``:
``decode(value: bytes, transaction_id: bytes) -> object`` raises only
``StunDecodeError``; ``encode(value, transaction_id) -> bytes`` returns the
value without padding.

Typed values:
- addresses: ``(ip: str, port: int)`` (IPv6 in compressed text form)
- USERNAME, REALM, NONCE, SOFTWARE, ALTERNATE-DOMAIN: ``str``
- ERROR-CODE: ``ErrorCode``; ADDRESS-ERROR-CODE: ``AddressErrorCode``
- UNKNOWN-ATTRIBUTES: ``tuple[int, ...]``
- PASSWORD-ALGORITHM: ``PasswordAlgorithm``; PASSWORD-ALGORITHMS: tuple of them
- LIFETIME, CHANNEL-NUMBER, REQUESTED-TRANSPORT, REQUESTED-/ADDITIONAL-ADDRESS-FAMILY,
  PRIORITY, FINGERPRINT: ``int``
- EVEN-PORT: ``bool`` (the R bit); DONT-FRAGMENT, USE-CANDIDATE: ``True``
- DATA, USERHASH, RESERVATION-TOKEN, MESSAGE-INTEGRITY(-SHA256), ICE-*: ``bytes``
- ICMP: ``Icmp``
- unknown types: ``bytes`` (raw)
"""

from __future__ import annotations

import ipaddress
import struct

import attrs

from . import constants as c
from .errors import StunDecodeError

Address = tuple  # (ip: str, port: int)
_ADDRESS_HEAD = struct.Struct("!BBH")


@attrs.frozen
class ErrorCode:
    code: int
    reason: str = ""


@attrs.frozen
class AddressErrorCode:
    family: int
    code: int
    reason: str = ""


@attrs.frozen
class PasswordAlgorithm:
    algorithm: int
    parameters: bytes = b""


@attrs.frozen
class Icmp:
    type: int
    code: int
    error_data: int = 0


def _bad(what: str) -> StunDecodeError:
    return StunDecodeError(what)


# --- addresses -----------------------------------------------------------------

def format_ipv4(raw: bytes) -> str:
    return f"{raw[0]}.{raw[1]}.{raw[2]}.{raw[3]}"


def format_ipv6(raw: bytes) -> str:
    """The text of a 16-byte IPv6 address exactly as the C library's inet_ntop writes it,
    which is also how the kernel's source addresses reach Python (IPv4-mapped and
    IPv4-compatible addresses end in dotted quads).  Peer addresses from STUN attributes
    and from recvfrom are compared as text, so the two must agree."""
    words = struct.unpack("!8H", raw)
    best, best_len, i = -1, 0, 0
    while i < 8:  # the longest run of zero words (the first of equals), if 2 or more
        if words[i]:
            i += 1
            continue
        j = i
        while j < 8 and not words[j]:
            j += 1
        if j - i > best_len:
            best, best_len = i, j - i
        i = j
    if best_len < 2:
        best = -1
    if best == 0 and (best_len == 6 or (best_len == 5 and words[5] == 0xFFFF)):
        return ("::" if best_len == 6 else "::ffff:") + format_ipv4(raw[12:])
    if best < 0:
        return ":".join(f"{w:x}" for w in words)
    head = ":".join(f"{w:x}" for w in words[:best])
    tail = ":".join(f"{w:x}" for w in words[best + best_len:])
    return f"{head}::{tail}"


def check_address(value: bytes) -> bool:
    """Would ``_decode_address`` accept this value?  (The whole of its validation.)"""
    n = len(value)
    return n >= 4 and ((value[1] == c.FAMILY_IPV4 and n == 8) or (value[1] == c.FAMILY_IPV6 and n == 20))


def _decode_address(value: bytes, xor_key: bytes | None) -> Address:
    if len(value) < 4:
        raise _bad("address attribute too short")
    family = value[1]
    port = (value[2] << 8) | value[3]
    raw = value[4:]
    if family == c.FAMILY_IPV4:
        if len(raw) != 4:
            raise _bad("IPv4 address attribute has wrong length")
    elif family == c.FAMILY_IPV6:
        if len(raw) != 16:
            raise _bad("IPv6 address attribute has wrong length")
    else:
        raise _bad(f"unknown address family {family}")
    if xor_key is not None:
        port ^= c.MAGIC_COOKIE >> 16
        n = len(raw)
        raw = (int.from_bytes(raw, "big") ^ int.from_bytes(xor_key[:n], "big")).to_bytes(n, "big")
    return (format_ipv4(raw) if family == c.FAMILY_IPV4 else format_ipv6(raw), port)


_PACKED: dict[str, bytes] = {}  # IP text -> packed, for the addresses turnd answers with


def packed_ip(ip: str) -> bytes:
    """4 or 16 bytes of an IP address in text (ipaddress is slow: cache what repeats)."""
    raw = _PACKED.get(ip)
    if raw is None:
        raw = ipaddress.ip_address(ip).packed
        if len(_PACKED) >= 4096:
            _PACKED.clear()
        _PACKED[ip] = raw
    return raw


def _encode_address(addr: Address, xor_key: bytes | None) -> bytes:
    raw = packed_ip(addr[0])
    port = addr[1]
    family = c.FAMILY_IPV4 if len(raw) == 4 else c.FAMILY_IPV6
    if xor_key is not None:
        port ^= c.MAGIC_COOKIE >> 16
        n = len(raw)
        raw = (int.from_bytes(raw, "big") ^ int.from_bytes(xor_key[:n], "big")).to_bytes(n, "big")
    return _ADDRESS_HEAD.pack(0, family, port) + raw


def xor_key(transaction_id: bytes) -> bytes:
    """Cookie followed by the transaction id: what XOR-*-ADDRESS values are XORed with."""
    return c.MAGIC_COOKIE_BYTES + transaction_id


def _plain_addr():
    return (lambda v, tid: _decode_address(v, None), lambda a, tid: _encode_address(a, None))


def _xor_addr():
    return (lambda v, tid: _decode_address(v, xor_key(tid)),
            lambda a, tid: _encode_address(a, xor_key(tid)))


# --- text ----------------------------------------------------------------------

def _text(max_bytes: int, max_chars: int | None):
    def decode(value: bytes, tid: bytes) -> str:
        if len(value) > max_bytes:
            raise _bad("text attribute too long")
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad("text attribute is not UTF-8") from None
        if max_chars is not None and len(text) > max_chars:
            raise _bad("text attribute has too many characters")
        return text

    def encode(text: str, tid: bytes) -> bytes:
        data = text.encode("utf-8")
        if len(data) > max_bytes or (max_chars is not None and len(text) > max_chars):
            raise ValueError("text attribute too long")
        return data

    return decode, encode


# --- integers and flags --------------------------------------------------------

def _u32():
    def decode(value: bytes, tid: bytes) -> int:
        if len(value) != 4:
            raise _bad("32-bit attribute has wrong length")
        return int.from_bytes(value, "big")
    return decode, lambda v, tid: int(v).to_bytes(4, "big")


def _u16_rffu():
    """A 16-bit number followed by 16 reserved bits (CHANNEL-NUMBER)."""
    def decode(value: bytes, tid: bytes) -> int:
        if len(value) != 4:
            raise _bad("CHANNEL-NUMBER has wrong length")
        return (value[0] << 8) | value[1]
    return decode, lambda v, tid: struct.pack("!HH", v, 0)


def _u8_rffu():
    """An 8-bit value followed by 24 reserved bits (REQUESTED-TRANSPORT, *-ADDRESS-FAMILY)."""
    def decode(value: bytes, tid: bytes) -> int:
        if len(value) != 4:
            raise _bad("attribute has wrong length")
        return value[0]
    return decode, lambda v, tid: bytes([v, 0, 0, 0])


def _empty():
    def decode(value: bytes, tid: bytes) -> bool:
        if value:
            raise _bad("flag attribute must be empty")
        return True
    return decode, lambda v, tid: b""


def _raw(exact: int | None = None, *, min_len: int = 0, max_len: int | None = None,
         multiple: int = 1):
    def decode(value: bytes, tid: bytes) -> bytes:
        if exact is not None and len(value) != exact:
            raise _bad("attribute has wrong length")
        if len(value) < min_len or (max_len is not None and len(value) > max_len) \
                or len(value) % multiple:
            raise _bad("attribute has wrong length")
        return bytes(value)
    return decode, lambda v, tid: bytes(v)


def _even_port():
    def decode(value: bytes, tid: bytes) -> bool:
        if len(value) != 1:
            raise _bad("EVEN-PORT has wrong length")
        return bool(value[0] & 0x80)
    return decode, lambda v, tid: b"\x80" if v else b"\x00"


# --- structured ---------------------------------------------------------------

_REASON = _text(c.MAX_TEXT_BYTES, c.MAX_TEXT_CHARS)


def _code_and_reason(value: bytes, tid: bytes) -> tuple[int, str]:
    """Bytes 2-3 (class, number) and the reason phrase after them, shared by
    ERROR-CODE and ADDRESS-ERROR-CODE."""
    if len(value) < 4:
        raise _bad("error code attribute too short")
    cls, number = value[2] & 0x07, value[3]
    if not 3 <= cls <= 6 or number > 99:
        raise _bad("error code out of range")
    return cls * 100 + number, _REASON[0](value[4:], tid)


def _code_bytes(code: int, reason: str, tid: bytes) -> bytes:
    return bytes((code // 100, code % 100)) + _REASON[1](reason, tid)


def _error_code():
    def decode(value: bytes, tid: bytes) -> ErrorCode:
        return ErrorCode(*_code_and_reason(value, tid))
    return decode, lambda v, tid: b"\x00\x00" + _code_bytes(v.code, v.reason, tid)


def _address_error_code():
    def decode(value: bytes, tid: bytes) -> AddressErrorCode:
        code, reason = _code_and_reason(value, tid)
        return AddressErrorCode(value[0], code, reason)
    return decode, lambda v, tid: bytes((v.family, 0)) + _code_bytes(v.code, v.reason, tid)


MAX_UNKNOWN_LISTED = 256  # more than any request we or anyone accept can carry


def _unknown_attributes():
    def decode(value: bytes, tid: bytes) -> tuple[int, ...]:
        if len(value) % 2:
            raise _bad("UNKNOWN-ATTRIBUTES has odd length")
        if len(value) > 2 * MAX_UNKNOWN_LISTED:
            raise _bad("UNKNOWN-ATTRIBUTES lists too many types")
        return struct.unpack(f"!{len(value) // 2}H", value)
    return decode, lambda v, tid: b"".join(t.to_bytes(2, "big") for t in v)


MAX_ALGORITHMS = 8  # two exist (RFC 8489 §18.5); a longer list is an attack, not a client


def _decode_algorithms(value: bytes) -> tuple[PasswordAlgorithm, ...]:
    out = []
    pos = 0
    while pos < len(value):
        if len(out) == MAX_ALGORITHMS:
            raise _bad("too many password algorithms")
        if pos + 4 > len(value):
            raise _bad("PASSWORD-ALGORITHM truncated")
        alg, plen = struct.unpack_from("!HH", value, pos)
        pos += 4
        if pos + plen > len(value):
            raise _bad("PASSWORD-ALGORITHM parameters truncated")
        out.append(PasswordAlgorithm(alg, bytes(value[pos:pos + plen])))
        pos += plen + (-plen % 4)
    if pos != len(value):
        raise _bad("PASSWORD-ALGORITHMS padding truncated")
    return tuple(out)


def _encode_algorithm(a: PasswordAlgorithm) -> bytes:
    return struct.pack("!HH", a.algorithm, len(a.parameters)) + a.parameters + \
        b"\x00" * (-len(a.parameters) % 4)


def _password_algorithm():
    def decode(value: bytes, tid: bytes) -> PasswordAlgorithm:
        algs = _decode_algorithms(value)
        if len(algs) != 1:
            raise _bad("PASSWORD-ALGORITHM must hold one algorithm")
        return algs[0]
    return decode, lambda v, tid: _encode_algorithm(v)


def _password_algorithms():
    return (lambda v, tid: _decode_algorithms(v),
            lambda v, tid: b"".join(_encode_algorithm(a) for a in v))


def _icmp():
    def decode(value: bytes, tid: bytes) -> Icmp:
        if len(value) != 8:
            raise _bad("ICMP has wrong length")
        _, typ, code, data = struct.unpack("!HBBI", value)
        return Icmp(typ & 0x7F, code, data)
    return decode, lambda v, tid: struct.pack("!HBBI", 0, v.type, v.code, v.error_data)


CODECS: dict[int, tuple[str, object, object]] = {}


def _register(attr_type: int, name: str, codec) -> None:
    decode, encode = codec
    CODECS[attr_type] = (name, decode, encode)


_register(c.MAPPED_ADDRESS, "MAPPED-ADDRESS", _plain_addr())
_register(c.ALTERNATE_SERVER, "ALTERNATE-SERVER", _plain_addr())
_register(c.XOR_MAPPED_ADDRESS, "XOR-MAPPED-ADDRESS", _xor_addr())
_register(c.XOR_PEER_ADDRESS, "XOR-PEER-ADDRESS", _xor_addr())
_register(c.XOR_RELAYED_ADDRESS, "XOR-RELAYED-ADDRESS", _xor_addr())
_register(c.USERNAME, "USERNAME", _text(c.MAX_USERNAME_BYTES, None))
_register(c.REALM, "REALM", _text(c.MAX_TEXT_BYTES, c.MAX_TEXT_CHARS))
_register(c.NONCE, "NONCE", _text(c.MAX_TEXT_BYTES, c.MAX_TEXT_CHARS))
_register(c.SOFTWARE, "SOFTWARE", _text(c.MAX_TEXT_BYTES, c.MAX_TEXT_CHARS))
_register(c.ALTERNATE_DOMAIN, "ALTERNATE-DOMAIN", _text(255, None))
_register(c.USERHASH, "USERHASH", _raw(32))
_register(c.PASSWORD_ALGORITHM, "PASSWORD-ALGORITHM", _password_algorithm())
_register(c.PASSWORD_ALGORITHMS, "PASSWORD-ALGORITHMS", _password_algorithms())
_register(c.ERROR_CODE, "ERROR-CODE", _error_code())
_register(c.UNKNOWN_ATTRIBUTES, "UNKNOWN-ATTRIBUTES", _unknown_attributes())
_register(c.LIFETIME, "LIFETIME", _u32())
_register(c.CHANNEL_NUMBER, "CHANNEL-NUMBER", _u16_rffu())
_register(c.DATA_ATTR, "DATA", _raw())
_register(c.REQUESTED_TRANSPORT, "REQUESTED-TRANSPORT", _u8_rffu())
_register(c.REQUESTED_ADDRESS_FAMILY, "REQUESTED-ADDRESS-FAMILY", _u8_rffu())
_register(c.ADDITIONAL_ADDRESS_FAMILY, "ADDITIONAL-ADDRESS-FAMILY", _u8_rffu())
_register(c.ADDITIONAL_ADDRESS_FAMILY_DRAFT, "ADDITIONAL-ADDRESS-FAMILY(draft)", _u8_rffu())
_register(c.ADDRESS_ERROR_CODE, "ADDRESS-ERROR-CODE", _address_error_code())
_register(c.EVEN_PORT, "EVEN-PORT", _even_port())
_register(c.RESERVATION_TOKEN, "RESERVATION-TOKEN", _raw(8))
_register(c.DONT_FRAGMENT, "DONT-FRAGMENT", _empty())
_register(c.ICMP, "ICMP", _icmp())
_register(c.MESSAGE_INTEGRITY, "MESSAGE-INTEGRITY", _raw(20))
_register(c.MESSAGE_INTEGRITY_SHA256, "MESSAGE-INTEGRITY-SHA256", _raw(min_len=16, max_len=32, multiple=4))
_register(c.FINGERPRINT, "FINGERPRINT", _u32())
_register(c.PRIORITY, "PRIORITY", _u32())
_register(c.USE_CANDIDATE, "USE-CANDIDATE", _empty())
_register(c.ICE_CONTROLLED, "ICE-CONTROLLED", _raw(8))
_register(c.ICE_CONTROLLING, "ICE-CONTROLLING", _raw(8))


def attribute_name(attr_type: int) -> str:
    entry = CODECS.get(attr_type)
    return entry[0] if entry else f"0x{attr_type:04X}"


def decode_value(attr_type: int, value: bytes, transaction_id: bytes):
    entry = CODECS.get(attr_type)
    if entry is None:
        return bytes(value)
    try:
        return entry[1](value, transaction_id)
    except StunDecodeError:
        raise
    except (ValueError, IndexError, struct.error) as exc:  # defensive: never leak these
        raise _bad(f"bad {entry[0]}: {exc}") from None


def encode_value(attr_type: int, value, transaction_id: bytes) -> bytes:
    entry = CODECS.get(attr_type)
    if entry is None:
        return bytes(value)
    return entry[2](value, transaction_id)
