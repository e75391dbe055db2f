"""A Hypothesis state machine drives the core (and relay.py's routing) with random
requests, indications, peer datagrams and clock steps, and checks the invariants:
nothing reaches or leaves through an unpermitted peer, expired things are gone,
relay ports return to the pool, every response is well-formed."""

import struct

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from turnd.relay import Forwarder, RelayStats, UdpClient
from turnd.stun import decode_untrusted, verify_integrity
from turnd.stun import constants as c
from turnd.turn.protocol import AllocationCreated, AllocationDeleted, Reply, SendToPeer

from .core_harness import RELAY4, Harness
from .turn_client import TurnClient, send_indication

PEERS = [("8.8.8.8", 1000), ("8.8.8.8", 2000), ("1.1.1.1", 1000), ("2606:4700::1", 53),
         ("10.0.0.1", 1000), ("127.0.0.1", 3478), ("0.0.0.0", 3478), ("::ffff:127.0.0.1", 1)]
USERS = [("alice", "alicepw"), ("bob", "bobpw"), ("alice", "wrong")]  # index 2: bad password
CHANNELS = [0x3FFF, 0x4000, 0x4001, 0x4FFF, 0x5000]


class Sock:
    """Stands in for a socket: records what is sent."""

    def __init__(self, log, name, address=None):
        self.log, self.name = log, name
        self.address, self.closed = address, False  # as the FakeBinder's sockets

    def sendto(self, data, addr):
        self.log.append((self.name, bytes(data), addr))


class CoreMachine(RuleBasedStateMachine):
    delivered = {"to_client": 0, "to_peer": 0}  # how much data flowed, across all runs

    def __init__(self):
        super().__init__()
        self.h = Harness(port_range=(50000, 50009))
        self.pool_size = sum(self.h.server.free_ports().values())
        self.sent: list = []
        self.forwarder = Forwarder(self.h.server, RelayStats())
        self.clients = {}
        self.fts = [self.h.five_tuple(port=p) for p in (1, 2, 3)]
        # The model: (five-tuple) -> {peer ip: expiry}, from successful responses only.
        self.permissions: dict = {}

    def client(self, i, u):
        key = (i, u)
        if key not in self.clients:
            self.clients[key] = TurnClient(*USERS[u])
        return self.clients[key]

    def run(self, client, ft, method, attrs):
        resp = None
        for _ in range(2):
            msg, data = client.request(method, attrs)
            actions = self.h.send(data, ft)
            replies = [a for a in actions if isinstance(a, Reply)]
            assert len(replies) == 1
            resp = client.learn(replies[0].data)
            assert resp.transaction_id == msg.transaction_id and resp.method == method
            assert resp.cls in (c.SUCCESS, c.ERROR)
            for a in actions:
                if isinstance(a, AllocationCreated):
                    a.alloc.client_handle = UdpClient(Sock(self.sent, "client"), ft.client)
                    for r in a.alloc.relays.values():
                        r.handle = Sock(self.sent, ("relay", r.address), r.address)
                if isinstance(a, AllocationDeleted):
                    self.permissions.pop(ft, None)
            err = resp.get(c.ERROR_CODE)
            if err is None or err.code not in (401, 438):
                break
        if resp.cls == c.SUCCESS:
            assert verify_integrity(resp, client.key)
        return resp

    @rule(i=st.integers(0, 2), u=st.sampled_from([0, 0, 1, 1, 2]), lifetime=st.sampled_from([None, 0, 60, 1200]),
          even=st.sampled_from([None, False, True]), family=st.sampled_from([None, 1, 2]))
    def allocate(self, i, u, lifetime, even, family):
        attrs = [(c.REQUESTED_TRANSPORT, 17)]
        if lifetime is not None:
            attrs.append((c.LIFETIME, lifetime))
        if even is not None:
            attrs.append((c.EVEN_PORT, even))
        if family is not None:
            attrs.append((c.REQUESTED_ADDRESS_FAMILY, family))
        ft = self.fts[i]
        existed = ft in self.h.server.allocations
        resp = self.run(self.client(i, u), ft, c.ALLOCATE, attrs)
        if resp.cls == c.SUCCESS:
            assert not existed
            self.permissions[ft] = {}
        if USERS[u][1] == "wrong":
            assert resp.cls == c.ERROR

    @rule(data=st.data(), u=st.integers(0, 1), lifetime=st.sampled_from([0, 100, 600, 600, 600]))
    def refresh(self, data, u, lifetime):
        i = self.live(data)
        ft = self.fts[i]
        resp = self.run(self.client(i, u), ft, c.REFRESH, [(c.LIFETIME, lifetime)])
        if resp.cls == c.SUCCESS and lifetime == 0:
            assert ft not in self.h.server.allocations
            self.permissions.pop(ft, None)

    def live(self, data) -> int | None:
        """Mostly a five-tuple that has an allocation (so requests get past 437)."""
        live = [i for i, ft in enumerate(self.fts) if ft in self.h.server.allocations]
        if live and data.draw(st.integers(0, 9)) > 0:
            return data.draw(st.sampled_from(live))
        return data.draw(st.integers(0, 2))

    @rule(data=st.data(), u=st.integers(0, 1), peer=st.sampled_from(PEERS))
    def create_permission(self, data, u, peer):
        i = self.live(data)
        ft = self.fts[i]
        resp = self.run(self.client(i, u), ft, c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, peer)])
        if resp.cls == c.SUCCESS:
            assert self.h.server.policy.allowed(peer[0])
            self.permissions[ft][peer[0]] = self.h.now + 300

    @rule(data=st.data(), u=st.integers(0, 1), peer=st.sampled_from(PEERS),
          number=st.sampled_from(CHANNELS))
    def channel_bind(self, data, u, peer, number):
        i = self.live(data)
        ft = self.fts[i]
        resp = self.run(self.client(i, u), ft, c.CHANNEL_BIND,
                        [(c.CHANNEL_NUMBER, number), (c.XOR_PEER_ADDRESS, peer)])
        if resp.cls == c.SUCCESS:
            assert 0x4000 <= number <= 0x4FFF and self.h.server.policy.allowed(peer[0])
            self.permissions[ft][peer[0]] = self.h.now + 300

    def some_peer(self, data, ft):
        """Mostly a peer the model says is permitted, sometimes any peer."""
        live = {ip for ip, expiry in self.permissions.get(ft, {}).items() if expiry >= self.h.now}
        permitted = [p for p in PEERS if p[0] in live]
        if permitted and data.draw(st.integers(0, 3)) > 0:
            return data.draw(st.sampled_from(permitted))
        return data.draw(st.sampled_from(PEERS))

    @rule(data=st.data(), payload=st.binary(max_size=20))
    def send(self, data, payload):
        ft = self.fts[self.live(data)]
        peer = self.some_peer(data, ft)
        actions = self.h.send(send_indication(TurnClient("x", "y"), peer, payload), ft)
        for a in actions:
            assert isinstance(a, SendToPeer)
            assert self.permissions.get(ft, {}).get(peer[0], -1) >= self.h.now
            CoreMachine.delivered["to_peer"] += 1
            self.forwarder.to_peer(a.relay, a.peer, a.data, self.h.now)

    @rule(data=st.data(), payload=st.binary(max_size=20))
    def peer_datagram(self, data, payload):
        i = self.live(data)
        peer = self.some_peer(data, self.fts[i])
        alloc = self.h.server.allocations.get(self.fts[i])
        if alloc is None:
            return
        relay = alloc.relays.get(6 if ":" in peer[0] else 4)
        if relay is None:
            return
        before = len(self.sent)
        self.forwarder.to_client(relay, peer, payload, self.h.now)
        if len(self.sent) > before:
            CoreMachine.delivered["to_client"] += 1
            assert self.permissions[self.fts[i]].get(peer[0], -1) >= self.h.now
            name, frame, addr = self.sent[-1]
            assert name == "client" and addr == self.fts[i].client
            if frame[0] >= 0x40:  # ChannelData
                number, length = struct.unpack_from("!HH", frame)
                assert alloc.channels[number].peer == peer and frame[4:] == payload
            else:
                msg = decode_untrusted(frame)
                assert msg.get(c.XOR_PEER_ADDRESS) == peer and msg.get(c.DATA_ATTR) == payload

    @rule(seconds=st.sampled_from([1, 1, 30, 30, 299, 301, 599, 601, 1300]),
          budget=st.sampled_from([1, 2, 1000]))
    def tick(self, seconds, budget):
        self.h.now += seconds
        while True:  # as the shell's sweeper: bounded calls until nothing is due
            for a in self.h.server.expire(self.h.now, budget):
                assert isinstance(a, AllocationDeleted)
                self.permissions.pop(a.alloc.five_tuple, None)
            if not self.h.server.sweep_pending:
                break

    @invariant()
    def nothing_reaches_an_unpermitted_or_unsafe_peer(self):
        for name, data, addr in self.sent:
            if name != "client":
                assert self.h.server.policy.allowed(addr[0]), addr

    @invariant()
    def expired_things_are_gone_after_a_sweep(self):
        # time moves only in tick(), which sweeps: nothing expired may remain
        now = self.h.now
        for ft, alloc in self.h.server.allocations.items():
            assert alloc.expires >= now
            assert all(expiry >= now for expiry in alloc.permissions.values())
            for number, ch in alloc.channels.items():
                assert ch.expires >= now and alloc.peer_channels[ch.peer] is ch
                assert 0x4000 <= number <= 0x4FFF
            assert len(alloc.peer_channels) == len(alloc.channels)
        assert all(r.expires >= now for r in self.h.server.reservations.values())

    @invariant()
    def relay_ports_return_to_the_pool(self):
        used: dict = {}
        for alloc in self.h.server.allocations.values():
            for r in alloc.relays.values():
                used[r.address[0]] = used.get(r.address[0], 0) + 1
        for r in self.h.server.reservations.values():
            used[r.ip] = used.get(r.ip, 0) + 1
        # A port is handed out only after its socket is closed: never busy in here.
        assert not self.h.server._busy_ports
        for ip, free in self.h.server.free_ports().items():
            assert free + used.get(ip, 0) == self.pool_size // 2, ip


CoreMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
TestCoreMachine = CoreMachine.TestCase


def test_the_machine_moves_data_both_ways():
    """Guards against a machine that only ever exercises error paths."""
    CoreMachine.delivered.update(to_client=0, to_peer=0)
    run_state_machine_as_test(CoreMachine, settings=settings(
        max_examples=300, stateful_step_count=50, deadline=None, derandomize=True, database=None))
    assert CoreMachine.delivered["to_client"] > 0 and CoreMachine.delivered["to_peer"] > 0
