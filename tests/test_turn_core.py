"""The sans-I/O TURN core driven in memory with an explicit clock."""

import struct

import pytest

from turnd.auth import rest_password
from turnd.stun import (Message, PasswordAlgorithm, decode_untrusted, encode, long_term_key,
                        userhash, verify_integrity)
from turnd.stun import constants as c
from turnd.stun.attributes import AddressErrorCode
from turnd.turn.protocol import AllocationCreated, AllocationDeleted, SendToPeer

from .core_harness import RELAY4, RELAY6, SERVER6, Harness, error_code
from .turn_client import TurnClient

PEER = ("8.8.8.8", 5000)
PEER6 = ("2606:4700::1111", 5000)


@pytest.fixture
def h():
    return Harness()


def alice():
    return TurnClient("alice", "alicepw")


def test_unauthenticated_allocate_gets_401_and_keeps_nothing(h):
    client = alice()
    free = h.server.free_ports()
    msg, data = client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
    [reply] = h.replies(h.send(data, h.five_tuple()))
    resp = client.learn(reply)
    assert error_code(resp) == 401
    assert resp.get(c.REALM) == "example.org"
    assert resp.get(c.NONCE).startswith("obMatJos2")
    assert resp.get(c.PASSWORD_ALGORITHMS) == (PasswordAlgorithm(1), PasswordAlgorithm(2))
    assert c.MESSAGE_INTEGRITY not in resp
    assert h.server.allocations == {} and h.server.free_ports() == free
    assert len(reply) <= 4 * len(data)  # no amplification worth the name


def test_allocate_success_is_signed_and_well_formed(h):
    client, ft = alice(), h.five_tuple()
    resp = h.allocate(client, ft)
    assert resp.cls == c.SUCCESS, resp
    ip, port = resp.get(c.XOR_RELAYED_ADDRESS)
    assert ip == RELAY4 and 50000 <= port <= 50099
    assert resp.get(c.LIFETIME) == 600
    assert resp.get(c.XOR_MAPPED_ADDRESS) == ft.client
    assert verify_integrity(resp, client.key)
    assert len(h.server.allocations) == 1


def test_wrong_password_and_unknown_user_get_401(h):
    for client in (TurnClient("alice", "nope"), TurnClient("mallory", "x")):
        resp = h.allocate(client, h.five_tuple())
        assert error_code(resp) == 401
    assert h.server.allocations == {}


def test_stale_nonce_gets_438_then_works(h):
    client, ft = alice(), h.five_tuple()
    assert h.allocate(client, ft, [(c.REQUESTED_TRANSPORT, 17), (c.LIFETIME, 1200)]).cls == c.SUCCESS
    h.now += 601
    msg, data = client.request(c.REFRESH, [(c.LIFETIME, 600)])
    resp = client.learn(h.replies(h.send(data, ft))[0])
    assert error_code(resp) == 438 and resp.get(c.NONCE)
    assert h.call(client, ft, c.REFRESH, [(c.LIFETIME, 600)]).cls == c.SUCCESS


def test_nonce_is_bound_to_the_client_address(h):
    client = alice()
    h.allocate(client, h.five_tuple(port=1))
    msg, data = client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
    resp = client.learn(h.replies(h.send(data, h.five_tuple(port=2)))[0])
    assert error_code(resp) == 438


def test_retransmitted_allocate_gets_the_cached_response_other_tid_437(h):
    client, ft = alice(), h.five_tuple()
    h.allocate(client, ft)
    alloc = h.server.allocations[ft]
    msg, data = client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)], tid=alloc.allocate_tid)
    assert h.replies(h.send(data, ft)) == [alloc.allocate_response]  # retransmission
    assert len(h.server.allocations) == 1
    msg, data = client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])  # a new transaction
    assert error_code(decode_untrusted(h.replies(h.send(data, ft))[0])) == 437


def test_another_user_on_the_5_tuple_gets_441(h):
    ft = h.five_tuple()
    h.allocate(alice(), ft)
    bob = TurnClient("bob", "bobpw")
    assert error_code(h.call(bob, ft, c.REFRESH, [(c.LIFETIME, 600)])) == 441
    assert error_code(h.call(bob, ft, c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, PEER)])) == 441


def test_allocate_on_a_5_tuple_in_use_gets_437_whoever_asks(h):
    """RFC 8656 §7.2 step 2: 437, not 441 (441 is for the other requests, §5); browsers
    move to a new socket after 437."""
    ft = h.five_tuple()
    h.allocate(alice(), ft)
    assert error_code(h.allocate(TurnClient("bob", "bobpw"), ft)) == 437
    assert error_code(h.allocate(alice(), ft)) == 437


def test_requested_transport_checks(h):
    ft = h.five_tuple()
    assert error_code(h.allocate(alice(), ft, [])) == 400
    resp = h.allocate(alice(), ft, [(c.REQUESTED_TRANSPORT, 6)])
    assert error_code(resp) == 442
    assert verify_integrity(resp, long_term_key("alice", "example.org", "alicepw"))  # signed error


@pytest.mark.parametrize("requested, granted", [(None, 600), (10, 600), (1200, 1200), (99999, 3600)])
def test_allocation_lifetime(h, requested, granted):
    attrs = [(c.REQUESTED_TRANSPORT, 17)] + ([(c.LIFETIME, requested)] if requested else [])
    assert h.allocate(alice(), h.five_tuple(), attrs).get(c.LIFETIME) == granted


def test_max_lifetime_can_be_lowered():
    h = Harness(max_lifetime=120)
    resp = h.allocate(alice(), h.five_tuple(), [(c.REQUESTED_TRANSPORT, 17), (c.LIFETIME, 3000)])
    assert resp.get(c.LIFETIME) == 120


def test_refresh_zero_deletes_and_returns_the_port(h):
    client, ft = alice(), h.five_tuple()
    free = sum(h.server.free_ports().values())
    h.allocate(client, ft)
    assert sum(h.server.free_ports().values()) == free - 1
    msg, data = client.request(c.REFRESH, [(c.LIFETIME, 0)])
    actions = h.send(data, ft)
    assert any(isinstance(a, AllocationDeleted) for a in actions)
    assert decode_untrusted(h.replies(actions)[0]).get(c.LIFETIME) == 0
    assert h.server.allocations == {}
    assert sum(h.server.free_ports().values()) == free
    assert error_code(h.call(client, ft, c.REFRESH, [(c.LIFETIME, 600)])) == 437


def test_requests_without_allocation_get_437(h):
    ft = h.five_tuple()
    for method, attrs in [(c.REFRESH, []), (c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, PEER)]),
                          (c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4000), (c.XOR_PEER_ADDRESS, PEER)])]:
        assert error_code(h.call(alice(), ft, method, attrs)) == 437


def test_create_permission_rules(h):
    client, ft = alice(), h.five_tuple()
    h.allocate(client, ft)
    ok = h.call(client, ft, c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, PEER),
                                                  (c.XOR_PEER_ADDRESS, ("1.1.1.1", 9))])
    assert ok.cls == c.SUCCESS and verify_integrity(ok, client.key)
    alloc = h.server.allocations[ft]
    assert alloc.permissions == {"8.8.8.8": h.now + 300, "1.1.1.1": h.now + 300}
    assert error_code(h.call(client, ft, c.CREATE_PERMISSION, [])) == 400
    assert error_code(h.call(client, ft, c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, PEER6)])) == 443
    # all or nothing: one denied peer installs none of them
    denied = h.call(client, ft, c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, ("9.9.9.9", 1)),
                                                      (c.XOR_PEER_ADDRESS, ("10.0.0.1", 1))])
    assert error_code(denied) == 403 and verify_integrity(denied, client.key)
    assert "9.9.9.9" not in alloc.permissions


def test_channel_bind_rules(h):
    client, ft = alice(), h.five_tuple()
    h.allocate(client, ft)

    def bind(number, peer):
        return h.call(client, ft, c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, number), (c.XOR_PEER_ADDRESS, peer)])

    assert bind(0x4000, PEER).cls == c.SUCCESS
    assert bind(0x4000, PEER).cls == c.SUCCESS  # refresh
    assert error_code(bind(0x3FFF, ("1.1.1.1", 1))) == 400
    assert error_code(bind(0x5000, ("1.1.1.1", 1))) == 400
    assert error_code(bind(0x4000, ("1.1.1.1", 1))) == 400  # channel bound to another peer
    assert error_code(bind(0x4001, PEER)) == 400            # peer bound to another channel
    assert error_code(bind(0x4002, PEER6)) == 443
    assert error_code(bind(0x4003, ("127.0.0.1", 22))) == 403
    assert error_code(h.call(client, ft, c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4004)])) == 400
    alloc = h.server.allocations[ft]
    assert set(alloc.channels) == {0x4000}
    assert alloc.permissions["8.8.8.8"] == h.now + 300


def test_legacy_channel_numbers_accepted_when_configured():
    h = Harness(channel_max=0x7FFF)
    client, ft = alice(), h.five_tuple()
    h.allocate(client, ft)
    resp = h.call(client, ft, c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x6EA3), (c.XOR_PEER_ADDRESS, PEER)])
    assert resp.cls == c.SUCCESS
    resp = h.call(client, ft, c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x8000), (c.XOR_PEER_ADDRESS, PEER)])
    assert error_code(resp) == 400


def test_quotas():
    h = Harness(user_quota=2)
    client = alice()
    assert [error_code(h.allocate(client, h.five_tuple(port=p))) for p in (1, 2, 3)] == [None, None, 486]
    assert error_code(h.allocate(TurnClient("bob", "bobpw"), h.five_tuple(port=4))) is None
    h = Harness(total_quota=1)
    assert error_code(h.allocate(alice(), h.five_tuple(port=1))) is None
    assert error_code(h.allocate(TurnClient("bob", "bobpw"), h.five_tuple(port=2))) == 486


def test_508_when_the_port_range_is_exhausted():
    h = Harness(port_range=(50000, 50002))
    codes = [error_code(h.allocate(alice(), h.five_tuple(port=p))) for p in range(4)]
    assert codes == [None, None, None, 508]


def test_port_taken_by_another_program_is_skipped(h):
    h.binder.refuse = set(range(50000, 50050))  # half the ports are in use elsewhere
    resp = h.allocate(alice(), h.five_tuple())
    ip, port = resp.get(c.XOR_RELAYED_ADDRESS)
    assert ip == RELAY4 and 50050 <= port <= 50099


def test_even_port_with_reservation(h):
    client, ft = alice(), h.five_tuple(port=1)
    free = sum(h.server.free_ports().values())
    resp = h.allocate(client, ft, [(c.REQUESTED_TRANSPORT, 17), (c.EVEN_PORT, True)])
    port = resp.get(c.XOR_RELAYED_ADDRESS)[1]
    token = resp.get(c.RESERVATION_TOKEN)
    assert port % 2 == 0 and len(token) == 8
    assert sum(h.server.free_ports().values()) == free - 2
    second = h.allocate(client, h.five_tuple(port=2), [(c.REQUESTED_TRANSPORT, 17),
                                                       (c.RESERVATION_TOKEN, token)])
    assert second.get(c.XOR_RELAYED_ADDRESS) == (RELAY4, port + 1)
    # a token is good once
    third = h.allocate(client, h.five_tuple(port=3), [(c.REQUESTED_TRANSPORT, 17),
                                                      (c.RESERVATION_TOKEN, token)])
    assert error_code(third) == 508
    bad = h.allocate(client, h.five_tuple(port=4), [(c.REQUESTED_TRANSPORT, 17), (c.EVEN_PORT, False),
                                                    (c.RESERVATION_TOKEN, token)])
    assert error_code(bad) == 400


def test_unused_reservation_expires_and_returns_its_port(h):
    free = sum(h.server.free_ports().values())
    ft = h.five_tuple()
    h.allocate(alice(), ft, [(c.REQUESTED_TRANSPORT, 17), (c.EVEN_PORT, True)])
    h.now += 31
    h.server.expire(h.now)
    assert sum(h.server.free_ports().values()) == free - 1


def test_even_port_without_reservation_never_leaks_ports(h):
    """coturn: EVEN-PORT with R=0 leaked sibling ports."""
    client = alice()
    free = sum(h.server.free_ports().values())
    for i in range(40):
        ft = h.five_tuple(port=i)
        resp = h.allocate(client, ft, [(c.REQUESTED_TRANSPORT, 17), (c.EVEN_PORT, False)])
        assert resp.get(c.XOR_RELAYED_ADDRESS)[1] % 2 == 0
        assert h.call(client, ft, c.REFRESH, [(c.LIFETIME, 0)]).get(c.LIFETIME) == 0
    assert sum(h.server.free_ports().values()) == free


def test_even_port_without_reservation_needs_no_free_neighbour():
    """Found by an operator: R=0 asks for an even port only (RFC 8656 §7.2), yet turnd
    wanted port+1 free too and answered 508."""
    h = Harness(port_range=(50000, 50003))
    pool = h.server.pools[RELAY4]
    pool.take(50001)
    pool.take(50003)  # the odd ports are in use
    resp = h.allocate(alice(), h.five_tuple(), [(c.REQUESTED_TRANSPORT, 17), (c.EVEN_PORT, False)])
    assert resp.get(c.XOR_RELAYED_ADDRESS)[1] in (50000, 50002)
    assert error_code(h.allocate(alice(), h.five_tuple(port=2),
                                 [(c.REQUESTED_TRANSPORT, 17), (c.EVEN_PORT, True)])) == 508


def test_address_families(h):
    client = alice()
    v6 = h.allocate(client, h.five_tuple(port=1), [(c.REQUESTED_TRANSPORT, 17),
                                                   (c.REQUESTED_ADDRESS_FAMILY, 2)])
    assert v6.get(c.XOR_RELAYED_ADDRESS)[0] == RELAY6
    bad = h.allocate(client, h.five_tuple(port=2), [(c.REQUESTED_TRANSPORT, 17),
                                                    (c.REQUESTED_ADDRESS_FAMILY, 3)])
    assert error_code(bad) == 440
    dual = h.allocate(client, h.five_tuple(port=3), [(c.REQUESTED_TRANSPORT, 17),
                                                     (c.ADDITIONAL_ADDRESS_FAMILY, 2)])
    assert [a[0] for a in dual.get_all(c.XOR_RELAYED_ADDRESS)] == [RELAY4, RELAY6]
    both = h.allocate(client, h.five_tuple(port=4), [(c.REQUESTED_TRANSPORT, 17),
                                                     (c.REQUESTED_ADDRESS_FAMILY, 1),
                                                     (c.ADDITIONAL_ADDRESS_FAMILY, 2)])
    assert error_code(both) == 400
    v4add = h.allocate(client, h.five_tuple(port=5), [(c.REQUESTED_TRANSPORT, 17),
                                                      (c.ADDITIONAL_ADDRESS_FAMILY, 1)])
    assert error_code(v4add) == 400
    # dual allocation can reach peers of both families (bridging)
    ft = h.five_tuple(port=3)
    resp = h.call(client, ft, c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, PEER), (c.XOR_PEER_ADDRESS, PEER6)])
    assert resp.cls == c.SUCCESS
    # Refresh asking for a family the allocation lacks: 443
    assert error_code(h.call(client, h.five_tuple(port=1), c.REFRESH, [(c.REQUESTED_ADDRESS_FAMILY, 1)])) == 443


def test_dual_allocation_without_ipv6_relay_reports_address_error():
    h = Harness(relay_addresses=(RELAY4,))
    resp = h.allocate(alice(), h.five_tuple(), [(c.REQUESTED_TRANSPORT, 17), (c.ADDITIONAL_ADDRESS_FAMILY, 2)])
    assert resp.cls == c.SUCCESS
    assert resp.get_all(c.XOR_RELAYED_ADDRESS) == [resp.get(c.XOR_RELAYED_ADDRESS)]
    assert resp.get(c.ADDRESS_ERROR_CODE) == AddressErrorCode(2, 440, "Address Family not Supported")
    v6 = h.allocate(alice(), h.five_tuple(port=9), [(c.REQUESTED_TRANSPORT, 17), (c.REQUESTED_ADDRESS_FAMILY, 2)])
    assert error_code(v6) == 440


def test_coturn_draft_additional_address_family_code_point(h):
    resp = h.allocate(alice(), h.five_tuple(), [(c.REQUESTED_TRANSPORT, 17),
                                                (c.ADDITIONAL_ADDRESS_FAMILY_DRAFT, 2)])
    assert len(resp.get_all(c.XOR_RELAYED_ADDRESS)) == 2


@pytest.mark.parametrize("setting, client_ip, relay_ip", [
    ("ipv4", "2001:db8::5", RELAY4), ("ipv6", "203.0.113.5", RELAY6),
    ("keep", "2001:db8::5", RELAY6), ("keep", "203.0.113.5", RELAY4)])
def test_default_family(setting, client_ip, relay_ip):
    h = Harness(default_family=setting)
    ft = h.five_tuple(ip=client_ip, server=SERVER6 if ":" in client_ip else h.five_tuple().server)
    assert h.allocate(alice(), ft).get(c.XOR_RELAYED_ADDRESS)[0] == relay_ip


def test_dont_fragment():
    h = Harness()
    assert h.allocate(alice(), h.five_tuple(), [(c.REQUESTED_TRANSPORT, 17), (c.DONT_FRAGMENT, True)]).cls == c.SUCCESS
    h = Harness(dont_fragment=False)
    resp = h.allocate(alice(), h.five_tuple(), [(c.REQUESTED_TRANSPORT, 17), (c.DONT_FRAGMENT, True)])
    assert error_code(resp) == 420 and resp.get(c.UNKNOWN_ATTRIBUTES) == (c.DONT_FRAGMENT,)


def test_rest_api_secrets_with_rotation_and_expiry():
    h = Harness(secrets=("old-secret", "new-secret"))
    for secret in ("old-secret", "new-secret"):
        name = f"{int(h.now) + 3600}:carol"
        client = TurnClient(name, rest_password(secret, name))
        assert h.allocate(client, h.five_tuple(port=hash(secret) % 1000)).cls == c.SUCCESS
    name = str(int(h.now) - 1)
    expired = TurnClient(name, rest_password("new-secret", name))
    assert error_code(h.allocate(expired, h.five_tuple(port=5000))) == 401
    name = f"{int(h.now) + 3600}"
    wrong = TurnClient(name, rest_password("other", name))
    assert error_code(h.allocate(wrong, h.five_tuple(port=5001))) == 401


def test_hex_key_user():
    import hashlib
    key = hashlib.md5(b"dave:example.org:davepw").hexdigest()
    h = Harness(users={"dave": "0x" + key})
    assert h.allocate(TurnClient("dave", "davepw"), h.five_tuple()).cls == c.SUCCESS


def test_sha256_password_algorithm_and_message_integrity_sha256(h):
    client, ft = TurnClient("alice", "alicepw", integrity="sha256"), h.five_tuple()
    msg, data = client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
    client.learn(h.replies(h.send(data, ft))[0])
    key = long_term_key("alice", "example.org", "alicepw", c.ALGORITHM_SHA256)
    algs = (PasswordAlgorithm(1), PasswordAlgorithm(2))
    req = Message(c.ALLOCATE, c.REQUEST, b"s" * 12, [
        (c.REQUESTED_TRANSPORT, 17), (c.USERNAME, "alice"), (c.REALM, client.realm),
        (c.NONCE, client.nonce), (c.PASSWORD_ALGORITHMS, algs),
        (c.PASSWORD_ALGORITHM, PasswordAlgorithm(2))])
    resp = decode_untrusted(h.replies(h.send(encode(req, key=key, integrity="sha256"), ft))[0])
    assert resp.cls == c.SUCCESS and resp.get(c.MESSAGE_INTEGRITY_SHA256)
    assert verify_integrity(resp, key)
    # PASSWORD-ALGORITHM without PASSWORD-ALGORITHMS: 400
    req.attributes = [a for a in req.attributes if a[0] != c.PASSWORD_ALGORITHMS]
    req.transaction_id = b"t" * 12
    resp = decode_untrusted(h.replies(h.send(encode(req, key=key, integrity="sha256"), ft))[0])
    assert error_code(resp) == 400


def test_userhash_instead_of_username(h):
    client, ft = alice(), h.five_tuple()
    msg, data = client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
    client.learn(h.replies(h.send(data, ft))[0])
    req = Message(c.ALLOCATE, c.REQUEST, b"u" * 12, [
        (c.REQUESTED_TRANSPORT, 17), (c.USERHASH, userhash("alice", "example.org")),
        (c.REALM, client.realm), (c.NONCE, client.nonce)])
    resp = decode_untrusted(h.replies(h.send(encode(req, key=client.key), ft))[0])
    assert resp.cls == c.SUCCESS


def test_send_indication_needs_a_permission(h):
    client, ft = alice(), h.five_tuple()
    h.allocate(client, ft)
    from .turn_client import send_indication
    assert h.send(send_indication(client, PEER, b"hi"), ft) == []
    h.call(client, ft, c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, PEER)])
    [action] = h.send(send_indication(client, PEER, b"hi"), ft)
    assert isinstance(action, SendToPeer) and action.peer == PEER and action.data == b"hi"
    assert h.send(send_indication(client, PEER6, b"hi"), ft) == []  # no IPv6 relay


def test_expiry_of_permissions_channels_and_allocations(h):
    client, ft = alice(), h.five_tuple()
    h.allocate(client, ft)
    h.call(client, ft, c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4000), (c.XOR_PEER_ADDRESS, PEER)])
    alloc = h.server.allocations[ft]
    h.now += 301
    h.call(client, ft, c.REFRESH, [(c.LIFETIME, 3600)])
    assert h.server.expire(h.now) == []
    assert alloc.permissions == {} and 0x4000 in alloc.channels
    h.now += 300
    h.server.expire(h.now)
    assert alloc.channels == {} and alloc.peer_channels == {}
    free = sum(h.server.free_ports().values())
    h.now += 3600
    [deleted] = h.server.expire(h.now)
    assert isinstance(deleted, AllocationDeleted) and deleted.alloc is alloc
    assert h.server.allocations == {} and sum(h.server.free_ports().values()) == free + 1


def test_attributes_after_message_integrity_are_ignored(h):
    """coturn and pion, 2026: LIFETIME appended after MESSAGE-INTEGRITY."""
    client, ft = alice(), h.five_tuple()
    h.allocate(client, ft)
    msg, data = client.request(c.REFRESH, [(c.LIFETIME, 600)])
    body = data[20:] + struct.pack("!HHI", c.LIFETIME, 4, 0) + \
        struct.pack("!HH", c.XOR_PEER_ADDRESS, 8) + bytes(8)
    forged = data[:2] + len(body).to_bytes(2, "big") + data[4:20] + body
    resp = decode_untrusted(h.replies(h.send(forged, ft))[0])
    assert resp.cls == c.SUCCESS and resp.get(c.LIFETIME) == 600
    assert ft in h.server.allocations


def test_every_padding_byte_is_zero(h):
    """CVE-2020-4067: padding must never carry other data."""
    h = Harness(realm="r", software="abcde")
    client, ft = alice(), h.five_tuple()
    datas = []
    msg, data = client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
    datas += h.replies(h.send(data, ft))
    client.learn(datas[-1])
    msg, data = client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 6)])
    datas += h.replies(h.send(data, ft))
    msg, data = client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
    datas += h.replies(h.send(data, ft))
    for d in datas:
        pos = 20
        while pos < len(d):
            t, n = struct.unpack_from("!HH", d, pos)
            pad = -n % 4
            assert d[pos + 4 + n:pos + 4 + n + pad] == b"\0" * pad, (hex(t), d.hex())
            pos += 4 + n + pad


@pytest.mark.parametrize("username", ["%s%n%x", "a\r\nb", "a\x00b", "u" * 600])
def test_hostile_usernames_get_400_or_401(h, username):
    client = TurnClient(username, "pw")
    msg, data = client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
    client.learn(h.replies(h.send(data, h.five_tuple()))[0])
    msg, data = client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)]) if len(username) < 513 else (None, None)
    if data is None:  # too long to encode: build it raw
        raw = username.encode()
        body = struct.pack("!HH", c.USERNAME, len(raw)) + raw
        data = struct.pack("!HHI", 0x0003, len(body), c.MAGIC_COOKIE) + b"x" * 12 + body
    assert error_code(decode_untrusted(h.replies(h.send(data, h.five_tuple()))[0])) in (400, 401)


def test_invalid_utf8_username_gets_400(h):
    raw = b"\xff\xfe"
    body = struct.pack("!HH", c.USERNAME, len(raw)) + raw + b"\0\0"
    data = struct.pack("!HHI", 0x0003, len(body), c.MAGIC_COOKIE) + b"x" * 12 + body
    assert error_code(decode_untrusted(h.replies(h.send(data, h.five_tuple()))[0])) == 400


def test_401_responses_are_rate_limited_per_source_ip():
    h = Harness(unauth_rate=20)
    client = alice()
    answered = 0
    for i in range(200):
        msg, data = client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)], auth=False)
        answered += len(h.replies(h.send(data, h.five_tuple(port=i))))
    assert answered == 2 * h.config.unauth_rate  # the burst, then nothing in the same second
    assert h.server.stats["dropped_rate_limited"] == 200 - answered
    # another source IP is not affected
    msg, data = client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)], auth=False)
    assert h.replies(h.send(data, h.five_tuple(ip="203.0.113.99")))
    h.now += 1
    assert h.replies(h.send(data, h.five_tuple()))


def test_no_rate_limit_with_rate_zero():
    h = Harness(unauth_rate=0)
    _, data = alice().request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)], auth=False)
    assert all(h.replies(h.send(data, h.five_tuple(port=i))) for i in range(2000))


def test_unauthenticated_flood_keeps_no_state():
    """Pre-auth state exhaustion: thousands of unauthenticated Allocates from many ports."""
    import gc
    import tracemalloc
    h = Harness(unauth_rate=1e9)  # answer them all: we measure state, not the rate limit
    client = alice()
    msgs = [client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)], auth=False)[1]
            for _ in range(200)]
    for i, data in enumerate(msgs):  # warm up caches
        h.send(data, h.five_tuple(port=i))
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for round_ in range(25):
        for i, data in enumerate(msgs):
            h.send(data, h.five_tuple(port=1000 + round_ * 200 + i, ip=f"198.18.{round_}.{i % 250}"))
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert h.server.allocations == {} and h.server.reservations == {}
    assert grown < 64 * 1024, grown  # 5000 requests: flat (no per-request state)


def test_messages_after_a_valid_allocation_with_appended_peer_are_ignored(h):
    """A CreatePermission with a denied XOR-PEER-ADDRESS appended after MESSAGE-INTEGRITY."""
    client, ft = alice(), h.five_tuple()
    h.allocate(client, ft)
    msg, data = client.request(c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, PEER)])
    extra = encode(Message(c.BINDING, c.REQUEST, msg.transaction_id,
                           [(c.XOR_PEER_ADDRESS, ("10.0.0.1", 1))]))[20:]
    body = data[20:] + extra
    forged = data[:2] + len(body).to_bytes(2, "big") + data[4:20] + body
    resp = decode_untrusted(h.replies(h.send(forged, ft))[0])
    assert resp.cls == c.SUCCESS
    assert set(h.server.allocations[ft].permissions) == {"8.8.8.8"}


def test_expired_channel_cannot_be_rebound_differently_for_five_minutes(h):
    client, ft = alice(), h.five_tuple()
    h.allocate(client, ft, [(c.REQUESTED_TRANSPORT, 17), (c.LIFETIME, 3600)])

    def bind(number, peer):
        return h.call(client, ft, c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, number), (c.XOR_PEER_ADDRESS, peer)])

    assert bind(0x4000, PEER).cls == c.SUCCESS
    h.now += 601
    h.server.expire(h.now)
    assert error_code(bind(0x4000, ("1.1.1.1", 1))) == 400  # the number is cooling down
    assert error_code(bind(0x4001, PEER)) == 400           # and so is the peer
    assert bind(0x4000, PEER).cls == c.SUCCESS              # the same pair may come back
    h.now += 601
    h.server.expire(h.now)
    h.now += 301
    h.server.expire(h.now)
    assert bind(0x4001, PEER).cls == c.SUCCESS              # after 5 minutes, anything goes


def test_userhash_feature_only_with_a_user_table():
    from turnd.auth import AnyOf, RestSecrets, StaticUsers
    from turnd.turn.nonce import FEATURE_USERNAME_ANONYMITY
    from turnd.turn.protocol import ProtocolConfig, TurnServer
    rest_only = TurnServer(ProtocolConfig(), credentials=AnyOf(RestSecrets(["s"])))
    both = TurnServer(ProtocolConfig(), credentials=AnyOf(RestSecrets(["s"]), StaticUsers({"a": "b"}, "turnd")))
    assert not rest_only.nonces.features & FEATURE_USERNAME_ANONYMITY
    assert both.nonces.features & FEATURE_USERNAME_ANONYMITY
