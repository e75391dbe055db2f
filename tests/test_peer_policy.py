"""Peer policy: the rows of the known-attacks table, on every path that takes a peer."""

import pytest

from turnd.stun import constants as c
from turnd.turn.policy import PeerPolicy, embedded_ipv4

from .core_harness import RELAY4, RELAY6, SERVER4, Harness, error_code
from .turn_client import TurnClient, send_indication

UNSAFE = [
    # CVE-2020-26262: 0.0.0.0/8 and :: reached the server's loopback
    "0.0.0.0", "0.1.2.3", "::", "::1",
    # CVE-2026-27624: IPv4 inside IPv6
    "::ffff:127.0.0.1", "::127.0.0.1", "2002:7f00:1::1", "64:ff9b::7f00:1",
    "64:ff9b::a00:1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "2002:a9fe:a9fe::1",
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo whose client is 127.0.0.1
    # SSRF: internal services and cloud metadata
    "169.254.169.254", "10.0.0.1", "172.16.0.1", "192.168.1.1", "100.64.0.1", "127.0.0.1",
    "fe80::1", "fc00::1", "fd12:3456::1", "224.0.0.1", "ff02::1", "255.255.255.255", "240.0.0.1",
]
SAFE = ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("ip", UNSAFE)
def test_default_policy_denies(ip):
    assert not PeerPolicy().allowed(ip)


@pytest.mark.parametrize("ip", SAFE)
def test_default_policy_allows_public(ip):
    assert PeerPolicy().allowed(ip)


def test_allow_wins_over_defaults_and_most_specific_decides():
    policy = PeerPolicy(allow=["10.0.0.0/8", "127.0.0.1/32"], deny=["10.1.0.0/16", "8.8.8.0/24"])
    assert policy.allowed("10.2.3.4") and policy.allowed("127.0.0.1")
    assert not policy.allowed("10.1.2.3")
    assert not policy.allowed("127.0.0.2")
    assert not policy.allowed("8.8.8.8")
    assert policy.allowed("::ffff:127.0.0.1")  # the embedded address is what counts
    assert PeerPolicy(allow=["10.0.0.5/32"], deny=["10.0.0.0/8"]).allowed("10.0.0.5")


def test_embedded_ipv4_forms():
    import ipaddress
    v4 = lambda s: [str(a) for a in embedded_ipv4(ipaddress.IPv6Address(s))]
    assert v4("::ffff:1.2.3.4") == ["1.2.3.4"]
    assert v4("2002:102:304::") == ["1.2.3.4"]
    assert v4("64:ff9b::102:304") == ["1.2.3.4"]
    assert "127.0.0.1" in v4("2001:0:4136:e378:8000:63bf:80ff:fffe")


def _allocated(h, client, ft, family=None):
    attrs = [(c.REQUESTED_TRANSPORT, 17)]
    if family:
        attrs.append((c.ADDITIONAL_ADDRESS_FAMILY, 2))
    assert h.allocate(client, ft, attrs).cls == c.SUCCESS


@pytest.mark.parametrize("ip", UNSAFE)
def test_unsafe_peers_get_403_on_every_request_and_drop_on_send(ip):
    h = Harness()
    client, ft = TurnClient("alice", "alicepw"), h.five_tuple()
    _allocated(h, client, ft, family="dual")
    peer = (ip, 3478)
    assert error_code(h.call(client, ft, c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, peer)])) == 403
    assert error_code(h.call(client, ft, c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4001),
                                                          (c.XOR_PEER_ADDRESS, peer)])) == 403
    assert h.send(send_indication(client, peer, b"x"), ft) == []
    assert h.server.allocations[ft].permissions == {}


def test_own_listen_endpoint_and_other_ports_on_own_addresses_are_unreachable():
    # turnd's own addresses are public here (not in the default deny list)
    h = Harness(listen=(("203.0.113.200", 3478),), relay_addresses=("203.0.113.200",),
                external=(("203.0.113.200", "198.51.100.77"),))
    client, ft = TurnClient("alice", "alicepw"), h.five_tuple(server=("203.0.113.200", 3478))
    assert h.allocate(client, ft).cls == c.SUCCESS
    for peer in [("203.0.113.200", 3478), ("203.0.113.200", 22), ("198.51.100.77", 5432),
                 ("::ffff:203.0.113.200", 3478)]:
        resp = h.call(client, ft, c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4001), (c.XOR_PEER_ADDRESS, peer)])
        assert error_code(resp) in (403, 443), peer
    # the relay addresses of live allocations (internal or external) stay reachable
    other = TurnClient("bob", "bobpw")
    ft2 = h.five_tuple(port=41000, server=("203.0.113.200", 3478))
    relayed = h.allocate(other, ft2).get(c.XOR_RELAYED_ADDRESS)
    assert relayed[0] == "198.51.100.77"
    assert h.call(client, ft, c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4002), (c.XOR_PEER_ADDRESS, relayed)]).cls == c.SUCCESS
    internal = ("203.0.113.200", relayed[1])
    assert h.call(client, ft, c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4003), (c.XOR_PEER_ADDRESS, internal)]).cls == c.SUCCESS
    assert h.call(client, ft, c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, ("198.51.100.77", 1))]).cls == c.SUCCESS


def test_loopback_peers_only_when_allowed():
    h = Harness(allow=["127.0.0.1/32"])
    client, ft = TurnClient("alice", "alicepw"), h.five_tuple()
    _allocated(h, client, ft)
    assert h.call(client, ft, c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, ("127.0.0.1", 3480))]).cls == c.SUCCESS
    assert error_code(h.call(client, ft, c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, ("127.0.0.2", 3480))])) == 403
