"""The hot path: every per-packet loop of turnd lives here.

Sockets are non-blocking; each loop waits for readability with trio, then
drains the socket in bounded batches (``BATCH``), reading the clock once per
batch.  No message objects, logging or awaits per packet; a full socket
buffer drops and counts.

- ``listener_loop``: datagrams from clients on a UDP listen socket.
  ChannelData and plain Send indications are forwarded right here (two dict
  lookups and an expiry check); everything else goes to the slow path, the
  sans-I/O core.
- ``relay_loop``: datagrams from peers on a relay socket, written into
  headroom in front of the payload as ChannelData or a Data indication and
  sent to the client with one ``sendto``.
- ``Forwarder``: the routing rules shared by both directions and by the slow
  path: a peer that is one of turnd's own relay addresses is delivered
  internally (relay-to-relay calls never depend on NAT hairpinning); any
  other port on turnd's own addresses is never reached.

Every loop is guarded: an exception while handling one datagram (a bug, never
bad input: the parsers here return None for anything they don't accept) drops
that datagram, is counted and reported through ``on_error``, and the loop goes
on serving everyone else.  ``try`` costs nothing in CPython 3.11 until it fires.
"""

from __future__ import annotations

import secrets
import socket
import struct

import trio

from .stun import constants as c
from .stun.attributes import encode_value

BATCH = 64  # datagrams drained per wakeup before yielding to other tasks
BUFFER_SIZE = 65536
HEADROOM = 64  # room for a Data indication header in front of the payload
ZEROS = b"\x00\x00\x00\x00"
_COOKIE_BYTES = c.MAGIC_COOKIE_BYTES
_DATA_INDICATION = 0x0017
_TLV = struct.Struct("!HH")
_DATA_HEADER = struct.Struct("!HHI12s")
_PEER_CACHE_MAX = 1024
_MAX_LENGTH = 0xFFFF  # a STUN message's length field is 16 bits
_TID_BLOCK = 12 * 1024


class RelayStats:
    __slots__ = ("packets_in", "packets_slow_path", "to_peer", "to_client", "internal",
                 "send_dropped", "recv_errors", "dropped_no_allocation", "dropped_no_channel",
                 "dropped_no_permission", "dropped_own_address", "dropped_malformed",
                 "dropped_too_big", "internal_errors")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


def send_or_drop(sock: socket.socket, data, addr, stats: RelayStats) -> None:
    """sendto without blocking: a full buffer (or an ICMP error) drops and counts."""
    try:
        sock.sendto(data, addr)
    except OSError:
        stats.send_dropped += 1


class _Tids:
    """Transaction IDs for Data indications: 96 cryptographically random bits each
    (RFC 8489 §5), cut from a block of os.urandom so a packet costs a slice, not a
    system call."""

    __slots__ = ("block", "pos")

    def __init__(self) -> None:
        self.block, self.pos = b"", _TID_BLOCK

    def next(self) -> bytes:
        pos = self.pos
        if pos >= _TID_BLOCK:
            self.block, pos = secrets.token_bytes(_TID_BLOCK), 0
        self.pos = pos + 12
        return self.block[pos:pos + 12]


_tids = _Tids()


def _peer_attr(alloc, peer: tuple, tid: bytes) -> bytes:
    """The XOR-PEER-ADDRESS TLV of ``peer`` for transaction ``tid``; IPv4 ones (which
    do not depend on the transaction ID) are cached per allocation."""
    attr = alloc.peer_attr_cache.get(peer)
    if attr is not None:
        return attr
    value = encode_value(c.XOR_PEER_ADDRESS, peer, tid)
    attr = _TLV.pack(c.XOR_PEER_ADDRESS, len(value)) + value
    if len(value) == 8:
        if len(alloc.peer_attr_cache) >= _PEER_CACHE_MAX:
            alloc.peer_attr_cache.clear()
        alloc.peer_attr_cache[peer] = attr
    return attr


def data_indication_header(alloc, peer: tuple, n: int) -> bytes | None:
    """The bytes of a Data indication up to its payload (DATA's TLV header included), or
    None when a payload of ``n`` bytes does not fit in one (its length is 16 bits)."""
    tid = _tids.next()
    attr = _peer_attr(alloc, peer, tid)
    length = len(attr) + 4 + n + (-n % 4)
    if length > _MAX_LENGTH:
        return None
    return (_DATA_HEADER.pack(_DATA_INDICATION, length, c.MAGIC_COOKIE, tid)
            + attr + _TLV.pack(c.DATA_ATTR, n))


class Forwarder:
    """Routing shared by the loops and the slow path (see the module docstring)."""

    def __init__(self, core, stats: RelayStats):
        self.relays_by_addr = core.relays_by_addr  # the core's live dict
        self.own_ips = core.own_ips
        self.is_listen_endpoint = core.is_listen_endpoint
        # Sources on turnd's own addresses are never peers unless explicitly allowed:
        # relay-to-relay traffic is delivered internally and never arrives on a socket.
        self.blocked_sources = frozenset(
            ip for ip in core.own_ips if not core.policy.explicitly_allowed(ip))
        self.stats = stats

    def to_peer(self, relay, peer: tuple, data, now: float) -> None:
        """Send ``data`` from ``relay`` to ``peer``; the permission was checked already."""
        if peer[0] in self.own_ips:
            target = self.relays_by_addr.get(peer)
            if target is not None:
                src = relay.advertised if peer == target.advertised else relay.address
                self.stats.internal += 1
                self.to_client(target, src, bytes(data), now)
                return
            if self.is_listen_endpoint(*peer) or peer[0] in self.blocked_sources:
                self.stats.dropped_own_address += 1
                return
        try:
            relay.handle.sendto(data, peer)
            self.stats.to_peer += 1
        except OSError:
            self.stats.send_dropped += 1

    def to_client(self, relay, src: tuple, payload: bytes, now: float) -> None:
        """Deliver ``payload`` that arrived at ``relay`` from ``src`` to its client."""
        alloc = relay.alloc
        if alloc.expires < now or alloc.client_handle is None:
            self.stats.dropped_no_allocation += 1
            return
        expiry = alloc.permissions.get(src[0])
        if expiry is None or expiry < now:
            self.stats.dropped_no_permission += 1
            return
        n = len(payload)
        ch = alloc.peer_channels.get(src)
        if ch is not None and ch.expires >= now:
            frame = bytes((ch.number >> 8, ch.number & 0xFF, n >> 8, n & 0xFF)) + payload
        else:
            header = data_indication_header(alloc, src, n)
            if header is None:
                self.stats.dropped_too_big += 1
                return
            frame = header + payload + ZEROS[:-n % 4]
        sock, addr = alloc.client_handle
        try:
            sock.sendto(frame, addr)
            self.stats.to_client += 1
        except OSError:
            self.stats.send_dropped += 1


def peer_from_xor_untrusted(value, tid: bytes) -> tuple | None:
    """XOR-PEER-ADDRESS value -> (ip, port), or None where the codec would refuse it.
    The text of the IP is inet_ntop's, as the codec's (``format_ipv6``) and recvfrom's."""
    if len(value) == 8 and value[1] == 1:
        raw = (int.from_bytes(value[4:8], "big") ^ c.MAGIC_COOKIE).to_bytes(4, "big")
        return socket.inet_ntop(socket.AF_INET, raw), ((value[2] << 8) | value[3]) ^ 0x2112
    if len(value) == 20 and value[1] == 2:
        key = int.from_bytes(_COOKIE_BYTES + tid, "big")
        raw = (int.from_bytes(value[4:20], "big") ^ key).to_bytes(16, "big")
        return socket.inet_ntop(socket.AF_INET6, raw), ((value[2] << 8) | value[3]) ^ 0x2112
    return None


def send_indication_untrusted(view, n: int):
    """(peer, start, end) of a plain Send indication, or None for the slow path.

    Accepts only what the codec decodes to the same peer and data and the core would
    relay: exactly one well-formed XOR-PEER-ADDRESS, exactly one DATA, at most one
    empty DONT-FRAGMENT, and nothing else.  Any other message is the slow path's
    to judge (tests/test_fast_path.py holds the two to agreement)."""
    if (n < 20 or view[0] or view[1] != 0x16 or (view[2] << 8 | view[3]) + 20 != n
            or view[4:8] != _COOKIE_BYTES):
        return None
    pos, peer, data, dont_fragment = 20, None, None, False
    while pos + 4 <= n:
        attr_type = (view[pos] << 8) | view[pos + 1]
        length = (view[pos + 2] << 8) | view[pos + 3]
        end = pos + 4 + length
        if end > n:
            return None
        if attr_type == c.XOR_PEER_ADDRESS and peer is None:
            peer = peer_from_xor_untrusted(view[pos + 4:end], bytes(view[8:20]))
            if peer is None:
                return None
        elif attr_type == c.DATA_ATTR and data is None:
            data = (pos + 4, end)
        elif attr_type == c.DONT_FRAGMENT and not length and not dont_fragment:
            dont_fragment = True
        else:
            return None
        pos = end + (-length % 4)
    if pos != n or peer is None or data is None:
        return None
    return peer, data[0], data[1]


def _ignore_error() -> None:
    pass


async def listener_loop(sock: socket.socket, clients: dict, forwarder: Forwarder, slow_path,
                        now_fn, channel_end: int = 0x50, on_error=_ignore_error) -> None:
    """Read client datagrams from a UDP listen socket.

    ``clients`` maps a client (ip, port) to its allocation on this socket;
    ``slow_path(data: bytes, addr, sock)`` handles everything else and must
    not block.  First bytes 0x40 up to ``channel_end`` are ChannelData.
    ``on_error()`` is called (inside ``except``) when handling a datagram failed.
    """
    stats = forwarder.stats
    buf = bytearray(BUFFER_SIZE)
    view = memoryview(buf)
    recvfrom_into = sock.recvfrom_into
    v6 = sock.family == socket.AF_INET6
    own_ips = forwarder.own_ips
    wait_readable = trio.lowlevel.wait_readable
    checkpoint = trio.lowlevel.checkpoint
    while True:
        await wait_readable(sock)
        now = now_fn()
        try:
            for _ in range(BATCH):
                try:
                    n, addr = recvfrom_into(buf)
                except BlockingIOError:
                    break
                except OSError:  # e.g. ECONNREFUSED from an earlier ICMP error
                    stats.recv_errors += 1
                    continue
                stats.packets_in += 1
                if v6:
                    addr = addr[:2]
                first = buf[0] if n else 0xFF
                if 0x40 <= first < channel_end:  # ChannelData
                    alloc = clients.get(addr)
                    if alloc is None or n < 4 or alloc.expires < now:
                        stats.dropped_no_allocation += 1
                        continue
                    length = (buf[2] << 8) | buf[3]
                    if 4 + length > n:
                        stats.dropped_malformed += 1
                        continue
                    ch = alloc.channels.get((first << 8) | buf[1])
                    if ch is None or ch.expires < now:
                        stats.dropped_no_channel += 1
                        continue
                    peer = ch.peer
                    expiry = alloc.permissions.get(peer[0])
                    if expiry is None or expiry < now:
                        stats.dropped_no_permission += 1
                        continue
                    if ch.own:
                        forwarder.to_peer(ch.relay, peer, view[4:4 + length], now)
                        continue
                    try:
                        ch.relay.handle.sendto(view[4:4 + length], peer)
                        stats.to_peer += 1
                    except OSError:
                        stats.send_dropped += 1
                    continue
                if first == 0:  # a Send indication? (the parser checks the type)
                    alloc = clients.get(addr)
                    found = send_indication_untrusted(view, n) if alloc is not None else None
                    if found is not None:
                        peer, start, end = found
                        relay = alloc.relays.get(6 if ":" in peer[0] else 4)
                        expiry = alloc.permissions.get(peer[0])
                        if relay is None or expiry is None or expiry < now or alloc.expires < now:
                            stats.dropped_no_permission += 1
                            continue
                        if peer[0] in own_ips:
                            forwarder.to_peer(relay, peer, view[start:end], now)
                            continue
                        try:
                            relay.handle.sendto(view[start:end], peer)
                            stats.to_peer += 1
                        except OSError:
                            stats.send_dropped += 1
                        continue
                stats.packets_slow_path += 1
                slow_path(bytes(view[:n]), addr, sock)
            else:  # the batch cap was hit: let other tasks run before draining more
                await checkpoint()
        except Exception:  # a bug: that datagram is dropped, the others are served
            stats.internal_errors += 1
            on_error()


async def relay_loop(relay, forwarder: Forwarder, now_fn, on_error=_ignore_error) -> None:
    """Read peer datagrams on one relay socket and send them to the client.
    Returns when the socket is closed (the allocation ended)."""
    sock = relay.handle
    alloc = relay.alloc
    stats = forwarder.stats
    blocked = forwarder.blocked_sources
    buf = bytearray(HEADROOM + BUFFER_SIZE + 4)
    view = memoryview(buf)
    into = view[HEADROOM:HEADROOM + BUFFER_SIZE]
    recvfrom_into = sock.recvfrom_into
    v6 = sock.family == socket.AF_INET6
    wait_readable = trio.lowlevel.wait_readable
    checkpoint = trio.lowlevel.checkpoint
    permissions = alloc.permissions
    peer_channels = alloc.peer_channels
    while sock.fileno() >= 0:  # the core closes it when the allocation ends
        try:
            await wait_readable(sock)
        except trio.ClosedResourceError:
            return
        now = now_fn()
        live = alloc.expires >= now  # an expired allocation drops until the sweep closes it
        client_sock, client_addr = alloc.client_handle
        try:
            for _ in range(BATCH):
                try:
                    n, addr = recvfrom_into(into)
                except BlockingIOError:
                    break
                except OSError:
                    stats.recv_errors += 1
                    continue
                if v6:
                    addr = addr[:2]
                ip = addr[0]
                expiry = permissions.get(ip)
                if expiry is None or expiry < now or ip in blocked or not live:
                    stats.dropped_no_permission += 1
                    continue
                ch = peer_channels.get(addr)
                if ch is not None and ch.expires >= now:
                    start = HEADROOM - 4
                    number = ch.number
                    buf[start] = number >> 8
                    buf[start + 1] = number & 0xFF
                    buf[start + 2] = n >> 8
                    buf[start + 3] = n & 0xFF
                    end = HEADROOM + n
                else:
                    header = data_indication_header(alloc, addr, n)
                    if header is None:
                        stats.dropped_too_big += 1
                        continue
                    start = HEADROOM - len(header)
                    buf[start:HEADROOM] = header
                    end = HEADROOM + n
                    pad = -n % 4
                    if pad:
                        buf[end:end + pad] = ZEROS[:pad]
                        end += pad
                try:
                    client_sock.sendto(view[start:end], client_addr)
                    stats.to_client += 1
                except OSError:
                    stats.send_dropped += 1
            else:  # the batch cap was hit: let other tasks run before draining more
                await checkpoint()
        except Exception:  # a bug: that datagram is dropped, the others are served
            stats.internal_errors += 1
            on_error()
