import pytest

from turnd.stun import (Message, StunDecodeError, decode_untrusted, encode, long_term_key,
                        saslprep, userhash, verify_fingerprint, verify_integrity)
from turnd.stun import constants as c
from turnd.stun.attributes import PasswordAlgorithm

from .vectors import (LT_PASSWORD, LT_REALM, LT_USERNAME, PASSWORD_SHORT_TERM,
                      RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE, RFC5769_LONG_TERM,
                      RFC5769_REQUEST, RFC8489_B1_CORRECTED, RFC8489_B1_PRINTED)


def flip(data: bytes, index: int) -> bytes:
    b = bytearray(data)
    b[index] ^= 0x01
    return bytes(b)


def test_sample_request():
    m = decode_untrusted(RFC5769_REQUEST)
    assert (m.method, m.cls) == (c.BINDING, c.REQUEST)
    assert m.transaction_id == bytes.fromhex("b7e7a701bc34d686fa87dfae")
    assert m.get(c.SOFTWARE) == "STUN test client"
    assert m.get(c.PRIORITY) == 0x6E0001FF
    assert m.get(c.ICE_CONTROLLED) == bytes.fromhex("932ff9b151263b36")
    assert m.get(c.USERNAME) == "evtj:h6vY"
    assert m.unknown_required == ()
    assert verify_integrity(m, PASSWORD_SHORT_TERM)
    assert verify_fingerprint(m)
    assert not verify_integrity(m, b"wrong password")


@pytest.mark.parametrize("vector, addr", [
    (RFC5769_IPV4_RESPONSE, ("192.0.2.1", 32853)),
    (RFC5769_IPV6_RESPONSE, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
])
def test_sample_responses_decode_verify_and_reencode_byte_exact(vector, addr):
    m = decode_untrusted(vector)
    assert (m.method, m.cls) == (c.BINDING, c.SUCCESS)
    assert m.get(c.XOR_MAPPED_ADDRESS) == addr
    assert m.get(c.SOFTWARE) == "test vector"
    assert verify_integrity(m, PASSWORD_SHORT_TERM)
    assert verify_fingerprint(m)
    # The vector pads SOFTWARE with 0x20; our encoder pads with zero, which is the
    # only difference, so patch those padding bytes and the rest must match exactly.
    ours = encode(m, key=PASSWORD_SHORT_TERM, fingerprint=True)
    assert len(ours) == len(vector)
    assert ours[:20] == vector[:20]
    assert ours[20:35] == vector[20:35]  # SOFTWARE TLV without its padding byte
    assert ours[35] == 0 and vector[35] == 0x20
    # Integrity and fingerprint differ only because the padding differs: verify ours.
    again = decode_untrusted(ours)
    assert verify_integrity(again, PASSWORD_SHORT_TERM) and verify_fingerprint(again)
    assert again.attributes[:2] == m.attributes[:2]


def test_sample_request_reencodes_byte_exact_with_vector_padding():
    m = decode_untrusted(RFC5769_REQUEST)
    ours = encode(m, key=PASSWORD_SHORT_TERM, fingerprint=True)
    # USERNAME "evtj:h6vY" is padded with 0x20 in the vector, zero by us.
    assert ours[:len(ours) - 32] == RFC5769_REQUEST[:len(ours) - 32].replace(
        b"h6vY   ", b"h6vY\x00\x00\x00")


def test_long_term_vector():
    m = decode_untrusted(RFC5769_LONG_TERM)
    assert m.get(c.USERNAME) == LT_USERNAME
    assert m.get(c.REALM) == LT_REALM
    assert m.get(c.NONCE) == "f//499k954d6OL34oL9FSTvy64sA"
    assert saslprep(LT_PASSWORD) == "TheMatrIX"
    key = long_term_key(LT_USERNAME, LT_REALM, LT_PASSWORD)
    assert key.hex() == "e8ca7ad59d5eb0518e312911d2dab2a9"
    assert verify_integrity(m, key)
    assert m.fingerprint_offset is None
    # Re-encode byte-exact: all padding in this vector is zero already.
    assert encode(m, key=key) == RFC5769_LONG_TERM


def test_rfc8489_b1_corrected_userhash_and_sha256():
    m = decode_untrusted(RFC8489_B1_CORRECTED)
    assert m.get(c.USERHASH).hex() == userhash(LT_USERNAME, LT_REALM).hex() == \
        "4a3cf38fef6992bda952c6780417da0f24819415569e60b205c46e41407f1704"
    assert m.get(c.NONCE) == "obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA"
    assert m.get(c.PASSWORD_ALGORITHM) == PasswordAlgorithm(c.ALGORITHM_SHA256)
    key = long_term_key(LT_USERNAME, LT_REALM, LT_PASSWORD, c.ALGORITHM_SHA256)
    assert key.hex() == "dd295a613b9058c3c23d6dc7165bda072304d989c9d0af3a8c7e184b4f9bb4a1"
    assert verify_integrity(m, key)
    assert encode(m, key=key, integrity="sha256") == RFC8489_B1_CORRECTED


def test_rfc8489_b1_as_printed_decodes_but_does_not_verify():
    with pytest.raises(StunDecodeError):  # header length is the total size: not STUN
        decode_untrusted(RFC8489_B1_PRINTED)
    fixed = RFC8489_B1_PRINTED[:2] + (len(RFC8489_B1_PRINTED) - 20).to_bytes(2, "big") + \
        RFC8489_B1_PRINTED[4:]
    m = decode_untrusted(fixed)
    key = long_term_key(LT_USERNAME, LT_REALM, LT_PASSWORD, c.ALGORITHM_SHA256)
    assert not verify_integrity(m, key)


def test_flipped_byte_fails_fingerprint():
    m = decode_untrusted(flip(RFC5769_REQUEST, 27))
    assert not verify_fingerprint(m)


def test_flipped_byte_fails_integrity():
    m = decode_untrusted(flip(RFC5769_LONG_TERM, 32))
    key = long_term_key(LT_USERNAME, LT_REALM, LT_PASSWORD)
    assert not verify_integrity(m, key)


@pytest.mark.parametrize("vector", [RFC5769_REQUEST, RFC5769_IPV4_RESPONSE,
                                    RFC5769_IPV6_RESPONSE, RFC5769_LONG_TERM,
                                    RFC8489_B1_CORRECTED])
def test_every_flipped_byte_breaks_integrity_or_decoding(vector):
    key = (long_term_key(LT_USERNAME, LT_REALM, LT_PASSWORD, c.ALGORITHM_SHA256)
           if vector is RFC8489_B1_CORRECTED else
           long_term_key(LT_USERNAME, LT_REALM, LT_PASSWORD)
           if vector is RFC5769_LONG_TERM else PASSWORD_SHORT_TERM)
    original = decode_untrusted(vector)
    mi_end = (original.integrity_sha256_offset or original.integrity_offset) + 4 + \
        len(original.get(c.MESSAGE_INTEGRITY_SHA256) or original.get(c.MESSAGE_INTEGRITY))
    for i in range(len(vector)):
        try:
            m = decode_untrusted(flip(vector, i))
        except StunDecodeError:
            continue
        if i < mi_end:  # every byte up to and including the MAC is covered by it
            assert not verify_integrity(m, key), f"byte {i}"
        elif i >= len(vector) - 4:  # the FINGERPRINT value itself
            assert not verify_fingerprint(m), f"byte {i}"


def test_attributes_after_integrity_are_ignored():
    key = b"k" * 16
    m = Message(c.REFRESH, c.REQUEST, b"x" * 12, [(c.LIFETIME, 600)])
    data = encode(m, key=key)
    # Append LIFETIME 0 after MESSAGE-INTEGRITY, fix the length, add FINGERPRINT.
    extra = bytes.fromhex("000d000400000000")
    body = data[20:] + extra
    forged = data[:2] + len(body).to_bytes(2, "big") + data[4:20] + body
    got = decode_untrusted(forged)
    assert got.get_all(c.LIFETIME) == [600]
    assert got.ignored_after_integrity == (c.LIFETIME,)
    assert verify_integrity(got, key)


def test_unknown_comprehension_required_reported_optional_kept():
    m = Message(c.BINDING, c.REQUEST, b"t" * 12, [(0x7FF0, b"abc"), (0xC001, b"xyz")])
    got = decode_untrusted(encode(m))
    assert got.unknown_required == (0x7FF0,)
    assert got.get(0xC001) == b"xyz"


def test_padding_is_zero():
    m = Message(c.BINDING, c.ERROR, b"t" * 12, [
        (c.REALM, "r"), (c.NONCE, "ab"), (c.SOFTWARE, "xyz")])
    data = encode(m)
    assert data.count(b"r\x00\x00\x00") == 1
    assert b"ab\x00\x00" in data and b"xyz\x00" in data


def test_sha256_truncation_verifies():
    from turnd.stun.integrity import hmac_sha256
    key = b"key"
    m = Message(c.BINDING, c.REQUEST, b"t" * 12, [(c.SOFTWARE, "x")])
    full = encode(m, key=key, integrity="sha256")
    # Build a 16-byte truncated MESSAGE-INTEGRITY-SHA256 by hand.
    body = full[20:20 + 8]  # SOFTWARE TLV
    header = full[:2] + (len(body) + 20).to_bytes(2, "big") + full[4:20]
    mac = hmac_sha256(key, header + body)[:16]
    data = header + body + bytes.fromhex("001c0010") + mac
    got = decode_untrusted(data)
    assert verify_integrity(got, key)
    bad = data[:-1] + bytes([data[-1] ^ 1])
    assert not verify_integrity(decode_untrusted(bad), key)
