"""A Hypothesis state machine drives the real shell and relay engine over real loopback
sockets (the engine's epoll pumped synchronously, time explicit): requests, ChannelData,
Send indications, peer datagrams and clock steps in any order.  It checks the engine's
tables (the sockets it serves, the clients of the listen socket) against the core's
allocations, and that no datagram ever reaches or comes from an unpermitted peer."""

from __future__ import annotations

import functools
import socket
import struct

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from turnd.config import AuthConfig, Config, Endpoint, PeersConfig, RelayConfig, ServerConfig
from turnd.server import Shell, open_group
from turnd.stun import decode_untrusted
from turnd.stun import constants as c

from .turn_client import TurnClient, channel_data, send_indication

PEER_IPS = ["127.0.0.2", "127.0.0.3"]
TAG = struct.Struct("!BBI")  # sender kind (0 client, 1 peer), sender index, sequence


def nonblocking_udp(host: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.setblocking(False)
    return s


def drain(sock: socket.socket) -> list[tuple[bytes, tuple]]:
    out = []
    while True:
        try:
            out.append(sock.recvfrom(65536))
        except BlockingIOError:
            return out


class EngineMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.now = 1_700_000_000.0
        config = Config(server=ServerConfig(listen=(Endpoint("127.0.0.1", 0),), realm="turnd.test"),
                        auth=AuthConfig(users=(("alice", "alicepw"),)),
                        relay=RelayConfig(ports=(48000, 48019)),
                        peers=PeersConfig(allow=("127.0.0.0/8",)))
        udps, tcps = open_group("127.0.0.1", 0)
        tcps[0].close()
        self.listen = udps[0]
        self.server = self.listen.getsockname()
        self.shell = Shell(config, (self.server,), now_fn=lambda: self.now)
        self.engine = self.shell.engine
        self.engine.add_listener(self.listen, functools.partial(self.shell.udp_slow_path, self.server),
                                 (self.shell.core.config.channel_max >> 8) + 1)
        self.clients = [nonblocking_udp(f"127.0.1.{i + 1}") for i in range(2)]
        self.turn = [TurnClient("alice", "alicepw") for _ in self.clients]
        self.peers = [nonblocking_udp(ip) for ip in PEER_IPS]
        self.sequence = 0
        # The model, from successful responses only: client -> {peer ip: expiry}, and
        # client -> {channel number: peer address}
        self.permissions: list[dict] = [{}, {}]
        self.channels: list[dict] = [{}, {}]
        self.relayed: list = [None, None]
        self.delivered = 0

    def teardown(self):
        for s in self.clients + self.peers + [self.listen]:
            s.close()
        for alloc in list(self.shell.core.allocations.values()):
            for r in alloc.relays.values():
                r.handle.close()
        self.engine.close()

    # --- driving ------------------------------------------------------------------

    def pump(self):
        while True:
            events = self.engine.ep.poll(0, 256)
            if not events:
                return
            self.engine._batch(events, self.now)

    def alloc_of(self, i):
        from turnd.turn.protocol import FiveTuple
        return self.shell.core.allocations.get(FiveTuple("udp", self.clients[i].getsockname(), self.server))

    def request(self, i, method, attrs):
        for _ in range(2):
            msg, data = self.turn[i].request(method, attrs)
            self.clients[i].sendto(data, self.server)
            self.pump()
            resp = None
            for reply, _ in drain(self.clients[i]):
                if reply[0] < 0x40 and reply[:2] != b"\x00\x17":
                    got = self.turn[i].learn(reply)
                    if got.transaction_id == msg.transaction_id:
                        resp = got
                else:
                    self.check_client_datagram(i, reply)
            assert resp is not None
            err = resp.get(c.ERROR_CODE)
            if err is None or err.code not in (401, 438):
                return resp
        return resp

    def tag(self, kind: int, index: int) -> bytes:
        self.sequence += 1
        return TAG.pack(kind, index, self.sequence) + b"payload"

    # --- rules --------------------------------------------------------------------------

    @rule(i=st.integers(0, 1), lifetime=st.sampled_from([None, 0, 600]))
    def allocate_or_refresh(self, i, lifetime):
        if self.alloc_of(i) is None:
            resp = self.request(i, c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
            if resp.cls == c.SUCCESS:
                self.relayed[i] = resp.get(c.XOR_RELAYED_ADDRESS)
                self.permissions[i], self.channels[i] = {}, {}
        else:
            attrs = [] if lifetime is None else [(c.LIFETIME, lifetime)]
            resp = self.request(i, c.REFRESH, attrs)
            if resp.cls == c.SUCCESS and lifetime == 0:
                self.relayed[i] = None

    def live(self, data) -> int:
        """Mostly a client with an allocation (so requests and data get somewhere)."""
        live = [i for i in (0, 1) if self.relayed[i] is not None]
        if live and data.draw(st.integers(0, 4)):
            return data.draw(st.sampled_from(live))
        return data.draw(st.integers(0, 1))

    @precondition(lambda self: any(self.relayed))
    @rule(data=st.data(), j=st.integers(0, 1))
    def create_permission(self, data, j):
        i = self.live(data)
        peer = self.peers[j].getsockname()
        resp = self.request(i, c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, peer)])
        if resp.cls == c.SUCCESS:
            self.permissions[i][peer[0]] = self.now + 300

    @precondition(lambda self: any(self.relayed))
    @rule(data=st.data(), j=st.integers(0, 1), number=st.sampled_from([0x4000, 0x4001]))
    def channel_bind(self, data, j, number):
        i = self.live(data)
        peer = self.peers[j].getsockname()
        resp = self.request(i, c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, number), (c.XOR_PEER_ADDRESS, peer)])
        if resp.cls == c.SUCCESS:
            self.permissions[i][peer[0]] = self.now + 300
            self.channels[i][number] = peer

    @rule(data=st.data(), j=st.integers(0, 1), number=st.sampled_from([None, 0x4000, 0x4001]))
    def client_sends(self, data, j, number):
        i = self.live(data)
        peer = self.peers[j].getsockname()
        payload = self.tag(0, i)
        frame = send_indication(self.turn[i], peer, payload) if number is None else channel_data(number, payload)
        self.clients[i].sendto(frame, self.server)
        self.pump()
        self.collect()

    @rule(data=st.data(), j=st.integers(0, 1))
    def peer_sends(self, data, j):
        i = self.live(data)
        if self.relayed[i] is None:
            return
        self.peers[j].sendto(self.tag(1, j), self.relayed[i])
        self.pump()
        self.collect()

    @rule(seconds=st.sampled_from([1, 200, 301, 601]))
    def tick(self, seconds):
        self.now += seconds
        while True:
            self.shell.execute(self.shell.core.expire(self.now), None)
            if not self.shell.core.sweep_pending:
                break
        for i in (0, 1):
            alloc = self.alloc_of(i)
            if alloc is None:
                self.relayed[i] = None
            self.permissions[i] = {ip: t for ip, t in self.permissions[i].items() if t >= self.now}

    # --- checks -------------------------------------------------------------------------

    def collect(self):
        for j, peer in enumerate(self.peers):
            for data, src in drain(peer):
                kind, index, _ = TAG.unpack_from(data)
                assert kind == 0 and src == self.relayed[index], (src, self.relayed)
                assert self.permissions[index].get(peer.getsockname()[0], -1) >= self.now
                self.delivered += 1
        for i, client in enumerate(self.clients):
            for data, _ in drain(client):
                self.check_client_datagram(i, data)

    def check_client_datagram(self, i, data):
        if data[0] >= 0x40:  # ChannelData from a peer over a bound channel
            number, length = struct.unpack_from("!HH", data)
            payload = data[4:4 + length]
            peer = self.channels[i][number]
        else:
            msg = decode_untrusted(data)
            assert (msg.method, msg.cls) == (c.DATA, c.INDICATION)
            payload, peer = msg.get(c.DATA_ATTR), msg.get(c.XOR_PEER_ADDRESS)
        kind, index, _ = TAG.unpack_from(payload)
        assert kind == 1 and self.peers[index].getsockname() == peer
        assert self.permissions[i].get(peer[0], -1) >= self.now
        self.delivered += 1

    @invariant()
    def engine_tables_match_the_core(self):
        core = self.shell.core
        relay_fds = {r.handle.fileno() for a in core.allocations.values() for r in a.relays.values()}
        assert set(self.engine.handlers) == relay_fds | {self.listen.fileno()}
        clients = self.engine.handlers[self.listen.fileno()][2]
        assert clients == {a.client_handle.key: a for a in core.allocations.values()}
        for fd in relay_fds:
            assert self.engine.handlers[fd][2].relays  # the handler's allocation is live


EngineMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=40, deadline=None)
TestEngineMachine = EngineMachine.TestCase


def test_the_engine_machine_moves_data_both_ways():
    """Guards against a machine that only ever exercises error paths."""
    from hypothesis.stateful import run_state_machine_as_test
    delivered = []
    original = EngineMachine.teardown

    def counting_teardown(self):
        delivered.append(self.delivered)
        original(self)

    EngineMachine.teardown = counting_teardown
    try:
        run_state_machine_as_test(EngineMachine, settings=settings(
            max_examples=50, stateful_step_count=40, deadline=None, derandomize=True, database=None))
    finally:
        EngineMachine.teardown = original
    assert sum(delivered) > 20
