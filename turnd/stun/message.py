"""STUN messages: ``decode_untrusted`` and ``encode`` (RFC 8489 §5, §14)."""

from __future__ import annotations

import struct
import zlib

from . import constants as c
from .attributes import CODECS, check_address, encode_value
from .errors import StunDecodeError

_HEADER = struct.Struct("!HHI12s")
# Known attributes that mean something more than once: the peers of a CreatePermission,
# the two relayed addresses of a dual allocation.  Of any other known type only the first
# occurrence is decoded (RFC 8489 §14).
REPEATABLE = frozenset({c.XOR_PEER_ADDRESS, c.XOR_RELAYED_ADDRESS})
_TLV = struct.Struct("!HH")


def method_of(msg_type: int) -> int:
    return (msg_type & 0x000F) | ((msg_type & 0x00E0) >> 1) | ((msg_type & 0x3E00) >> 2)


def class_of(msg_type: int) -> int:
    return ((msg_type & 0x0010) >> 4) | ((msg_type & 0x0100) >> 7)


def message_type(method: int, cls: int) -> int:
    return ((method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2)
            | ((cls & 1) << 4) | ((cls & 2) << 7))


class _Deferred:
    """An attribute value that was checked when the message was decoded (so a bad one was
    a decode error then) but is built only when it is read: the addresses of a request
    that never gets past authentication cost a length check, not an object."""

    __slots__ = ("build", "value", "tid")

    def __init__(self, build, value: bytes, tid: bytes):
        self.build, self.value, self.tid = build, value, tid


class Message:
    """A STUN message: method, class, transaction id and ordered attributes.

    ``attributes`` is a list of ``(type, value)`` pairs so repeated attributes
    (several XOR-PEER-ADDRESS, say) survive in order.  A decoded message also
    keeps the bytes it came from (``raw``) and the offsets of its integrity
    attributes, so integrity is verified over the bytes as received.
    """

    __slots__ = ("method", "cls", "transaction_id", "_attributes", "_deferred", "_first", "raw",
                 "integrity_offset", "integrity_sha256_offset", "fingerprint_offset",
                 "unknown_required", "ignored_after_integrity")

    def __init__(self, method: int, cls: int, transaction_id: bytes,
                 attributes: list[tuple[int, object]] | None = None):
        if len(transaction_id) != 12:
            raise ValueError("transaction id must be 12 bytes")
        self.method = method
        self.cls = cls
        self.transaction_id = bytes(transaction_id)
        self._attributes = list(attributes or [])
        self._deferred = 0  # how many values in _attributes are still _Deferred
        self._first: dict[int, int] | None = None  # type -> index of its first occurrence
        self.raw: bytes | None = None
        self.integrity_offset: int | None = None
        self.integrity_sha256_offset: int | None = None
        self.fingerprint_offset: int | None = None
        self.unknown_required: tuple[int, ...] = ()
        self.ignored_after_integrity: tuple[int, ...] = ()

    @property
    def attributes(self) -> list[tuple[int, object]]:
        if self._deferred:
            for i, (t, v) in enumerate(self._attributes):
                if type(v) is _Deferred:
                    self._attributes[i] = (t, self._build(v))
        return self._attributes

    @attributes.setter
    def attributes(self, value: list) -> None:
        self._attributes, self._deferred, self._first = value, 0, None

    def _build(self, v: _Deferred):
        self._deferred -= 1
        return v.build(v.value, v.tid)

    def get(self, attr_type: int, default=None):
        """The first value of ``attr_type``, or ``default``."""
        first = self._first
        if first is None:  # a message built by hand: index it once
            first = self._first = {}
            for i, (t, _) in enumerate(self._attributes):
                first.setdefault(t, i)
        i = first.get(attr_type)
        if i is None:
            return default
        t, v = self._attributes[i]
        if type(v) is _Deferred:
            v = self._build(v)
            self._attributes[i] = (t, v)
        return v

    def get_all(self, attr_type: int) -> list:
        attrs = self._attributes
        out = []
        for i, (t, v) in enumerate(attrs):
            if t == attr_type:
                if type(v) is _Deferred:
                    v = self._build(v)
                    attrs[i] = (t, v)
                out.append(v)
        return out

    def __contains__(self, attr_type: int) -> bool:
        if self._first is None:
            return any(t == attr_type for t, _ in self._attributes)
        return attr_type in self._first

    def __repr__(self) -> str:
        from .attributes import attribute_name
        name = c.METHOD_NAMES.get(self.method, f"0x{self.method:03X}")
        cls = ("request", "indication", "success", "error")[self.cls]
        attrs = ", ".join(f"{attribute_name(t)}={v!r}" for t, v in self.attributes)
        return f"<Message {name} {cls} {self.transaction_id.hex()} [{attrs}]>"

    def __eq__(self, other) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (self.method, self.cls, self.transaction_id, self.attributes) == \
            (other.method, other.cls, other.transaction_id, other.attributes)


def decode_untrusted(data: bytes, max_attributes: int = c.MAX_ATTRIBUTES) -> Message:
    """Parse one STUN message from ``data`` (exactly one datagram or frame).

    Raises only ``StunDecodeError``, also for a message of more than
    ``max_attributes`` attributes (work per message stays small and linear).
    Of a known attribute type other than XOR-PEER-ADDRESS and XOR-RELAYED-ADDRESS only
    the first occurrence is decoded and returned (RFC 8489 §14).  Attributes after MESSAGE-INTEGRITY other
    than MESSAGE-INTEGRITY-SHA256 and FINGERPRINT are ignored (not returned);
    attributes after FINGERPRINT are ignored too.  Unknown comprehension-required
    attribute types are listed in ``unknown_required``.
    """
    data = bytes(data)
    if len(data) < c.HEADER_SIZE:
        raise StunDecodeError("shorter than a STUN header")
    msg_type, length, cookie, tid = _HEADER.unpack_from(data)
    if msg_type & 0xC000:
        raise StunDecodeError("top bits of the message type are not zero")
    if cookie != c.MAGIC_COOKIE:
        raise StunDecodeError("no magic cookie")
    if length % 4:
        raise StunDecodeError("length is not a multiple of 4")
    if length != len(data) - c.HEADER_SIZE:
        raise StunDecodeError("length does not match the message size")
    method, cls = method_of(msg_type), class_of(msg_type)
    msg = Message(method, cls, tid)
    msg.raw = data
    attributes = msg._attributes
    first = msg._first = {}

    def bad(reason: str) -> StunDecodeError:
        return StunDecodeError(reason, method=method, cls=cls, transaction_id=tid)

    unknown: dict[int, None] = {}  # ordered and O(1): no quadratic de-duplication
    ignored: list[int] = []
    pos = c.HEADER_SIZE
    end = len(data)
    count = 0
    # 0: before MESSAGE-INTEGRITY, 1: after MI, 2: after MI-SHA256, 3: after FINGERPRINT
    stage = 0
    while pos < end:
        if pos + 4 > end:
            raise bad("truncated attribute header")
        attr_type, attr_len = _TLV.unpack_from(data, pos)
        vstart = pos + 4
        vend = vstart + attr_len
        padded_end = vend + (-attr_len % 4)
        if padded_end > end:
            raise bad("attribute runs past the end of the message")
        count += 1
        if count > max_attributes:
            raise bad(f"more than {max_attributes} attributes")
        value = data[vstart:vend]
        offset = pos
        pos = padded_end
        if stage == 3:
            ignored.append(attr_type)
            continue
        if attr_type == c.FINGERPRINT:
            msg.fingerprint_offset = offset
            stage = 3
        elif attr_type == c.MESSAGE_INTEGRITY_SHA256 and stage < 2:
            msg.integrity_sha256_offset = offset
            stage = 2
        elif attr_type == c.MESSAGE_INTEGRITY and stage == 0:
            msg.integrity_offset = offset
            stage = 1
        elif stage:
            ignored.append(attr_type)
            continue
        entry = CODECS.get(attr_type)
        if entry is None:
            if c.comprehension_required(attr_type):
                unknown[attr_type] = None
            first.setdefault(attr_type, len(attributes))
            attributes.append((attr_type, value))  # an unknown type: its raw bytes
            continue
        if attr_type in REPEATABLE:  # checked now, built when read
            if not check_address(value):
                raise bad(f"malformed {entry[0]}")
            first.setdefault(attr_type, len(attributes))
            attributes.append((attr_type, _Deferred(entry[1], value, tid)))
            msg._deferred += 1
            continue
        if attr_type in first:
            # RFC 8489 §14: only the first occurrence needs processing; duplicates
            # may be ignored.  They are, unread: no attribute is decoded twice.
            continue
        try:
            decoded = entry[1](value, tid)
        except StunDecodeError as exc:
            raise bad(exc.reason) from None
        except (ValueError, IndexError, struct.error) as exc:  # defensive: never leak these
            raise bad(f"bad {entry[0]}: {exc}") from None
        first[attr_type] = len(attributes)
        attributes.append((attr_type, decoded))
    msg.unknown_required = tuple(unknown)
    msg.ignored_after_integrity = tuple(ignored)
    return msg


def _tlv(attr_type: int, value: bytes) -> bytes:
    return _TLV.pack(attr_type, len(value)) + value + b"\x00" * (-len(value) % 4)


def _header(msg: Message, body_len: int) -> bytes:
    return _HEADER.pack(message_type(msg.method, msg.cls), body_len, c.MAGIC_COOKIE,
                        msg.transaction_id)


def encode(msg: Message, *, key: bytes | None = None, integrity: str = "sha1",
           fingerprint: bool = False) -> bytes:
    """Serialise ``msg``; padding bytes are always zero.

    Any MESSAGE-INTEGRITY(-SHA256)/FINGERPRINT in ``msg.attributes`` is
    skipped: with ``key``, integrity is computed here (``integrity`` is
    "sha1", "sha256" or "both"); with ``fingerprint``, FINGERPRINT is last.
    """
    from .integrity import hmac_sha1, hmac_sha256
    skip = (c.MESSAGE_INTEGRITY, c.MESSAGE_INTEGRITY_SHA256, c.FINGERPRINT)
    body = b"".join(_tlv(t, encode_value(t, v, msg.transaction_id))
                    for t, v in msg.attributes if t not in skip)
    if key is not None:
        if integrity in ("sha1", "both"):
            header = _header(msg, len(body) + 24)
            body += _tlv(c.MESSAGE_INTEGRITY, hmac_sha1(key, header + body))
        if integrity in ("sha256", "both"):
            header = _header(msg, len(body) + 36)
            body += _tlv(c.MESSAGE_INTEGRITY_SHA256, hmac_sha256(key, header + body))
        if integrity not in ("sha1", "sha256", "both"):
            raise ValueError(f"unknown integrity {integrity!r}")
    if fingerprint:
        header = _header(msg, len(body) + 8)
        body += _tlv(c.FINGERPRINT, fingerprint_value(header + body).to_bytes(4, "big"))
    return _header(msg, len(body)) + body


def fingerprint_value(data: bytes) -> int:
    return zlib.crc32(data) ^ c.FINGERPRINT_XOR
