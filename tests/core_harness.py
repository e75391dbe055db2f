"""The TURN core in memory: a server, fake relay sockets, and clients with explicit time."""

from __future__ import annotations

import os
import random
import struct

from turnd.auth import AnyOf, RestSecrets, StaticUsers
from turnd.stun import Message
from turnd.stun import constants as c
from turnd.stun.attributes import encode_value
from turnd.turn.policy import PeerPolicy
from turnd.turn.protocol import BindFailed, FiveTuple, PortBusy, ProtocolConfig, Reply, TurnServer

from .turn_client import TurnClient

SERVER4 = ("192.0.2.1", 3478)
SERVER6 = ("2001:db8::1", 3478)
RELAY4 = "198.51.100.1"
RELAY6 = "2001:db8::100"


class FakeSocket:
    def __init__(self, ip, port):
        self.address = (ip, port)
        self.closed = False


class FakeBinder:
    """Binds like the kernel would: a port that is still open (or that another program
    has, ``refuse``) is busy; ``fail`` makes every bind fail as EMFILE would."""

    def __init__(self):
        self.refuse: set[int] = set()
        self.fail = False
        self.bound: list[FakeSocket] = []
        self.open: set[tuple] = set()

    def bind(self, ip, port, dont_fragment):
        if self.fail:
            raise BindFailed()
        if port in self.refuse or (ip, port) in self.open:
            raise PortBusy()
        sock = FakeSocket(ip, port)
        self.bound.append(sock)
        self.open.add(sock.address)
        return sock

    def unbind(self, sock):
        assert not sock.closed, "closed twice"
        sock.closed = True
        self.open.discard(sock.address)


class Harness:
    def __init__(self, users=None, secrets=(), allow=(), deny=(), **overrides):
        settings = dict(realm="example.org", listen=(SERVER4, SERVER6),
                        relay_addresses=(RELAY4, RELAY6), port_range=(50000, 50099))
        settings.update(overrides)
        self.config = ProtocolConfig(**settings)
        users = {"alice": "alicepw", "bob": "bobpw"} if users is None else users
        backends = [StaticUsers(users, self.config.realm)]
        if secrets:
            backends.append(RestSecrets(secrets))
        self.binder = FakeBinder()
        self.server = TurnServer(self.config, credentials=AnyOf(*backends),
                                 policy=PeerPolicy(allow, deny), binder=self.binder,
                                 rng=random.Random(7), nonce_secret=b"n" * 32)
        self.now = 1_700_000_000.0

    def five_tuple(self, port=40000, ip="203.0.113.5", server=SERVER4):
        return FiveTuple("udp", (ip, port), server)

    def send(self, data: bytes, ft: FiveTuple) -> list:
        return self.server.handle_untrusted(data, ft, self.now)

    def replies(self, actions) -> list[bytes]:
        return [a.data for a in actions if isinstance(a, Reply)]

    def call(self, client: TurnClient, ft: FiveTuple, method: int, attributes=(), **kw) -> Message:
        """One request; on 401/438 learn the nonce and retry once, like real clients."""
        msg, data = client.request(method, attributes, **kw)
        resp = client.learn(self.replies(self.send(data, ft))[0])
        err = resp.get(c.ERROR_CODE)
        if err is not None and err.code in (401, 438) and kw.get("auth", True):
            msg, data = client.request(method, attributes, **kw)
            resp = client.learn(self.replies(self.send(data, ft))[0])
        assert resp.transaction_id == msg.transaction_id
        return resp

    def allocate(self, client: TurnClient, ft: FiveTuple, attributes=None) -> Message:
        attrs = [(c.REQUESTED_TRANSPORT, 17)] if attributes is None else attributes
        return self.call(client, ft, c.ALLOCATE, attrs)


def error_code(msg: Message) -> int | None:
    err = msg.get(c.ERROR_CODE)
    return err.code if err is not None else None


def count_calls(fn) -> int:
    """How many Python and C functions ``fn()`` calls: a measure of work that, unlike a
    timing, is the same on every machine and every run."""
    import sys
    n = 0

    def profile(frame, event, arg):
        nonlocal n
        if event in ("call", "c_call"):
            n += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return n


# --- requests built to cost the most before authentication ----------------------

def tlv(t, v):
    return struct.pack("!HH", t, len(v)) + v + b"\0" * (-len(v) % 4)


def worst_requests():
    """Unauthenticated 64 KiB requests built to cost the most."""
    tid = os.urandom(12)
    xor6 = encode_value(c.XOR_PEER_ADDRESS, ("2001:db8::1", 1), tid)
    algs = b"".join(struct.pack("!HH", 1, 0) for _ in range(8))
    bodies = {
        "unknown types": b"".join(tlv(0x0100 + i, b"") for i in range(16000)),
        "peer addresses": b"".join(tlv(c.XOR_PEER_ADDRESS, xor6) for _ in range(2700)),
        "64 peer addresses": b"".join(tlv(c.XOR_PEER_ADDRESS, xor6) for _ in range(64)),
        "unknown attributes list": tlv(c.UNKNOWN_ATTRIBUTES, b"\x7f\xff" * 32000),
        "password algorithms": b"".join(tlv(c.PASSWORD_ALGORITHMS, algs) for _ in range(64)),
        "data": tlv(c.DATA_ATTR, b"\0" * 65000),
        "usernames": b"".join(tlv(c.USERNAME, b"u" * 512) for _ in range(64)),
    }
    out = {}
    for name, body in bodies.items():
        body = body[:65532 - 8]
        out[name] = struct.pack("!HHI", 0x0003, len(body), c.MAGIC_COOKIE) + tid + body
    return out
