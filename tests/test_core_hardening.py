"""Hardening of the sans-I/O core: the review's findings that need no socket, and the
bounds on work and state that hold whatever a client sends."""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turnd.stun import Message, PasswordAlgorithm, encode
from turnd.stun import constants as c
from turnd.stun.attributes import encode_value
from turnd.turn.protocol import AllocationDeleted, FiveTuple

from .core_harness import Harness, count_calls, error_code, tlv, worst_requests
from .turn_client import TurnClient

PEER = ("8.8.8.8", 5000)


def alice():
    return TurnClient("alice", "alicepw")


# --- 7: failed logins cost what a 401 costs; unknown users cost what known ones do ---------

def test_a_failed_rest_login_costs_about_what_a_401_costs():
    h = Harness(secrets=("s1", "s2", "s3"), unauth_rate=1e9)
    client, ft = TurnClient("9999999999:mallory", "wrong"), h.five_tuple()
    _, challenge = client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)], auth=False)
    client.learn(h.replies(h.send(challenge, ft))[0])
    _, attempt = client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
    assert error_code(client.learn(h.replies(h.send(attempt, ft))[0])) == 401
    base = count_calls(lambda: h.send(challenge, ft))
    failed = count_calls(lambda: h.send(attempt, ft))
    # Before: SASLprep walked every character of every derived password through the
    # stringprep tables, ~3,800 calls (330 us) for three secrets.
    assert failed < 4 * base, (failed, base)


def test_unknown_and_known_users_cost_the_same_hmac(monkeypatch):
    import turnd.turn.protocol as protocol
    h = Harness()
    checked = []
    real = protocol.verify_integrity
    monkeypatch.setattr(protocol, "verify_integrity",
                        lambda msg, key: checked.append(key) or real(msg, key))
    for port, client in enumerate((TurnClient("alice", "wrong"), TurnClient("nobody", "wrong"))):
        ft = h.five_tuple(port=port + 1)
        _, d = client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
        client.learn(h.replies(h.send(d, ft))[0])
        checked.clear()
        _, d = client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
        assert error_code(client.learn(h.replies(h.send(d, ft))[0])) == 401
        assert len(checked) == 1  # one HMAC, whether or not the user exists


# --- 8: an expired allocation is gone at once -------------------------------------------

def test_an_expired_allocation_answers_nothing_before_any_sweep():
    h = Harness()
    client, ft = alice(), h.five_tuple()
    assert h.allocate(client, ft).get(c.LIFETIME) == 600
    free = h.server.free_ports()
    h.now += 700  # no expire() call in between
    assert error_code(h.call(client, ft, c.REFRESH, [(c.LIFETIME, 600)])) == 437
    assert ft not in h.server.allocations
    assert h.server.free_ports()[h.config.relay_addresses[0]] == free[h.config.relay_addresses[0]] + 1
    assert h.allocate(client, ft).cls == c.SUCCESS  # the 5-tuple is free again


def test_the_expiry_is_reported_to_the_shell():
    h = Harness()
    client, ft = alice(), h.five_tuple()
    h.allocate(client, ft)
    alloc = h.server.allocations[ft]
    h.now += 700
    _, d = client.request(c.REFRESH, [(c.LIFETIME, 600)])
    actions = h.send(d, ft)
    assert [a.alloc for a in actions if isinstance(a, AllocationDeleted)] == [alloc]
    assert all(s.closed for s in h.binder.bound)


# --- 12: EVEN-PORT reservations count toward the quotas --------------------------------

def test_reservations_count_toward_the_user_quota():
    h = Harness(user_quota=2, port_range=(50000, 50019))
    client, ft = alice(), h.five_tuple()
    even = [(c.REQUESTED_TRANSPORT, 17), (c.EVEN_PORT, True)]
    resp = h.allocate(client, ft, even)
    assert resp.cls == c.SUCCESS and resp.get(c.RESERVATION_TOKEN)
    assert h.call(client, ft, c.REFRESH, [(c.LIFETIME, 0)]).cls == c.SUCCESS
    # The reservation still holds a port: it counts for 30 s, and EVEN-PORT with the R
    # bit needs room for two.
    assert h.server.user_allocations["alice"] == 1
    assert error_code(h.allocate(client, h.five_tuple(port=2), even)) == 486
    assert h.allocate(client, h.five_tuple(port=4)).cls == c.SUCCESS  # one fits
    assert h.call(client, h.five_tuple(port=4), c.REFRESH, [(c.LIFETIME, 0)]).cls == c.SUCCESS
    h.now += 31
    h.server.expire(h.now)
    assert h.allocate(client, h.five_tuple(port=3), even).cls == c.SUCCESS


def test_even_port_with_a_reservation_needs_room_for_two():
    """Found in review: the quota counted an Allocate with EVEN-PORT (R) as one."""
    h = Harness(user_quota=1, total_quota=1)
    even = [(c.REQUESTED_TRANSPORT, 17), (c.EVEN_PORT, True)]
    assert error_code(h.allocate(alice(), h.five_tuple(), even)) == 486
    assert h.allocate(alice(), h.five_tuple(), [(c.REQUESTED_TRANSPORT, 17), (c.EVEN_PORT, False)]).cls == c.SUCCESS


def test_ip_quota_counts_per_ipv4_address_and_ipv6_64():
    h = Harness(ip_quota=2)
    for port in (1, 2):
        assert h.allocate(alice(), h.five_tuple(port=port)).cls == c.SUCCESS
    assert error_code(h.allocate(alice(), h.five_tuple(port=3))) == 486
    assert h.allocate(alice(), h.five_tuple(port=3, ip="203.0.113.6")).cls == c.SUCCESS
    six = [h.five_tuple(port=1, ip=f"2001:db8:1:2::{i}") for i in (1, 2, 3)]
    assert h.allocate(alice(), six[0]).cls == c.SUCCESS
    assert h.allocate(alice(), six[1]).cls == c.SUCCESS
    assert error_code(h.allocate(alice(), six[2])) == 486  # the same /64
    assert h.allocate(alice(), h.five_tuple(port=1, ip="2001:db8:1:3::1")).cls == c.SUCCESS


def test_using_ones_own_reservation_at_the_quota_is_allowed():
    h = Harness(user_quota=2)
    client = alice()
    resp = h.allocate(client, h.five_tuple(port=1), [(c.REQUESTED_TRANSPORT, 17), (c.EVEN_PORT, True)])
    token = resp.get(c.RESERVATION_TOKEN)
    # one allocation + one reservation = 2: the RTCP allocation swaps the reservation
    resp = h.allocate(client, h.five_tuple(port=2), [(c.REQUESTED_TRANSPORT, 17), (c.RESERVATION_TOKEN, token)])
    assert resp.cls == c.SUCCESS
    assert h.server.user_allocations["alice"] == 2


def test_looping_even_port_and_refresh_zero_holds_no_more_than_the_quota():
    h = Harness(user_quota=2, port_range=(50000, 50099), unauth_rate=1e9)
    client = alice()
    even = [(c.REQUESTED_TRANSPORT, 17), (c.EVEN_PORT, True)]
    created = 0
    for i in range(50):
        ft = h.five_tuple(port=i + 1)
        if h.allocate(client, ft, even).cls == c.SUCCESS:
            created += 1
            h.call(client, ft, c.REFRESH, [(c.LIFETIME, 0)])
    assert created == 1
    assert len(h.server.reservations) == 1
    assert sum(h.server.free_ports().values()) >= 2 * 100 - 2


# --- 13: the 401 offers only algorithms every user can log in with --------------------

def test_md5_key_users_get_only_md5_offered_and_can_log_in():
    from turnd.stun import long_term_key
    key = long_term_key("carol", "example.org", "carolpw").hex()
    h = Harness(users={"carol": "0x" + key})
    client, ft = TurnClient("carol", "carolpw"), h.five_tuple()
    _, d = client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)], auth=False)
    resp = client.learn(h.replies(h.send(d, ft))[0])
    assert resp.get(c.PASSWORD_ALGORITHMS) == (PasswordAlgorithm(c.ALGORITHM_MD5),)
    assert h.allocate(client, ft).cls == c.SUCCESS


def test_users_with_both_keys_can_log_in_with_sha256():
    from turnd.stun import long_term_key
    md5 = long_term_key("carol", "example.org", "carolpw", c.ALGORITHM_MD5).hex()
    sha = long_term_key("carol", "example.org", "carolpw", c.ALGORITHM_SHA256).hex()
    h = Harness(users={"carol": ("0x" + md5, "0x" + sha)})
    ft = h.five_tuple()
    client = TurnClient("carol", "carolpw")
    _, d = client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)], auth=False)
    resp = client.learn(h.replies(h.send(d, ft))[0])
    offered = resp.get(c.PASSWORD_ALGORITHMS)
    assert offered == (PasswordAlgorithm(1), PasswordAlgorithm(2))
    # A client that picks SHA-256 (RFC 8489 §9.2.4)
    attrs = [(c.REQUESTED_TRANSPORT, 17), (c.USERNAME, "carol"), (c.REALM, client.realm),
             (c.NONCE, client.nonce), (c.PASSWORD_ALGORITHMS, offered),
             (c.PASSWORD_ALGORITHM, PasswordAlgorithm(2))]
    msg = Message(c.ALLOCATE, c.REQUEST, os.urandom(12), attrs)
    key = long_term_key("carol", client.realm, "carolpw", c.ALGORITHM_SHA256)
    resp = client.learn(h.replies(h.send(encode(msg, key=key, integrity="sha256"), ft))[0])
    assert resp.cls == c.SUCCESS, resp


# --- the expiry sweep does bounded work ------------------------------------------------

def test_ten_thousand_allocations_expire_in_bounded_sweeps():
    n = 10_000
    h = Harness(port_range=(20000, 20000 + n), unauth_rate=1e9)
    server = h.server
    client = alice()
    h.allocate(client, h.five_tuple(port=1))  # learn the realm
    for i in range(2, n + 1):
        ft = h.five_tuple(port=i)
        client.nonce = server.nonces.make(server._client_key(ft), h.now)  # as a 401 would
        _, d = client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
        h.send(d, ft)
    assert len(server.allocations) == n
    for alloc in list(server.allocations.values())[:100]:
        alloc.permissions[PEER[0]] = h.now + 300
        server._wake_by(alloc, h.now + 300)
    h.now += 301  # the permissions are due: 100 allocations to look at
    assert server.expire(h.now) == [] and not server.sweep_pending
    h.now += 300  # every allocation is due
    per_call = []
    while True:
        per_call.append(len(server.expire(h.now, budget=1000)))
        if not server.sweep_pending:
            break
    assert per_call == [1000] * (n // 1000)  # each step bounded, the work units counted
    assert server.allocations == {} and len(server.wheel) == 0
    assert all(s.closed for s in h.binder.bound)


def test_ten_thousand_due_allocations_take_several_bounded_sweeps():
    h = Harness(port_range=(20000, 30000))
    server = h.server
    for i in range(10_000):
        server.wheel.schedule(("stand-in", i), h.now + 5 + (i % 3))
    h.now += 10
    sizes = []
    while True:
        due = server.wheel.due(h.now, 1000)
        sizes.append(len(due))
        if not server.wheel.pending(h.now):
            break
    assert sizes == [1000] * 10


def test_the_wheel_does_not_grow_with_churn():
    from turnd.turn.wheel import ExpiryWheel
    wheel = ExpiryWheel()
    for i in range(100_000):  # allocate and delete at once, over and over, in one second
        entry = ("alloc", i)
        wheel.schedule(entry, 1000.5)
        wheel.cancel(entry)
    assert len(wheel) == 0 and len(wheel._keys) == 1 and len(wheel._slots) == 1


# --- bounded work before authentication ------------------------------------------------

def test_the_worst_unauthenticated_requests_do_bounded_work():
    h = Harness(unauth_rate=1e9)
    ft = h.five_tuple()
    base = count_calls(lambda: h.send(encode(Message(c.ALLOCATE, c.REQUEST, os.urandom(12),
                                                     [(c.REQUESTED_TRANSPORT, 17)])), ft))
    for name, data in worst_requests().items():
        assert len(data) <= 65552
        work = count_calls(lambda: h.send(data, ft))
        # The cap on attributes, duplicates ignored unread and addresses built only when
        # read keep any 64 KiB request within a few plain ones (bench/worst_request.py
        # times them: about 60 us at most; before, 2.2 s).
        assert work < 5 * base, (name, work, base)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(set(range(0, 0x30)) | {0x8000, 0x8001, 0x8002,
                                                                          0x8022, 0x8028, 0x7FFF})),
                          st.integers(0, 2000)), min_size=1, max_size=200))
def test_any_unauthenticated_request_does_bounded_work(tlvs):
    h = Harness(unauth_rate=1e9)
    ft = h.five_tuple()
    body = b"".join(tlv(t, bytes([t & 0xFF, 1]) * (n // 2)) for t, n in tlvs)[:65500]
    body += b"\0" * (-len(body) % 4)
    data = struct.pack("!HHI", 0x0003, len(body), c.MAGIC_COOKIE) + os.urandom(12) + body
    work = count_calls(lambda: h.send(data, ft))
    assert work < 20_000, work


def test_the_sweep_budget_counts_channels_and_permissions_not_just_allocations():
    """Found in review: 4,096 channels per allocation made one 'allocation' of sweep work
    cost 0.3 ms; the budget now counts every item looked at, and channels are capped."""
    h = Harness(channels_per_allocation=8, unauth_rate=1e9)
    client, ft = alice(), h.five_tuple()
    h.allocate(client, ft, [(c.REQUESTED_TRANSPORT, 17), (c.LIFETIME, 3600)])
    peers = [(f"8.8.8.{i}", 9) for i in range(10)]
    codes = [error_code(h.call(client, ft, c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4000 + i),
                                                           (c.XOR_PEER_ADDRESS, p)]))
             for i, p in enumerate(peers)]
    assert codes == [None] * 8 + [508, 508]
    alloc = h.server.allocations[ft]
    h.now += 601  # channels expire and cool down; permissions expired too
    h.server.expire(h.now, budget=1)
    assert not h.server.sweep_pending and not alloc.channels and len(alloc.cooldown) == 8
    # a cooling channel is O(1) to check, by number and by peer
    assert error_code(h.call(client, ft, c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4000),
                                                         (c.XOR_PEER_ADDRESS, peers[9])])) == 400
    assert error_code(h.call(client, ft, c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4009),
                                                         (c.XOR_PEER_ADDRESS, peers[0])])) == 400
    assert h.call(client, ft, c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4000),
                                               (c.XOR_PEER_ADDRESS, peers[0])]).cls == c.SUCCESS
    assert 0x4000 not in alloc.cooldown and peers[0] not in alloc.cooldown_peers


def test_unauthenticated_errors_of_every_kind_share_the_rate_limit():
    """Found in review: 400, 420 and 438 answers skipped the per-IP limit (438 at x1.7)."""
    h = Harness(unauth_rate=20)
    ft = h.five_tuple()
    bad = struct.pack("!HHI", 0x0001, 4, c.MAGIC_COOKIE) + os.urandom(12) + struct.pack("!HH", c.XOR_MAPPED_ADDRESS, 0)
    stale = TurnClient("alice", "alicepw")
    stale.realm, stale.nonce = "example.org", "obMatJos2gAAAAAAAAAAAAAAAAAAAAA"
    answered = 0
    for i in range(100):
        answered += len(h.replies(h.send(bad, ft)))
        answered += len(h.replies(h.send(stale.request(c.REFRESH, [])[1], ft)))
    assert answered == 2 * h.config.unauth_rate  # one bucket for both kinds
    assert h.server.stats["error_438"] > 0 and h.server.stats["bad_requests"] == 100


def test_permission_cap_is_checked_before_any_policy_work():
    """Found in review: 60 fresh IPv6 peers cost 2.5 ms of policy work, then got 508."""
    # Teredo peers whose server and client are public: the costliest to judge
    peers = [(f"2001:0:808:808::f7f7:{0xfff0 - i:x}", 9) for i in range(60)]
    work = {}
    for cap in (4, 100):
        h = Harness(permissions_per_allocation=cap, unauth_rate=1e9)
        client, ft = alice(), h.five_tuple()
        h.allocate(client, ft, [(c.REQUESTED_TRANSPORT, 17), (c.ADDITIONAL_ADDRESS_FAMILY, 2)])
        _, d = client.request(c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, p) for p in peers])
        work[cap] = count_calls(lambda: h.send(d, ft))
        code = error_code(client.learn(h.replies(h.send(d, ft))[0]))
        assert code == (508 if cap == 4 else None)
    assert work[4] < work[100] / 3, work  # refused before the policy looked at any peer


def test_messages_from_turnds_own_relays_are_never_answered():
    """Found in review: with a wildcard listen, a relay could reach turnd's own listen port
    through another host address, and turnd answered its own relay."""
    h = Harness()
    h.allocate(alice(), h.five_tuple())
    [alloc] = h.server.allocations.values()
    relay_addr = alloc.relays[4].address
    _, binding = TurnClient("x", "y").request(c.BINDING, [], auth=False)
    assert h.send(binding, FiveTuple("udp", relay_addr, h.five_tuple().server)) == []
    assert h.server.stats["dropped_own_relay"] == 1


def test_host_addresses_are_turnds_own_and_a_wildcard_listen_port_is_never_a_peer():
    h = Harness(listen=(("0.0.0.0", 3478),), host_addresses=("8.8.4.4",), allow=("8.8.4.4/32",))
    client, ft = alice(), h.five_tuple()
    h.allocate(client, ft)
    bind = lambda n, peer: error_code(h.call(client, ft, c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, n),
                                                                         (c.XOR_PEER_ADDRESS, peer)]))
    assert bind(0x4000, ("8.8.4.4", 3478)) == 403   # turnd's listen port, on a host address
    assert bind(0x4001, ("8.8.4.4", 5000)) is None  # explicitly allowed, another port
    plain = Harness(host_addresses=("8.8.4.4",))
    c2, ft2 = alice(), plain.five_tuple()
    plain.allocate(c2, ft2)
    assert error_code(plain.call(c2, ft2, c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, ("8.8.4.4", 1))])) == 403
    assert plain.call(c2, ft2, c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, ("8.8.8.8", 1))]).cls == c.SUCCESS


def test_a_user_name_of_non_ascii_digits_gets_a_plain_401():
    """"²:x" is digits to str.isdigit but not to int(): it once made an internal error."""
    from .core_harness import Harness
    from .turn_client import TurnClient
    from turnd.stun import constants as c
    h = Harness(users={"alice": "pw"})
    for name in ("²:x", "٣:x", "1000000000:x", "99999999999999999999:x"):
        client = TurnClient(name, "nope")
        resp = h.call(client, h.five_tuple(), c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
        assert resp.get(c.ERROR_CODE).code == 401
