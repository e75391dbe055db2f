"""TURN over real loopback sockets: the relay in both directions, families, relay-to-relay."""

import struct

import pytest
import trio
import trio.testing

from turnd.config import Endpoint, RelayConfig
from turnd.server import serve
from turnd.stun import decode_untrusted
from turnd.stun import constants as c

from .helpers import UdpTurn, recv_or_none, turn_config, udp_client
from .turn_client import channel_data, send_indication


@pytest.fixture
async def running(nursery):
    return await nursery.start(serve, turn_config())


async def test_channel_data_both_ways(running):
    with trio.fail_after(10):
        peer = await udp_client("127.0.0.1")
        turn = await UdpTurn.connect(running.udp[0])
        relayed = await turn.allocate()
        assert relayed[0] == "127.0.0.1" and 40000 <= relayed[1] <= 40999
        await turn.bind(0x4000, peer.getsockname())
        await turn.sock.sendto(channel_data(0x4000, b"hello peer"), running.udp[0])
        data, src = await peer.recvfrom(65536)
        assert (data, src) == (b"hello peer", relayed)
        await peer.sendto(b"hello client", relayed)
        assert await turn.recv() == channel_data(0x4000, b"hello client")
    assert running.stats.to_peer == 1 and running.stats.to_client == 1


async def test_send_and_data_indications(running):
    with trio.fail_after(10):
        peer = await udp_client("127.0.0.1")
        turn = await UdpTurn.connect(running.udp[0])
        relayed = await turn.allocate()
        await turn.permit(peer.getsockname())
        await turn.sock.sendto(send_indication(turn.client, peer.getsockname(), b"abc"), running.udp[0])
        assert await peer.recvfrom(65536) == (b"abc", relayed)
        await peer.sendto(b"xyz", relayed)
        raw = await turn.recv()
    msg = decode_untrusted(raw)
    assert (msg.method, msg.cls) == (c.DATA, c.INDICATION)
    assert msg.get(c.XOR_PEER_ADDRESS) == peer.getsockname()
    assert msg.get(c.DATA_ATTR) == b"xyz"
    assert raw.endswith(b"xyz\x00")  # padding is zero


async def test_unpermitted_peer_reaches_nobody(running):
    """libjuice: peer-to-client permission not enforced."""
    with trio.fail_after(10):
        stranger = await udp_client("127.0.0.1")
        turn = await UdpTurn.connect(running.udp[0])
        relayed = await turn.allocate()
        await stranger.sendto(b"spam", relayed)
        assert await turn.recv(timeout=0.3) is None
        # and Send to an unpermitted peer goes nowhere either
        await turn.sock.sendto(send_indication(turn.client, stranger.getsockname(), b"x"), running.udp[0])
        assert await recv_or_none(stranger) is None
    assert running.stats.dropped_no_permission >= 2


@pytest.mark.parametrize("client_host, family, peer_host", [
    ("127.0.0.1", 2, "::1"),   # IPv4 client, IPv6 relay, IPv6 peer
    ("::1", 1, "127.0.0.1"),   # IPv6 client, IPv4 relay, IPv4 peer
])
async def test_bridging_between_families(running, client_host, family, peer_host):
    server = running.udp[0 if client_host == "127.0.0.1" else 1]
    with trio.fail_after(10):
        peer = await udp_client(peer_host)
        turn = await UdpTurn.connect(server)
        relayed = await turn.allocate([(c.REQUESTED_ADDRESS_FAMILY, family)])
        assert relayed[0] == peer_host
        await turn.bind(0x4ABC, peer.getsockname()[:2])
        await turn.sock.sendto(channel_data(0x4ABC, b"across"), server)
        data, src = await peer.recvfrom(65536)
        assert data == b"across" and src[:2] == relayed
        await peer.sendto(b"back", relayed)
        assert await turn.recv() == channel_data(0x4ABC, b"back")


async def test_dual_allocation_reaches_both_families(running):
    with trio.fail_after(10):
        peer4, peer6 = await udp_client("127.0.0.1"), await udp_client("::1")
        turn = await UdpTurn.connect(running.udp[0])
        resp = await turn.call(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17), (c.ADDITIONAL_ADDRESS_FAMILY, 2)])
        relay4, relay6 = resp.get_all(c.XOR_RELAYED_ADDRESS)
        await turn.bind(0x4001, peer4.getsockname())
        await turn.bind(0x4002, peer6.getsockname()[:2])
        await turn.sock.sendto(channel_data(0x4001, b"four"), running.udp[0])
        await turn.sock.sendto(channel_data(0x4002, b"six"), running.udp[0])
        assert await peer4.recvfrom(100) == (b"four", relay4)
        data, src = await peer6.recvfrom(100)
        assert data == b"six" and src[:2] == relay6


async def test_relay_to_relay_is_delivered_internally(nursery):
    # Default peer policy: loopback is NOT allowed, yet two relay-only clients can talk,
    # because the peer is one of turnd's own relay addresses.
    running = await nursery.start(serve, turn_config(allow=()))
    with trio.fail_after(10):
        a = await UdpTurn.connect(running.udp[0])
        b = await UdpTurn.connect(running.udp[0], "bob", "bobpw")
        relay_a, relay_b = await a.allocate(), await b.allocate()
        await a.permit(relay_b)
        await b.bind(0x4100, relay_a)
        await a.sock.sendto(send_indication(a.client, relay_b, b"from a"), running.udp[0])
        assert await b.recv() == channel_data(0x4100, b"from a")
        await b.sock.sendto(channel_data(0x4100, b"from b"), running.udp[0])
        msg = decode_untrusted(await a.recv())
        assert msg.get(c.DATA_ATTR) == b"from b" and msg.get(c.XOR_PEER_ADDRESS) == relay_b
    assert running.stats.internal == 2


async def test_other_ports_on_own_addresses_are_never_reached(nursery):
    running = await nursery.start(serve, turn_config(allow=()))
    with trio.fail_after(10):
        service = await udp_client("127.0.0.1")  # e.g. a database on the server
        turn = await UdpTurn.connect(running.udp[0])
        await turn.allocate()
        await turn.permit(("127.0.0.1", 1))  # allowed: it is turnd's relay address
        for target in (service.getsockname(), running.udp[0]):
            await turn.sock.sendto(send_indication(turn.client, target, b"probe"), running.udp[0])
        resp = await turn.call(c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4000),
                                                (c.XOR_PEER_ADDRESS, service.getsockname())])
        assert resp.get(c.ERROR_CODE).code == 403
        resp = await turn.call(c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4000),
                                                (c.XOR_PEER_ADDRESS, running.udp[0])])
        assert resp.get(c.ERROR_CODE).code == 403
        assert await recv_or_none(service) is None
        # a local process sending to the relay port reaches nobody either
        assert running.core.stats.get("peers_denied") == 2
    assert running.stats.dropped_own_address >= 1


async def test_listen_endpoint_is_denied_even_when_loopback_is_allowed(running):
    with trio.fail_after(10):
        turn = await UdpTurn.connect(running.udp[0])
        await turn.allocate()
        resp = await turn.call(c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4000),
                                                (c.XOR_PEER_ADDRESS, running.udp[0])])
        assert resp.get(c.ERROR_CODE).code == 403


async def test_zero_address_peer_never_reaches_loopback(nursery):
    """CVE-2020-26262: peer 0.0.0.0 reached the server's loopback."""
    running = await nursery.start(serve, turn_config(allow=()))
    with trio.fail_after(10):
        victim = await udp_client("127.0.0.1")
        turn = await UdpTurn.connect(running.udp[0])
        await turn.allocate()
        for ip in ("0.0.0.0", "127.0.0.1", "::ffff:127.0.0.1"):
            peer = (ip, victim.getsockname()[1])
            resp = await turn.call(c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4000), (c.XOR_PEER_ADDRESS, peer)])
            assert resp.get(c.ERROR_CODE).code in (403, 443)
            await turn.sock.sendto(send_indication(turn.client, peer, b"x"), running.udp[0])
        assert await recv_or_none(victim) is None


@pytest.mark.parametrize("size", [1500, 9000, 65507])
async def test_huge_datagrams_are_handled(running, size):
    """pion/turn: a datagram larger than the read buffer panicked."""
    with trio.fail_after(10):
        peer = await udp_client("127.0.0.1")
        turn = await UdpTurn.connect(running.udp[0])
        relayed = await turn.allocate()
        await turn.bind(0x4000, peer.getsockname())
        junk = await udp_client("127.0.0.1")
        await junk.sendto(b"\x00\x01" + b"\xaa" * (size - 2), running.udp[0])
        await junk.sendto(b"\x40\x00" + b"\xbb" * (size - 2), running.udp[0])
        payload = b"p" * (size - 4)
        await turn.sock.sendto(channel_data(0x4000, payload), running.udp[0])
        assert await peer.recvfrom(70000) == (payload, relayed)
        await peer.sendto(b"q" * min(size, 65507 - 4), relayed)
        got = await turn.recv()
        assert got[:2] == b"\x40\x00" and len(got) == 4 + min(size, 65507 - 4)
        # still serving everyone
        assert (await turn.call(c.REFRESH, [(c.LIFETIME, 600)])).cls == c.SUCCESS


@pytest.fixture
def jumping_clock():
    """Autojump, but only after 20 ms of real idleness, so loopback replies arrive first.
    pytest-trio runs the test on any Clock a fixture returns."""
    return trio.testing.MockClock(autojump_threshold=0.02)


async def test_expiry_closes_the_relay_and_returns_the_port(nursery, jumping_clock):
    with trio.fail_after(5000):  # virtual seconds
        running = await nursery.start(serve, turn_config(relay=RelayConfig(ports=(41000, 41000))))
        peer = await udp_client("127.0.0.1")
        turn = await UdpTurn.connect(running.udp[0])
        relayed = await turn.allocate()
        await turn.permit(peer.getsockname())
        assert relayed == ("127.0.0.1", 41000)
        await trio.sleep(400)  # the permission (300 s) is gone, the allocation (600 s) not
        await peer.sendto(b"late", relayed)
        assert await turn.recv(timeout=1) is None
        await trio.sleep(300)  # the allocation is gone too
        assert running.core.allocations == {}
        assert running.core.free_ports() == {"127.0.0.1": 1, "::1": 1}
        # the port is really closed: a fresh allocation gets it again
        turn2 = await UdpTurn.connect(running.udp[0], "bob", "bobpw")
        assert await turn2.allocate() == ("127.0.0.1", 41000)


async def test_dont_fragment_is_honoured_on_the_relay_socket(running):
    import socket
    with trio.fail_after(10):
        turn = await UdpTurn.connect(running.udp[0])
        await turn.allocate([(c.DONT_FRAGMENT, True)])
        plain = await UdpTurn.connect(running.udp[0], "bob", "bobpw")
        await plain.allocate()
    by_user = {a.username: a for a in running.core.allocations.values()}
    opt = getattr(socket, "IP_MTU_DISCOVER", 10)
    assert by_user["alice"].relays[4].handle.getsockopt(socket.IPPROTO_IP, opt) == 2  # IP_PMTUDISC_DO
    assert by_user["bob"].relays[4].handle.getsockopt(socket.IPPROTO_IP, opt) != 2


async def test_a_bug_in_the_core_drops_one_request_not_the_daemon(running):
    calls = []

    def broken(data, ft, now):
        calls.append(ft)
        raise RuntimeError("simulated bug")

    real = running.core.handle_untrusted
    running.core.handle_untrusted = broken
    with trio.fail_after(10):
        turn = await UdpTurn.connect(running.udp[0])
        await turn.sock.sendto(b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"x" * 12, running.udp[0])
        assert await turn.recv(timeout=0.3) is None
        running.core.handle_untrusted = real
        assert await turn.allocate()
    assert len(calls) == 1


async def test_expired_allocation_forwards_nothing_before_the_sweep(nursery, jumping_clock, monkeypatch):
    """The hot path checks allocation expiry itself: ChannelData and Send indications
    stop the moment the allocation expires, not at the next sweep."""
    import turnd.server
    monkeypatch.setattr(turnd.server, "SWEEP_INTERVAL", 10**6)  # no sweep during the test
    with trio.fail_after(5000):  # virtual seconds
        running = await nursery.start(serve, turn_config())
        peer = await udp_client("127.0.0.1")
        turn = await UdpTurn.connect(running.udp[0])
        await turn.allocate()  # 600 s
        await trio.sleep(400)
        await turn.bind(0x4000, peer.getsockname())  # channel until 1000 s, permission 700 s
        await trio.sleep(250)  # the allocation expired at 600 s; nothing has swept it
        assert running.core.allocations  # still there, unswept
        await turn.sock.sendto(channel_data(0x4000, b"stale"), running.udp[0])
        await turn.sock.sendto(send_indication(turn.client, peer.getsockname(), b"stale"), running.udp[0])
        assert await recv_or_none(peer, timeout=1) is None
