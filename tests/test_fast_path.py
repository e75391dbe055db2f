"""The relay's fast parsers and the codec must agree: whatever the fast path relays, the
codec decodes to the same peer and data and the core would relay too (a differential
test).  Otherwise a client could relay through the fast path what the core refuses."""

from __future__ import annotations

import os
import socket
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turnd.relay import peer_from_xor_untrusted, send_indication_untrusted
from turnd.stun import StunDecodeError, decode_untrusted, verify_fingerprint
from turnd.stun import constants as c
from turnd.stun.attributes import encode_value
from turnd.stun.message import fingerprint_value
from turnd.turn.protocol import SendToPeer

from .core_harness import Harness
from .turn_client import TurnClient

ipv4 = st.integers(0, 2**32 - 1).map(lambda n: socket.inet_ntop(socket.AF_INET, n.to_bytes(4, "big")))
ipv6 = st.one_of(
    st.integers(0, 2**128 - 1), st.integers(0, 2**48 - 1),
    st.integers(0, 2**32 - 1).map(lambda n: n | 0xFFFF00000000),
).map(lambda n: socket.inet_ntop(socket.AF_INET6, n.to_bytes(16, "big")))
peers = st.tuples(ipv4 | ipv6, st.integers(0, 65535))


def tlv(t: int, v: bytes) -> bytes:
    return struct.pack("!HH", t, len(v)) + v + b"\0" * (-len(v) % 4)


@st.composite
def attribute(draw, tid):
    kind = draw(st.sampled_from(["peer", "peer", "bad peer", "data", "data", "df", "df value",
                                 "software", "bad software", "unknown", "optional", "integrity"]))
    if kind == "peer":
        return tlv(c.XOR_PEER_ADDRESS, encode_value(c.XOR_PEER_ADDRESS, draw(peers), tid))
    if kind == "bad peer":
        value = bytearray(encode_value(c.XOR_PEER_ADDRESS, draw(peers), tid))
        cut = draw(st.integers(0, len(value)))
        if draw(st.booleans()):
            value[1] = draw(st.integers(0, 255))
        return tlv(c.XOR_PEER_ADDRESS, bytes(value[:cut] if draw(st.booleans()) else value))
    if kind == "data":
        return tlv(c.DATA_ATTR, draw(st.binary(max_size=40)))
    if kind == "df":
        return tlv(c.DONT_FRAGMENT, b"")
    if kind == "df value":
        return tlv(c.DONT_FRAGMENT, draw(st.binary(min_size=1, max_size=4)))
    if kind == "software":
        return tlv(c.SOFTWARE, draw(st.text(max_size=10)).encode())
    if kind == "bad software":
        return tlv(c.SOFTWARE, b"\xff\xfe" + draw(st.binary(max_size=6)))
    if kind == "unknown":
        return tlv(draw(st.integers(0x30, 0x7FFF)), draw(st.binary(max_size=8)))
    if kind == "optional":
        return tlv(draw(st.integers(0x8030, 0xFFFF)), draw(st.binary(max_size=8)))
    return tlv(c.MESSAGE_INTEGRITY, draw(st.binary(min_size=20, max_size=20)))


@st.composite
def send_indications(draw):
    tid = draw(st.binary(min_size=12, max_size=12))
    # Mostly what browsers send (a peer and data, sometimes DONT-FRAGMENT), with extra
    # attributes mixed in now and then: the interesting cases are near the accepted ones.
    parts = [tlv(c.XOR_PEER_ADDRESS, encode_value(c.XOR_PEER_ADDRESS, draw(peers), tid)),
             tlv(c.DATA_ATTR, draw(st.binary(max_size=40)))]
    if draw(st.booleans()):
        parts.append(tlv(c.DONT_FRAGMENT, b""))
    parts += draw(st.lists(attribute(tid), max_size=3 if draw(st.booleans()) else 0))
    body = b"".join(draw(st.permutations(parts)))
    if draw(st.integers(0, 3)) == 0:  # a FINGERPRINT, right or wrong
        header = struct.pack("!HHI", 0x0016, len(body) + 8, c.MAGIC_COOKIE) + tid
        crc = fingerprint_value(header + body) ^ draw(st.sampled_from([0, 0, 1]))
        body += tlv(c.FINGERPRINT, crc.to_bytes(4, "big"))
    length = len(body) + draw(st.sampled_from([0, 0, 0, 0, 4, -4, 1]))
    cookie = draw(st.sampled_from([c.MAGIC_COOKIE] * 6 + [0]))
    kind = draw(st.sampled_from([0x0016] * 8 + [0x4116, 0x0116, 0x0006, 0x0017, 0x0011]))
    data = struct.pack("!HHI", kind, length & 0xFFFF, cookie) + tid + body
    return data[:draw(st.integers(0, len(data)))] if draw(st.integers(0, 9)) == 0 else data


def core_with_both_relays():
    h = Harness()
    ft = h.five_tuple()
    resp = h.allocate(TurnClient("alice", "alicepw"), ft,
                      [(c.REQUESTED_TRANSPORT, 17), (c.ADDITIONAL_ADDRESS_FAMILY, 2)])
    assert len(resp.get_all(c.XOR_RELAYED_ADDRESS)) == 2
    return h, ft, h.server.allocations[ft]


H, FT, ALLOC = core_with_both_relays()
CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "clients")
ACCEPTED = []


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(send_indications())
def test_what_the_fast_path_relays_the_core_would_relay(data):
    found = send_indication_untrusted(memoryview(data), len(data))
    if found is None:
        return
    ACCEPTED.append(data)
    peer, start, end = found
    msg = decode_untrusted(data)  # must not raise
    assert (msg.method, msg.cls) == (c.SEND, c.INDICATION)
    assert not msg.unknown_required
    assert msg.fingerprint_offset is None or verify_fingerprint(msg)
    assert msg.get(c.XOR_PEER_ADDRESS) == peer
    assert msg.get(c.DATA_ATTR) == data[start:end]
    ALLOC.permissions[peer[0]] = H.now + 300  # the core decides as the fast path did
    actions = H.server.handle_untrusted(data, FT, H.now)
    assert [(type(a), a.peer, bytes(a.data)) for a in actions] == [(SendToPeer, peer, data[start:end])]
    ALLOC.permissions.clear()


def test_the_differential_test_exercises_acceptance():
    """Guards against a generator that never produces what the fast path accepts."""
    ACCEPTED.clear()
    test_what_the_fast_path_relays_the_core_would_relay()
    assert len(ACCEPTED) > 50


def test_firefox_send_indications_take_the_fast_path():
    """Firefox puts FINGERPRINT on every Send indication: checked, and on the fast path;
    a wrong one is the slow path's (which drops it)."""
    client = TurnClient("x", "y", fingerprint=True)
    data = client.indication(c.SEND, [(c.XOR_PEER_ADDRESS, ("8.8.8.8", 5000)), (c.DATA_ATTR, b"media")])
    found = send_indication_untrusted(memoryview(data), len(data))
    assert found is not None and data[found[1]:found[2]] == b"media"
    bad = data[:-1] + bytes([data[-1] ^ 1])
    assert send_indication_untrusted(memoryview(bad), len(bad)) is None
    for real in sorted(os.listdir(CORPUS)):  # captured from Firefox ESR (tests/corpus)
        if real.startswith("firefox-udp"):
            raw = open(os.path.join(CORPUS, real), "rb").read()
            if raw[:2] == b"\x00\x16":
                assert send_indication_untrusted(memoryview(raw), len(raw)) is not None, real


def test_unknown_optional_attributes_are_ignored_on_the_fast_path():
    raw = (tlv(c.XOR_PEER_ADDRESS, encode_value(c.XOR_PEER_ADDRESS, ("8.8.8.8", 1), b"\0" * 12))
           + tlv(0xC057, b"network cost") + tlv(c.DATA_ATTR, b"x"))
    data = struct.pack("!HHI", 0x0016, len(raw), c.MAGIC_COOKIE) + b"\0" * 12 + raw
    assert send_indication_untrusted(memoryview(data), len(data)) is not None
    raw = raw.replace(struct.pack("!H", 0xC057), struct.pack("!H", c.SOFTWARE))  # known: slow path
    data = struct.pack("!HHI", 0x0016, len(raw), c.MAGIC_COOKIE) + b"\0" * 12 + raw
    assert send_indication_untrusted(memoryview(data), len(data)) is None


def test_plain_browser_send_indications_take_the_fast_path():
    client = TurnClient("x", "y")
    for peer in (("8.8.8.8", 5000), ("2606:4700::1111", 53), ("::ffff:1.2.3.4", 9)):
        data = client.indication(c.SEND, [(c.XOR_PEER_ADDRESS, peer), (c.DATA_ATTR, b"media")])
        found = send_indication_untrusted(memoryview(data), len(data))
        assert found is not None and found[0] == peer and data[found[1]:found[2]] == b"media"


def test_what_the_fast_path_refuses_goes_to_the_slow_path():
    client = TurnClient("x", "y")
    peer = ("8.8.8.8", 5000)
    for attrs in ([(c.XOR_PEER_ADDRESS, peer), (c.DATA_ATTR, b"a"), (c.XOR_PEER_ADDRESS, peer)],
                  [(c.XOR_PEER_ADDRESS, peer), (c.DATA_ATTR, b"a"), (c.DATA_ATTR, b"b")],
                  [(c.XOR_PEER_ADDRESS, peer), (c.DATA_ATTR, b"a"), (c.SOFTWARE, "x")]):
        data = client.indication(c.SEND, attrs)
        assert send_indication_untrusted(memoryview(data), len(data)) is None
    raw = tlv(c.XOR_PEER_ADDRESS, encode_value(c.XOR_PEER_ADDRESS, peer, b"\0" * 12))
    raw += tlv(c.DATA_ATTR, b"a") + tlv(c.DONT_FRAGMENT, b"\1")  # DONT-FRAGMENT with a value
    data = struct.pack("!HHI", 0x0016, len(raw), c.MAGIC_COOKIE) + b"\0" * 12 + raw
    assert send_indication_untrusted(memoryview(data), len(data)) is None
    try:
        decode_untrusted(data)
        raise AssertionError("the codec accepted DONT-FRAGMENT with a value")
    except StunDecodeError:
        pass


def test_the_parser_itself_refuses_other_message_types():
    """Found by the fuzzer (tests/fuzz/fuzz.py fastpath): the parser relied on its caller
    to check the message type; a message of type 0x4116 parsed as a Send indication."""
    data = bytes.fromhex(
        "411600242112a4428e40ceab4cdf4d4d680f4784001200140002212707"
        "14e4428eabc04d4cce49df680f478500130005 6d65606961000000".replace(" ", ""))
    assert send_indication_untrusted(memoryview(data), len(data)) is None
    fixed = b"\x00" + data[1:]
    assert send_indication_untrusted(memoryview(fixed), len(fixed)) is not None


@settings(max_examples=1000)
@given(peers, st.binary(min_size=12, max_size=12))
def test_the_fast_peer_decoder_agrees_with_the_codec(peer, tid):
    value = encode_value(c.XOR_PEER_ADDRESS, peer, tid)
    assert peer_from_xor_untrusted(memoryview(value), tid) == peer


def test_random_bytes_never_break_the_fast_parsers():
    for _ in range(2000):
        data = b"\x00\x16" + os.urandom(os.urandom(1)[0])
        send_indication_untrusted(memoryview(data), len(data))
        peer_from_xor_untrusted(os.urandom(os.urandom(1)[0] % 24), os.urandom(12))
