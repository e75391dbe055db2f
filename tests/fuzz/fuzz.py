#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris, libFuzzer) of every function that takes untrusted bytes.

    python tests/fuzz/fuzz.py TARGET [libFuzzer options] [CORPUS_DIR ...]

Targets:
  codec      decode_untrusted; integrity and FINGERPRINT checks; decode(encode(m)) == m
  framer     StreamFramer over any chunking: whole frames out, bounded buffer
  fastpath   the relay's send_indication_untrusted / peer_from_xor_untrusted, held to the
             codec and the core (what the fast path relays, the core would relay)
  core       TurnServer.handle_untrusted on UDP and TCP 5-tuples: a program of raw
             messages, authenticated requests (signed right, so the fuzzer gets past
             authentication), mutated ones, clock steps and bounded sweeps; every reply
             must decode, the port pool must add up, and nothing but a reply may come out

Any exception other than the codec's decode error (where that is allowed) is a crash:
libFuzzer writes the input to a crash-* file; turn it into a regression test.
`make fuzz` runs every target for FUZZ_SECONDS; `make test` runs each for a few seconds
(tests/test_fuzz_smoke.py).  Seeds: tests/corpus/ (RFC vectors and real clients' messages).
"""

from __future__ import annotations

import os
import struct
import sys

import atheris

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

with atheris.instrument_imports(include=["turnd"]):
    from turnd import relay
    from turnd.stun import StunDecodeError, decode_untrusted, encode, verify_fingerprint, verify_integrity
    from turnd.stun import constants as c
    from turnd.stun.attributes import CODECS
    from turnd.stun.framing import MAX_FRAME, StreamFramer
    from turnd.turn.protocol import (AllocationCreated, AllocationDeleted, AllocationRefreshed,
                                     FiveTuple, Refused,
                                     Reply, SendToPeer)
    from tests import vectors
    from tests.core_harness import SERVER4, SERVER6, Harness
    from tests.turn_client import TurnClient

CORPUS = os.path.join(ROOT, "tests", "corpus")

INTEGRITY = (c.MESSAGE_INTEGRITY, c.MESSAGE_INTEGRITY_SHA256, c.FINGERPRINT)


class Reader:
    """Reads a fuzz input front to back (so seeds are easy to write by hand)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return (self.byte() << 8) | self.byte()

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def pick(self, seq):
        return seq[self.byte() % len(seq)]


# --- codec ------------------------------------------------------------------------

def codec(data: bytes) -> None:
    try:
        msg = decode_untrusted(data)
    except StunDecodeError:
        return
    verify_integrity(msg, b"key")
    verify_fingerprint(msg)
    plain = [(t, v) for t, v in msg.attributes if t not in INTEGRITY]
    again = decode_untrusted(encode(msg))
    assert (again.method, again.cls, again.transaction_id) == (msg.method, msg.cls, msg.transaction_id)
    assert again.attributes == plain, (again.attributes, plain)


# --- framer -----------------------------------------------------------------------

def framer(data: bytes) -> None:
    r = Reader(data)
    f = StreamFramer()
    sizes = [1, 3, 4, 7, 20, 100, 1500, 65536]
    try:
        while r.left():
            f.feed(r.take(min(r.pick(sizes), f.room)))
            while (frame := f.next_frame_untrusted()) is not None:
                length = (frame[2] << 8) | frame[3]
                if frame[0] < 0x40:
                    assert len(frame) == 20 + length
                    codec(frame)
                else:
                    assert 0x40 <= frame[0] < 0x50 and len(frame) == 4 + length
            assert 1 <= f.room and f.buffered <= MAX_FRAME
    except StunDecodeError:
        pass


# --- the relay's fast path --------------------------------------------------------

def _alloc_with_both_relays():
    h = Harness()
    ft = h.five_tuple()
    h.allocate(TurnClient("alice", "alicepw"), ft,
               [(c.REQUESTED_TRANSPORT, 17), (c.ADDITIONAL_ADDRESS_FAMILY, 2)])
    return h, ft, h.server.allocations[ft]


_FAST = None


def fastpath(data: bytes) -> None:
    global _FAST
    if _FAST is None:
        _FAST = _alloc_with_both_relays()
    h, ft, alloc = _FAST
    if len(data) >= 1:
        relay.peer_from_xor_untrusted(memoryview(data[1:]), data[-12:].rjust(12, b"\0"))
    found = relay.send_indication_untrusted(memoryview(data), len(data))
    if found is None:
        return
    peer, start, end = found
    msg = decode_untrusted(data)  # what the fast path accepts, the codec decodes
    assert (msg.method, msg.cls) == (c.SEND, c.INDICATION) and not msg.unknown_required
    assert msg.fingerprint_offset is None or verify_fingerprint(msg)
    assert msg.get(c.XOR_PEER_ADDRESS) == peer and msg.get(c.DATA_ATTR) == data[start:end]
    alloc.permissions[peer[0]] = h.now + 300
    actions = h.server.handle_untrusted(data, ft, h.now)
    alloc.permissions.clear()
    assert [(type(a), a.peer, bytes(a.data)) for a in actions] == [(SendToPeer, peer, data[start:end])]


# --- the core ---------------------------------------------------------------------

PEERS = [("8.8.8.8", 1000), ("8.8.8.8", 2000), ("2606:4700::1", 53), ("10.0.0.1", 1),
         ("127.0.0.1", 3478), ("0.0.0.0", 0), ("::ffff:127.0.0.1", 1), ("198.51.100.1", 50000),
         ("64:ff9b::808:808", 7), ("::1", 9)]
USERS = [("alice", "alicepw"), ("bob", "bobpw"), ("alice", "wrong"), ("9999999999:x", "rest")]
METHODS = [c.ALLOCATE, c.REFRESH, c.CREATE_PERMISSION, c.CHANNEL_BIND, c.BINDING, c.SEND, 0x00A]
FIVE_TUPLES = [FiveTuple("udp", ("203.0.113.5", 40000 + i), SERVER4) for i in range(3)] + [
    FiveTuple("udp", ("2001:db8::5", 40000), SERVER6), FiveTuple("tcp", ("203.0.113.5", 40010), SERVER4)]


def _attributes(r: Reader, tokens: list) -> list:
    out = []
    for _ in range(r.byte() % 6):
        kind = r.byte() % 13
        if kind == 0:
            out.append((c.REQUESTED_TRANSPORT, r.pick([17, 17, 6, 0])))
        elif kind == 1:
            out.append((c.LIFETIME, r.pick([0, 1, 600, 3600, 99999, 2**32 - 1])))
        elif kind == 2:
            out.append((c.XOR_PEER_ADDRESS, r.pick(PEERS)))
        elif kind == 3:
            out.append((c.CHANNEL_NUMBER, r.pick([0x3FFF, 0x4000, 0x4001, 0x4FFF, 0x5000, 0x7FFF, 0xFFFF])))
        elif kind == 4:
            out.append((c.EVEN_PORT, bool(r.byte() & 1)))
        elif kind == 5:
            out.append((c.RESERVATION_TOKEN, r.pick(tokens + [b"\0" * 8])))
        elif kind == 6:
            out.append((c.REQUESTED_ADDRESS_FAMILY, r.pick([1, 2, 3])))
        elif kind == 7:
            out.append((c.ADDITIONAL_ADDRESS_FAMILY, r.pick([1, 2])))
        elif kind == 8:
            out.append((c.DONT_FRAGMENT, True))
        elif kind == 9:
            out.append((c.DATA_ATTR, r.take(r.byte())))
        elif kind == 10:  # an unknown type (comprehension-required or not), raw value
            t = r.u16()
            out.append((0x7FFF if t in CODECS else t, r.take(r.byte() % 16)))
        elif kind == 11:
            out.append((c.ADDITIONAL_ADDRESS_FAMILY_DRAFT, 2))
        else:
            out.append((c.SOFTWARE, "fuzz"))
    return out


def _check_replies(h: Harness, actions: list, tokens: list) -> None:
    for a in actions:
        if isinstance(a, Reply):
            msg = decode_untrusted(a.data)  # every reply is well-formed
            token = msg.get(c.RESERVATION_TOKEN)
            if token is not None:
                tokens.append(token)
        else:
            assert isinstance(a, (AllocationCreated, AllocationDeleted, AllocationRefreshed,
                                  SendToPeer, Refused)), a


def _check_pool(h: Harness) -> None:
    server = h.server
    used: dict = {}
    for alloc in server.allocations.values():
        assert alloc.expires > float("-inf")
        for r in alloc.relays.values():
            used[r.address[0]] = used.get(r.address[0], 0) + 1
    for res in server.reservations.values():
        used[res.ip] = used.get(res.ip, 0) + 1
    busy: dict = {}
    for _, ip, _port in server._busy_ports:
        busy[ip] = busy.get(ip, 0) + 1
    size = h.config.port_range[1] - h.config.port_range[0] + 1
    for ip, free in server.free_ports().items():
        assert free + used.get(ip, 0) + busy.get(ip, 0) == size, (ip, free, used, busy)
    assert len(h.binder.open) == sum(len(a.relays) for a in server.allocations.values())


def core(data: bytes) -> None:
    r = Reader(data)
    h = Harness(port_range=(50000, 50015), user_quota=r.pick([0, 0, 1, 2]),
                permissions_per_allocation=r.pick([64, 2]), secrets=("s1",))
    if r.byte() & 1:
        h.binder.refuse = {50000 + i for i in range(0, 16, 3)}
    clients: dict = {}
    tokens: list = []
    for _ in range(40):
        if not r.left():
            break
        op = r.byte() % 8
        ft = r.pick(FIVE_TUPLES)
        if op == 0:  # raw bytes
            actions = h.send(r.take(r.u16() % 1500), ft)
        elif op in (1, 2):  # an authenticated request, signed right (op 2: then mutated)
            user = r.pick(USERS)
            client = clients.get((ft, user))
            if client is None:
                client = clients[(ft, user)] = TurnClient(*user, integrity=r.pick(["sha1", "sha256"]),
                                                          fingerprint=bool(r.byte() & 1))
            method = r.pick(METHODS)
            if client.nonce is None:
                _, challenge = client.request(method, [], auth=False)
                for a in h.send(challenge, ft):
                    if isinstance(a, Reply):
                        client.learn(a.data)
            _, data_ = client.request(method, _attributes(r, tokens))
            if op == 2 and data_:
                mutable = bytearray(data_)
                for _ in range(1 + r.byte() % 3):
                    mutable[r.u16() % len(mutable)] ^= 1 + r.byte() % 255
                data_ = bytes(mutable)
            actions = h.send(data_, ft)
        elif op == 3:  # an indication
            peer = r.pick(PEERS)
            actions = h.send(TurnClient("x", "y").indication(
                r.pick([c.SEND, c.DATA, c.BINDING]), [(c.XOR_PEER_ADDRESS, peer),
                                                      (c.DATA_ATTR, r.take(r.byte()))]), ft)
        elif op == 4:  # time passes
            h.now += r.pick([0.25, 1, 30, 299, 301, 599, 601, 3601])
            actions = []
        elif op == 5:  # a bounded sweep
            actions = h.server.expire(h.now, 1 + r.byte() % 4)
        elif op == 6:  # the binder runs out of file descriptors, or recovers
            h.binder.fail = bool(r.byte() & 1)
            actions = []
        else:  # ChannelData to the core (it is the fast path's; the core drops it)
            actions = h.send(struct.pack("!HH", 0x4000 + r.byte(), 4) + b"data", ft)
        _check_replies(h, actions, tokens)
        _check_pool(h)


TARGETS = {"codec": codec, "framer": framer, "fastpath": fastpath, "core": core}


def seeds(target: str) -> list[bytes]:
    """The RFC vectors and the real clients' messages (tests/corpus/clients), in the
    input format of ``target``."""
    messages = [v for k, v in sorted(vars(vectors).items()) if isinstance(v, bytes) and len(v) >= 20]
    streams = []
    folder = os.path.join(CORPUS, "clients")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        with open(os.path.join(folder, name), "rb") as f:
            (streams if "-tcp-" in name else messages).append(f.read())
    sender = TurnClient("x", "y")
    for peer in (("8.8.8.8", 5000), ("2606:4700::1", 53)):
        messages.append(sender.indication(c.SEND, [(c.XOR_PEER_ADDRESS, peer), (c.DATA_ATTR, b"media")]))
    if target in ("codec", "fastpath"):
        return messages
    if target == "framer":  # one chunk size byte (7: 64 KiB) and the whole stream
        return [bytes([7]) + s for s in streams] + [bytes([7]) + b"".join(messages[:8])]
    # core: a program that sends each message raw on the first UDP 5-tuple (after a
    # one-second clock step in the second variant)
    head = bytes([0, 0, 0])  # no quota, 64 permissions, no ports taken by others
    out = []
    for m in messages:
        step = bytes([0, 0]) + struct.pack("!H", len(m[:1499])) + m[:1499]
        out += [head + step, head + bytes([4, 0, 1]) + step]
    return out


def prepare(target: str, folder: str) -> None:
    """Seed an empty working corpus folder."""
    os.makedirs(folder, exist_ok=True)
    if os.listdir(folder):
        return
    for i, data in enumerate(seeds(target)):
        with open(os.path.join(folder, f"seed-{i:04d}"), "wb") as f:
            f.write(data)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] [corpus dirs]")
    name = sys.argv.pop(1)
    for arg in sys.argv[1:]:
        if not arg.startswith("-"):
            if not os.path.isfile(arg):  # a crash file given to reproduce: nothing to seed
                prepare(name, arg)  # the first folder is where libFuzzer keeps what it finds
            break
    atheris.Setup(sys.argv, TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
