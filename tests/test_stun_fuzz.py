"""Hypothesis: every attribute round-trips; any bytes give a message or StunDecodeError."""

import ipaddress
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turnd.stun import Message, StunDecodeError, decode_untrusted, encode, verify_integrity
from turnd.stun import constants as c
from turnd.stun.attributes import (CODECS, AddressErrorCode, ErrorCode, Icmp, PasswordAlgorithm,
                                   encode_value, format_ipv6)
from turnd.stun.message import REPEATABLE

from .vectors import (RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE, RFC5769_LONG_TERM,
                      RFC5769_REQUEST, RFC8489_B1_CORRECTED)

ports = st.integers(0, 65535)
ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
# The codec writes IPv6 text as inet_ntop does (as recvfrom reports sources).
ipv6 = st.builds(lambda n: socket.inet_ntop(socket.AF_INET6, n.to_bytes(16, "big")),
                 st.integers(0, 2**128 - 1) | st.integers(0, 2**48 - 1)
                 | st.integers(0, 2**32 - 1).map(lambda n: n | 0xFFFF00000000))
addresses = st.tuples(ipv4 | ipv6, ports)
short_text = st.text(max_size=40)  # 127 chars x 4 bytes < 763: always valid
reason = short_text
u32 = st.integers(0, 2**32 - 1)
algorithm = st.builds(PasswordAlgorithm, st.integers(0, 0xFFFF), st.binary(max_size=12))

VALUES = {
    c.MAPPED_ADDRESS: addresses, c.ALTERNATE_SERVER: addresses,
    c.XOR_MAPPED_ADDRESS: addresses, c.XOR_PEER_ADDRESS: addresses,
    c.XOR_RELAYED_ADDRESS: addresses,
    c.USERNAME: st.text(max_size=128),  # 128 x 4 bytes = 512: always valid
    c.REALM: short_text, c.NONCE: short_text, c.SOFTWARE: short_text,
    c.ALTERNATE_DOMAIN: st.text(max_size=60),
    c.USERHASH: st.binary(min_size=32, max_size=32),
    c.PASSWORD_ALGORITHM: algorithm,
    c.PASSWORD_ALGORITHMS: st.lists(algorithm, max_size=4).map(tuple),
    c.ERROR_CODE: st.builds(ErrorCode, st.integers(300, 699), reason),
    c.ADDRESS_ERROR_CODE: st.builds(AddressErrorCode, st.sampled_from([1, 2]),
                                    st.integers(300, 699), reason),
    c.UNKNOWN_ATTRIBUTES: st.lists(st.integers(0, 0xFFFF), max_size=8).map(tuple),
    c.LIFETIME: u32, c.PRIORITY: u32,
    c.CHANNEL_NUMBER: st.integers(0, 0xFFFF),
    c.DATA_ATTR: st.binary(max_size=300),
    c.REQUESTED_TRANSPORT: st.integers(0, 255),
    c.REQUESTED_ADDRESS_FAMILY: st.sampled_from([1, 2]),
    c.ADDITIONAL_ADDRESS_FAMILY: st.sampled_from([1, 2]),
    c.ADDITIONAL_ADDRESS_FAMILY_DRAFT: st.sampled_from([1, 2]),
    c.EVEN_PORT: st.booleans(),
    c.RESERVATION_TOKEN: st.binary(min_size=8, max_size=8),
    c.DONT_FRAGMENT: st.just(True), c.USE_CANDIDATE: st.just(True),
    c.ICMP: st.builds(Icmp, st.integers(0, 127), st.integers(0, 255), u32),
    c.ICE_CONTROLLED: st.binary(min_size=8, max_size=8),
    c.ICE_CONTROLLING: st.binary(min_size=8, max_size=8),
}
INTEGRITY_TYPES = {c.MESSAGE_INTEGRITY, c.MESSAGE_INTEGRITY_SHA256, c.FINGERPRINT}


def first_of_each(attributes):
    """What a decoder returns: known types once (RFC 8489 §14), but for the repeatable ones."""
    seen, out = set(), []
    for t, v in attributes:
        if t in CODECS and t not in REPEATABLE:
            if t in seen:
                continue
            seen.add(t)
        out.append((t, v))
    return out


def test_duplicates_of_single_use_attributes_are_ignored_unread():
    tid = b"\x04" * 12
    body = (struct.pack("!HH", c.LIFETIME, 4) + b"\0\0\0\x10"
            + struct.pack("!HH", c.LIFETIME, 1) + b"\xff\0\0\0"  # malformed, but a duplicate
            + struct.pack("!HH", c.XOR_PEER_ADDRESS, 8) + encode_value(c.XOR_PEER_ADDRESS, ("1.2.3.4", 5), tid)
            + struct.pack("!HH", c.XOR_PEER_ADDRESS, 8) + encode_value(c.XOR_PEER_ADDRESS, ("5.6.7.8", 9), tid))
    msg = decode_untrusted(struct.pack("!HHI", 0x0008, len(body), c.MAGIC_COOKIE) + tid + body)
    assert msg.get_all(c.LIFETIME) == [16]
    assert msg.get_all(c.XOR_PEER_ADDRESS) == [("1.2.3.4", 5), ("5.6.7.8", 9)]


def test_every_attribute_type_has_a_strategy():
    assert set(CODECS) - INTEGRITY_TYPES == set(VALUES)


attribute = st.sampled_from(sorted(VALUES)).flatmap(
    lambda t: VALUES[t].map(lambda v: (t, v)))
messages = st.builds(
    Message, st.integers(0, 0xFFF), st.integers(0, 3), st.binary(min_size=12, max_size=12),
    st.lists(attribute, max_size=8))


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(messages, st.sampled_from([None, "sha1", "sha256", "both"]), st.booleans())
def test_every_attribute_round_trips(msg, integrity, fingerprint):
    key = b"secret" if integrity else None
    data = encode(msg, key=key, integrity=integrity or "sha1", fingerprint=fingerprint)
    assert len(data) % 4 == 0
    got = decode_untrusted(data)
    plain = [(t, v) for t, v in got.attributes if t not in INTEGRITY_TYPES]
    assert (got.method, got.cls, got.transaction_id) == (msg.method, msg.cls, msg.transaction_id)
    assert plain == first_of_each(msg.attributes)
    if key:
        assert verify_integrity(got, key)
        assert not verify_integrity(got, b"other")


def _check(data: bytes) -> None:
    try:
        msg = decode_untrusted(data)
    except StunDecodeError:
        return
    assert isinstance(msg, Message)
    verify_integrity(msg, b"k")  # must not raise either


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_arbitrary_bytes(data):
    _check(data)


@settings(max_examples=500)
@given(st.integers(0, 0x3FFF), st.binary(min_size=12, max_size=12),
       st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=40)), max_size=6),
       st.binary(max_size=8))
def test_valid_header_random_attributes(msg_type, tid, tlvs, tail):
    body = b"".join(struct.pack("!HH", t, len(v)) + v + b"\0" * (-len(v) % 4) for t, v in tlvs)
    body += tail
    body += b"\0" * (-len(body) % 4)
    _check(struct.pack("!HHI", msg_type, len(body), c.MAGIC_COOKIE) + tid + body)


@settings(max_examples=500)
@given(st.sampled_from([RFC5769_REQUEST, RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE,
                        RFC5769_LONG_TERM, RFC8489_B1_CORRECTED]),
       st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), max_size=6),
       st.integers(0, 300))
def test_mutated_vectors(vector, changes, cut):
    b = bytearray(vector)
    for index, value in changes:
        if index < len(b):
            b[index] = value
    _check(bytes(b))
    _check(bytes(b[:cut]))


def test_attribute_errors_carry_the_header_for_a_400():
    tid = b"\x01" * 12
    body = struct.pack("!HH", c.XOR_PEER_ADDRESS, 0)  # zero-length address
    data = struct.pack("!HHI", 0x0008, len(body), c.MAGIC_COOKIE) + tid + body
    try:
        decode_untrusted(data)
    except StunDecodeError as exc:
        assert exc.is_stun and exc.transaction_id == tid and exc.method == c.CREATE_PERMISSION
    else:
        raise AssertionError("decoded a zero-length XOR-PEER-ADDRESS")


def test_short_attribute_lengths_are_decode_errors():
    tid = b"\x02" * 12
    for attr, length in [(c.XOR_MAPPED_ADDRESS, 0), (c.ERROR_CODE, 0), (c.LIFETIME, 1),
                         (c.LIFETIME, 3), (c.CHANNEL_NUMBER, 2), (c.XOR_PEER_ADDRESS, 5)]:
        body = struct.pack("!HH", attr, length) + b"\0" * (length + (-length % 4))
        data = struct.pack("!HHI", 0x0001, len(body), c.MAGIC_COOKIE) + tid + body
        try:
            decode_untrusted(data)
        except StunDecodeError as exc:
            assert exc.is_stun
        else:
            raise AssertionError((attr, length))
    # header length larger than the datagram
    data = struct.pack("!HHI", 0x0001, 40, c.MAGIC_COOKIE) + tid
    with pytest.raises(StunDecodeError) as raised:
        decode_untrusted(data)
    assert not raised.value.is_stun


@settings(max_examples=1000)
@given(st.integers(0, 2**128 - 1) | st.integers(0, 2**48 - 1)
       | st.integers(0, 2**32 - 1).map(lambda n: n | 0xFFFF00000000)
       | st.lists(st.sampled_from([0, 0, 0, 1, 0xFFFF, 0xABC]), min_size=8, max_size=8).map(
           lambda ws: int.from_bytes(struct.pack("!8H", *ws), "big")))
def test_ipv6_text_is_exactly_inet_ntop(n):
    """Peers from STUN attributes and sources from recvfrom are compared as text: the
    codec must write IPv6 exactly as the C library does (mapped and compatible forms too)."""
    raw = n.to_bytes(16, "big")
    assert format_ipv6(raw) == socket.inet_ntop(socket.AF_INET6, raw)


def test_too_many_attributes_is_a_400_after_bounded_work():
    tid = b"\x03" * 12
    body = struct.pack("!HH", 0x8FFF, 4) + b"\0\0\0\1"  # an unknown optional type
    for n, ok in ((c.MAX_ATTRIBUTES, True), (c.MAX_ATTRIBUTES + 1, False)):
        data = struct.pack("!HHI", 0x0001, 8 * n, c.MAGIC_COOKIE) + tid + body * n
        if ok:
            assert len(decode_untrusted(data).attributes) == n
        else:
            with pytest.raises(StunDecodeError) as raised:
                decode_untrusted(data)
            assert raised.value.is_stun  # a request: answered with 400
