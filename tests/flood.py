#!/usr/bin/env python3
"""A hostile client, as its own process: for SECONDS it floods a STUN/TURN server with
garbage, oversized and unauthenticated requests from many loopback source addresses
(127.0.1.1-127.0.1.200), and opens abusive TCP connections.  Bounded: it stops by itself,
sends at most RATE datagrams per second, and never reads an answer.

    python tests/flood.py HOST UDP_PORT TCP_PORT SECONDS [RATE]

Prints one line of what it sent (kind=count ...).
"""

from __future__ import annotations

import os
import random
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.core_harness import tlv, worst_requests  # noqa: E402
from turnd.stun import Message, encode  # noqa: E402
from turnd.stun import constants as c  # noqa: E402
from turnd.stun.attributes import encode_value  # noqa: E402

COOKIE = struct.pack("!I", c.MAGIC_COOKIE)


def header(kind: int, body: bytes) -> bytes:
    return struct.pack("!HH", kind, len(body)) + COOKIE + os.urandom(12) + body


def learn_nonce(sock: socket.socket, server) -> tuple[str, str]:
    """One honest 401 round trip: the realm and a nonce good for this source address."""
    from turnd.stun import decode_untrusted
    sock.settimeout(2)
    sock.sendto(encode(Message(c.ALLOCATE, c.REQUEST, os.urandom(12), [(c.REQUESTED_TRANSPORT, 17)])), server)
    reply = decode_untrusted(sock.recv(2048))
    sock.setblocking(False)
    return reply.get(c.REALM), reply.get(c.NONCE)


def messages(realm: str, nonce: str) -> dict:
    tid = os.urandom(12)
    xor6 = encode_value(c.XOR_PEER_ADDRESS, ("2001:db8::1", 1), tid)
    unauth = encode(Message(c.ALLOCATE, c.REQUEST, os.urandom(12), [(c.REQUESTED_TRANSPORT, 17)]))
    # A far-future REST user name with a wrong MESSAGE-INTEGRITY and a valid nonce: the
    # server derives a key per configured secret before it can say no.
    bad_login = encode(Message(c.ALLOCATE, c.REQUEST, os.urandom(12), [
        (c.REQUESTED_TRANSPORT, 17), (c.USERNAME, "9999999999:mallory"), (c.REALM, realm),
        (c.NONCE, nonce)]), key=b"k" * 16)
    bad_fp = bytearray(encode(Message(c.BINDING, c.REQUEST, os.urandom(12)), fingerprint=True))
    bad_fp[-1] ^= 1
    worst = worst_requests()
    return {
        "garbage": lambda: os.urandom(random.randint(1, 1500)),
        "huge_garbage": lambda: os.urandom(65507),
        "unknown_attrs_64k": lambda: worst["unknown types"],
        "peers_64k": lambda: worst["peer addresses"],
        "unauthenticated": lambda: unauth,
        "bad_login": lambda: bad_login,
        "malformed": lambda: header(0x0001, tlv(c.XOR_MAPPED_ADDRESS, b"")),
        "channel_data": lambda: b"\x40\x00\x00\x10" + os.urandom(16),
        "send_indication": lambda: header(0x0016, tlv(c.XOR_PEER_ADDRESS, xor6) + tlv(c.DATA_ATTR, b"x")),
        "bad_fingerprint": lambda: bytes(bad_fp),
    }


def main() -> None:
    host, udp_port, tcp_port, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    rate = float(sys.argv[5]) if len(sys.argv) > 5 else 2000.0
    login = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    login.bind(("127.0.1.250", 0))
    kinds = messages(*learn_nonce(login, (host, udp_port)))
    weights = {"garbage": 30, "huge_garbage": 1, "unknown_attrs_64k": 1, "peers_64k": 1,
               "unauthenticated": 30, "bad_login": 10, "malformed": 10, "channel_data": 10,
               "send_indication": 5, "bad_fingerprint": 5}
    names = list(weights)
    socks = []
    for i in range(1, 201):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.bind((f"127.0.1.{i}", 0))
        s.setblocking(False)
        socks.append(s)
    sent = {name: 0 for name in names}
    sent["tcp_connections"] = 0
    held = []
    start = time.monotonic()
    next_send = start
    while time.monotonic() - start < seconds:
        name = random.choices(names, [weights[n] for n in names])[0]
        # half the unauthenticated requests from one address: its 401s get rate-limited
        if name == "bad_login":
            sock = login  # the nonce is bound to this address
        elif name == "unauthenticated" and random.random() < 0.5:
            sock = socks[0]
        else:
            sock = random.choice(socks)
        try:
            sock.sendto(kinds[name](), (host, udp_port))
            sent[name] += 1
        except OSError:
            pass
        if sent[name] % 50 == 0:  # now and then, an abusive TCP connection
            t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            t.bind((f"127.0.2.{random.randint(1, 3)}", 0))  # few sources: the per-IP cap
            t.setblocking(False)
            try:
                t.connect((host, tcp_port))
            except BlockingIOError:
                pass
            try:
                t.send(random.choice([b"\x00", b"GET / HTTP/1.1\r\n", os.urandom(8), b""]))
            except OSError:
                pass
            sent["tcp_connections"] += 1
            held.append(t)
            if len(held) > 300:
                held.pop(0).close()
        next_send += 1.0 / rate
        delay = next_send - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    for t in held:
        t.close()
    print(" ".join(f"{k}={v}" for k, v in sent.items()), flush=True)


if __name__ == "__main__":
    main()
