"""The hot path: every per-packet line of turnd lives here.

One ``RelayEngine`` per process holds every UDP listen socket and every relay
socket in one level-triggered ``select.epoll``; a single trio task waits on
the epoll descriptor (``trio.lowlevel.wait_readable``) and, per wakeup, takes
up to ``MAX_EVENTS`` ready sockets: a relay socket is read once (the next
datagram waits for the next round, so a busy peer can't starve the others and
no read ends in EAGAIN), a listen socket is drained up to ``BATCH`` datagrams.
Every datagram goes through one shared buffer with headroom; counters are
kept in locals and added up per batch; the clock is read once per batch.  No
task, buffer or coroutine per allocation, no message objects, logging, awaits
or exceptions per packet; a full socket buffer drops and counts.

- Client to peer (listen sockets): ChannelData and plain Send indications are
  forwarded right here (two dict lookups and an expiry check); everything
  else goes to the slow path, the sans-I/O core.
- Peer to client (relay sockets): the ChannelData or Data indication header
  is written into the headroom in front of the payload and the client gets
  one slice.  Where the client is, is its allocation's ``client_handle``: a
  ``UdpClient`` (a listen socket and an address); stream clients plug in with
  the same ``send`` (the engine writes UDP clients inline).
- ``Forwarder``: the routing rules shared by both directions and by the slow
  path: a peer that is one of turnd's own relay addresses is delivered
  internally (relay-to-relay calls never depend on NAT hairpinning); any
  other port on turnd's own addresses is never reached.

Every batch is guarded: an exception while handling one datagram (a bug, never
bad input: the parsers here return None for anything they don't accept) drops
that datagram, is counted and reported through ``on_error``, and the engine
goes on serving everyone else (the sockets not yet read stay ready: epoll is
level-triggered).  ``try`` costs nothing in CPython 3.11 until it fires.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import select
import socket
import struct
import time
import zlib

import trio

from . import mmsg
from .stun import constants as c
from .stun.attributes import CODECS, encode_value
from .stun.errors import StunDecodeError

BATCH = 64  # datagrams drained from a listen socket per wakeup
MAX_EVENTS = 256  # ready sockets handled per wakeup before other tasks run
OUT_SLOTS = 64  # datagrams to UDP clients gathered for one sendmmsg
HOT_READS = 8  # datagrams at least taken at once from a relay socket that has a backlog
LINGER = 0.0003  # under load, seconds to let datagrams gather before the next wakeup
LINGER_RATE = 4000  # datagrams per second from which turnd lingers ("under load")
RATE_WINDOW = 0.1  # seconds over which that rate is measured
LINGER_START = 1.15  # datagrams per wakeup, without lingering, that show flows arriving together
LINGER_GAIN = 3  # datagrams per wakeup below which lingering is not worth its delay
LINGER_BACKOFF = 1.0  # seconds before lingering that did not pay may start again
BUFFER_SIZE = 65536
HEADROOM = 64  # room for a Data indication header in front of the payload
_STRIDE = HEADROOM + BUFFER_SIZE + 64  # one slot of an arena: headroom, a datagram, padding
ZEROS = b"\x00\x00\x00\x00"
_COOKIE_BYTES = c.MAGIC_COOKIE_BYTES
_DATA_INDICATION = 0x0017
_TLV = struct.Struct("!HH")
_DATA_HEADER = struct.Struct("!HHI12s")
_CHANNEL_HEADER = struct.Struct("!HH")
_PEER_CACHE_MAX = 1024
_FAST_ATTRIBUTES = 8  # a Send indication with more goes to the slow path (the codec's cap is >= 16)
# Comprehension-optional attributes the codec decodes (and may refuse): not skipped here.
_KNOWN_OPTIONAL = frozenset(t for t in CODECS if t >= 0x8000)
_MAX_LENGTH = 0xFFFF  # a STUN message's length field is 16 bits
_TID_BLOCK = 12 * 1024


class RelayStats:
    __slots__ = ("packets_in", "packets_slow_path", "to_peer", "to_client", "internal",
                 "send_dropped", "recv_errors", "dropped_no_allocation", "dropped_no_channel",
                 "dropped_no_permission", "dropped_own_address", "dropped_malformed",
                 "dropped_too_big", "internal_errors", "wakeups", "events")

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


class UdpClient:
    """Where a UDP client is: the listen socket it talks to and its address.  With an
    engine's ``queue``, what the engine relays to it leaves in that wakeup's sendmmsg."""

    __slots__ = ("sock", "addr", "queue", "key", "name", "name_ptr", "namelen")

    def __init__(self, sock: socket.socket, addr: tuple, queue: mmsg.SendBatch | None = None):
        self.sock, self.addr, self.queue = sock, addr, queue
        raw = mmsg.sockaddr(addr)  # built once: the engine sends with its address
        self.key = mmsg.key_of(raw)
        self.name = ctypes.create_string_buffer(raw, len(raw))
        self.name_ptr, self.namelen = ctypes.addressof(self.name), len(raw)

    def send(self, data) -> bool:
        """Send one datagram; False when it was dropped (a full buffer, an ICMP error)."""
        try:
            self.sock.sendto(data, self.addr)
            return True
        except OSError:
            return False


STREAM_BUFFER = 64 * 1024  # bytes waiting for a TCP/TLS client; relayed datagrams past it drop
SEND_INDICATION_TYPE = b"\x00\x16"


class StreamMisuse(StunDecodeError):
    """A stream sent what no client does (ChannelData or a Send indication before it has an
    allocation): work for nothing, so the connection is closed."""
STREAM_FRAMES = 64  # frames from one connection handled before other tasks run


class StreamClient:
    """A TCP or TLS client connection, as the relay sees it: what is relayed to it goes into
    one bounded write buffer (``STREAM_BUFFER``), emptied by the connection's writer task; a
    plain TCP connection with nothing waiting is written at once, without a wakeup.  A
    client that can't keep up loses datagrams (counted), never stalls anyone else.  Replies
    to its requests go the same way (in order), and are not dropped: its reader waits for
    room before taking more requests (``room``)."""

    __slots__ = ("sock", "buffer", "writing", "ready", "room", "alloc", "closed", "requests",
                 "framer", "ft", "scope", "handed", "done")

    def __init__(self, sock: socket.socket | None):
        self.sock = sock  # plain TCP: written directly when nothing waits; TLS: None
        self.buffer = bytearray()
        self.writing = 0  # bytes the writer task has in flight (they count toward the cap)
        self.ready = trio.Event()  # set: the writer has something to do
        self.room = trio.Event()   # set by the writer whenever it has written
        self.alloc = None  # the allocation on this connection's 5-tuple, if any
        self.closed = False
        self.requests = 0  # STUN requests seen (what, with an allocation, keeps it alive)
        # For a hand-over (turnd/handover.py): its framer and 5-tuple, the scope its tasks run
        # in, set when handed to a successor, and an event set when its tasks have ended.
        self.framer = self.ft = self.scope = None
        self.handed = False
        self.done = trio.Event()

    def send(self, data) -> bool:
        """A relayed ChannelData frame (padded to 4 here: RFC 8656 §12.5) or Data
        indication; False when it was dropped (the buffer is full, or the connection is
        gone)."""
        if self.closed or len(self.buffer) + self.writing + len(data) > STREAM_BUFFER:
            return False
        self._write(data, -len(data) % 4)
        return True

    def reply(self, data: bytes) -> None:
        """An answer to this client's request (never dropped while the connection lives)."""
        if not self.closed:
            self._write(data, 0)

    def attach(self, alloc) -> "StreamClient":
        """The core made ``alloc`` on this connection's 5-tuple: relay for it."""
        self.alloc = alloc
        return self

    def _write(self, data, pad: int) -> None:
        buf = self.buffer
        if not buf and not self.writing and self.sock is not None:
            try:
                sent = self.sock.send(data) if not pad else self.sock.sendmsg((data, ZEROS[:pad]))
            except BlockingIOError:
                sent = 0
            except OSError:  # reset: the reader finds out and closes the connection
                self.closed = True
                return
            total = len(data) + pad
            if sent == total:
                return
            if sent < len(data):
                buf += memoryview(data)[sent:]
                sent = len(data)
            buf += ZEROS[:total - sent]
        else:
            buf += data
            if pad:
                buf += ZEROS[:pad]
        self.ready.set()


class Forwarder:
    """Routing shared by the loops and the slow path (see the module docstring)."""

    def __init__(self, core, stats: RelayStats):
        self.relays_by_addr = core.relays_by_addr  # the core's live dict
        self.live = core.live.live  # any live relay of this turnd, this worker's or another's
        self.to_internal = core.live.internal
        self.to_public = core.live.public
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
            if self.live(peer):  # another worker's relay: through the kernel, to its socket
                peer = self.to_internal(peer)
            elif self.is_listen_endpoint(*peer) or peer[0] in self.blocked_sources:
                self.stats.dropped_own_address += 1
                relay.alloc.up_packets -= 1  # counted as relayed by the caller: it was not
                relay.alloc.up_bytes -= len(data)
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
        alloc.down_packets += 1
        alloc.down_bytes += n
        ch = alloc.peer_channels.get(src)
        if ch is not None and ch.expires >= now:
            frame = bytes((ch.number >> 8, ch.number & 0xFF, n >> 8, n & 0xFF)) + payload
        else:
            header = data_indication_header(alloc, src, n)
            if header is None:
                self.stats.dropped_too_big += 1
                return
            frame = header + payload + ZEROS[:-n % 4]
        if alloc.client_handle.send(frame):
            self.stats.to_client += 1
        else:
            self.stats.send_dropped += 1


    def from_stream_untrusted(self, client: StreamClient, framer, now: float, slow_path,
                              limit: int = STREAM_FRAMES) -> int:
        """Frames a TCP/TLS client sent (``framer``, a StreamFramer fed by its reader):
        ChannelData and Send indications of its allocation go to peers right here; anything
        else is ``slow_path(frame)``'s.  Returns how many frames were handled, at most
        ``limit`` (then the reader lets others run and calls again); raises only
        StunDecodeError: the stream is not STUN, or ``StreamMisuse``."""
        stats = self.stats
        handled = 0
        try:
            while handled < limit:
                frame = framer.next_frame_untrusted()
                if frame is None:
                    break
                handled += 1
                alloc = client.alloc
                first = frame[0]
                if first >= 0x40:  # ChannelData (the framer took only the channel range)
                    if alloc is None:  # no client sends it before a ChannelBind succeeded
                        stats.dropped_no_allocation += 1
                        raise StreamMisuse("ChannelData without an allocation")
                    if alloc.expires < now:
                        stats.dropped_no_allocation += 1
                        continue
                    ch = alloc.channels.get((first << 8) | frame[1])
                    if ch is None or ch.expires < now:
                        stats.dropped_no_channel += 1
                        continue
                    peer = ch.peer
                    expiry = alloc.permissions.get(peer[0])
                    if expiry is None or expiry < now:
                        stats.dropped_no_permission += 1
                        continue
                    alloc.up_packets += 1
                    alloc.up_bytes += len(frame) - 4
                    self.to_peer(ch.relay, peer, memoryview(frame)[4:], now)
                    continue
                if alloc is None and frame[:2] == SEND_INDICATION_TYPE:
                    stats.dropped_no_allocation += 1
                    raise StreamMisuse("a Send indication without an allocation")
                if alloc is not None and first == 0:
                    found = send_indication_untrusted(frame, len(frame))
                    if found is not None:
                        peer, begin, end = found
                        relay = alloc.relays.get(6 if ":" in peer[0] else 4)
                        expiry = alloc.permissions.get(peer[0])
                        if relay is None or expiry is None or expiry < now or alloc.expires < now:
                            stats.dropped_no_permission += 1
                            continue
                        alloc.up_packets += 1
                        alloc.up_bytes += end - begin
                        self.to_peer(relay, peer, memoryview(frame)[begin:end], now)
                        continue
                stats.packets_slow_path += 1
                slow_path(frame)
        finally:
            stats.packets_in += handled
        return handled


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
    """(peer, start, end) of a Send indication as browsers send it, or None for the slow path.

    Accepts only what the codec decodes to the same peer and data and the core would
    relay: exactly one well-formed XOR-PEER-ADDRESS, exactly one DATA, at most one empty
    DONT-FRAGMENT, unknown comprehension-optional attributes (ignored, as the core does),
    and a FINGERPRINT, which must be last and right (Firefox puts one on every Send
    indication; it is checked, as the core would: RFC 8489 §14.7).  Anything else, at most
    ``_FAST_ATTRIBUTES`` attributes, is the slow path's to judge (tests/test_fast_path.py
    and the fuzzer hold the two to agreement)."""
    if (n < 20 or view[0] or view[1] != 0x16 or (view[2] << 8 | view[3]) + 20 != n
            or view[4:8] != _COOKIE_BYTES):
        return None
    pos, peer, data, dont_fragment, count = 20, None, None, False, 0
    while pos + 4 <= n:
        attr_type = (view[pos] << 8) | view[pos + 1]
        length = (view[pos + 2] << 8) | view[pos + 3]
        end = pos + 4 + length
        count += 1
        if end > n or count > _FAST_ATTRIBUTES:
            return None
        if attr_type == c.XOR_PEER_ADDRESS and peer is None:
            peer = peer_from_xor_untrusted(view[pos + 4:end], bytes(view[8:20]))
            if peer is None:
                return None
        elif attr_type == c.DATA_ATTR and data is None:
            data = (pos + 4, end)
        elif attr_type == c.DONT_FRAGMENT and not length and not dont_fragment:
            dont_fragment = True
        elif attr_type == c.FINGERPRINT:
            if length != 4 or end != n or (zlib.crc32(view[:pos]) ^ c.FINGERPRINT_XOR) != (
                    (view[pos + 4] << 24) | (view[pos + 5] << 16) | (view[pos + 6] << 8) | view[pos + 7]):
                return None
        elif attr_type < 0x8000 or attr_type in _KNOWN_OPTIONAL:
            return None  # required (known or not), or known and optional: the codec's to check
        pos = end + (-length % 4)
    if pos != n or peer is None or data is None:
        return None
    return peer, data[0], data[1]


def _ignore_error() -> None:
    pass


class _TimerFd:
    """A Linux timerfd with microsecond precision (trio.sleep rounds to milliseconds): the
    engine's linger.  os.timerfd_* where Python has them (3.13), else libc through ctypes."""

    def __init__(self) -> None:
        if hasattr(os, "timerfd_create"):
            self.fd = os.timerfd_create(time_clock_monotonic(), os.TFD_NONBLOCK | os.TFD_CLOEXEC)
            self._set = lambda seconds: os.timerfd_settime(self.fd, initial=seconds)
            return
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create.argtypes = (ctypes.c_int, ctypes.c_int)
        self.fd = libc.timerfd_create(1, 0o4000 | 0o2000000)  # MONOTONIC, NONBLOCK|CLOEXEC
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")
        spec = (ctypes.c_long * 4)()  # struct itimerspec {interval; value}
        settime = libc.timerfd_settime
        settime.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
        fd, ref = self.fd, ctypes.byref(spec)

        def set_(seconds: float) -> None:
            spec[2] = int(seconds)
            spec[3] = int((seconds - int(seconds)) * 1e9)
            settime(fd, 0, ref, None)
        self._set = set_

    async def sleep(self, seconds: float) -> None:
        self._set(seconds)
        await trio.lowlevel.wait_readable(self.fd)
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


def time_clock_monotonic() -> int:
    import time
    return time.CLOCK_MONOTONIC


_LISTENER, _RELAY = 1, 0


class RelayEngine:
    """Every UDP listen socket and relay socket of the process in one epoll set, served by
    one trio task (``run``).  See the module docstring."""

    def __init__(self, forwarder: Forwarder, now_fn, on_error=_ignore_error):
        self.forwarder = forwarder
        self.stats = forwarder.stats
        self.now_fn = now_fn
        self.on_error = on_error
        self.ep = select.epoll()
        # fd -> (_RELAY, recvfrom_into, alloc, permissions, peer_channels, v6)
        #     | (_LISTENER, sock, clients, slow_path, channel_end, v6)
        self.handlers: dict[int, tuple] = {}
        # Datagrams for UDP clients: read into a slot of the arena (headroom in front),
        # then sent with one sendmmsg per listen socket per wakeup.
        self.arena = bytearray(OUT_SLOTS * _STRIDE)
        view = memoryview(self.arena)
        self.arena_base = ctypes.addressof((ctypes.c_char * len(self.arena)).from_buffer(self.arena))
        self.slot_into = [view[k * _STRIDE + HEADROOM:k * _STRIDE + HEADROOM + BUFFER_SIZE]
                          for k in range(OUT_SLOTS)]
        # A busy relay socket is read with recvmmsg into consecutive slots of the same arena.
        self.relay_batches = {
            family: mmsg.RecvBatch(socket.socket(family, socket.SOCK_DGRAM), self.arena, OUT_SLOTS,
                                   _STRIDE, HEADROOM, BUFFER_SIZE)
            for family in (socket.AF_INET, socket.AF_INET6)}
        self.peer_addrs: dict[bytes, tuple] = {}  # mmsg.key_of(sockaddr) -> (ip, port)
        self.ready: set[int] = set()  # relay sockets ready at the last wakeup
        self.queues: dict[int, mmsg.SendBatch] = {}  # listen socket fd -> its clients' datagrams
        # Datagrams to peers: a run of them through one relay socket goes in one sendmmsg
        # (the fd is set per run); peers' sockaddrs are built once.
        self.peer_run = mmsg.SendBatch(None, BATCH)
        self.peer_names: dict[tuple, tuple] = {}  # (ip, port) -> (buffer, address, length)
        if not mmsg.AVAILABLE:
            raise RuntimeError("turnd's relay engine needs Linux (epoll, recvmmsg, sendmmsg)")

    def __len__(self) -> int:
        return len(self.handlers)

    def add_client(self, sock: socket.socket, addr: tuple, alloc) -> UdpClient:
        """A UDP client of listen socket ``sock`` has allocation ``alloc``: its ChannelData
        and Send indications are relayed here from now on.  Returns where the client is."""
        client = UdpClient(sock, addr, self.queues[sock.fileno()])
        self.handlers[sock.fileno()][2][client.key] = alloc
        return client

    def remove_client(self, client: UdpClient) -> None:
        h = self.handlers.get(client.sock.fileno())
        if h is not None:
            h[2].pop(client.key, None)

    def add_listener(self, sock: socket.socket, slow_path, channel_end: int) -> None:
        """Serve a UDP listen socket: ChannelData and Send indications of its clients with
        an allocation are relayed here; ``slow_path(data, addr, sock)`` takes everything
        else and must not block.  First bytes 0x40 up to ``channel_end`` are ChannelData."""
        fd = sock.fileno()
        self.queues[fd] = mmsg.SendBatch(sock, OUT_SLOTS)
        arena = bytearray(BATCH * _STRIDE)
        batch = mmsg.RecvBatch(sock, arena, BATCH, _STRIDE, HEADROOM, BUFFER_SIZE)
        clients: dict[bytes, object] = {}  # mmsg.key_of(sockaddr) -> allocation
        self.handlers[fd] = (_LISTENER, sock, clients, slow_path, channel_end, batch)
        self.ep.register(fd, select.EPOLLIN)

    def add_relay(self, relay) -> None:
        """Serve a relay socket (its allocation's ``client_handle`` must be set)."""
        sock, alloc = relay.handle, relay.alloc
        fd = sock.fileno()
        self.handlers[fd] = (_RELAY, sock.recvfrom_into, alloc, alloc.permissions,
                             alloc.peer_channels, relay.family == 6, fd)
        self.ep.register(fd, select.EPOLLIN)

    def remove(self, sock: socket.socket) -> None:
        """Stop serving a socket; call before closing it."""
        fd = sock.fileno()
        if fd >= 0 and self.handlers.pop(fd, None) is not None:
            self.ep.unregister(fd)

    def close(self) -> None:
        self.ep.close()

    async def run(self) -> None:
        wait_readable = trio.lowlevel.wait_readable
        checkpoint = trio.lowlevel.checkpoint
        epfd = self.ep.fileno()
        poll = self.ep.poll
        stats = self.stats
        timer = _TimerFd()
        monotonic = time.monotonic
        window_start, window_packets, window_wakeups, lingering = monotonic(), 0, 0, False
        retry_at = 0.0
        try:
            while True:
                await wait_readable(epfd)
                while True:
                    events = poll(0, MAX_EVENTS)
                    if not events:
                        break
                    stats.wakeups += 1
                    stats.events += len(events)
                    try:
                        packets, full = self._batch(events, self.now_fn())
                    except Exception:  # a bug: that datagram is dropped, the others are served
                        stats.internal_errors += 1
                        self.on_error()
                        packets, full = 0, False
                    # Coalescing: under load, wait LINGER before looking again, so the next
                    # wakeup finds many datagrams, not one: trio's per-wakeup cost and the
                    # system calls are shared by all of them.  It starts when many datagrams
                    # arrive and some arrive together (independent flows: calls); never for
                    # one client waiting for each answer, where it would only add delay; and
                    # it stops when it gathers too little to be worth its delay.
                    window_packets += packets
                    window_wakeups += 1
                    t = monotonic()
                    if t - window_start >= RATE_WINDOW:
                        if lingering:
                            if window_packets < LINGER_GAIN * window_wakeups:
                                lingering, retry_at = False, t + LINGER_BACKOFF
                        elif t >= retry_at:
                            lingering = (window_packets >= LINGER_RATE * (t - window_start)
                                         and window_packets >= LINGER_START * window_wakeups)
                        window_start, window_packets, window_wakeups = t, 0, 0
                    if full:
                        await checkpoint()  # more is waiting: let others run, go on at once
                    elif lingering:
                        await timer.sleep(LINGER)
                    else:
                        break
        finally:
            timer.close()

    def _batch(self, events: list, now: float) -> tuple[int, bool]:
        """One wakeup's ready sockets: (datagrams handled, whether a limit was hit).
        Counters in locals, added up at the end.  With many sockets ready each relay
        socket is read once (the rest waits: fair, and no read ends in EAGAIN); with few,
        each is drained up to ``reads`` datagrams (one hot flow is not held back)."""
        handlers = self.handlers
        blocked = self.forwarder.blocked_sources
        live, public = self.forwarder.live, self.forwarder.to_public
        arena = self.arena
        aview = memoryview(arena)
        base = self.arena_base
        slot_into = self.slot_into
        pack_name, pack_iov = mmsg.NAME.pack_into, mmsg.IOV.pack_into
        pack_channel = _CHANNEL_HEADER.pack_into
        unpack_len = mmsg.LEN.unpack_from
        mmsg_size, iov_size, len_offset = mmsg.MMSG_SIZE, mmsg.IOV_SIZE, mmsg.LEN_OFFSET
        batch4, batch6 = self.relay_batches[socket.AF_INET], self.relay_batches[socket.AF_INET6]
        peer_addrs = self.peer_addrs
        slot = 0
        udp_client = UdpClient
        to_client = dropped = send_dropped = recv_errors = too_big = received = 0
        full = len(events) == MAX_EVENTS
        # One datagram per relay socket, unless it was ready at the last wakeup too (it
        # has a backlog: a busy flow): then recvmmsg takes up to ``reads`` at once.
        reads = min(OUT_SLOTS, max(HOT_READS, BATCH * 4 // len(events)))
        was_ready, ready = self.ready, set()
        self.ready = ready
        try:
            for fd, _ in events:
                h = handlers.get(fd)
                if h is None:
                    continue  # removed earlier in this batch
                if h[0]:
                    got, more = self._drain(h, now)
                    received += got
                    full = full or more
                    continue
                _, recv_into, alloc, permissions, peer_channels, v6, rfd = h
                ready.add(fd)
                single = fd not in was_ready
                if slot + (1 if single else reads) > OUT_SLOTS:  # room for what it may bring
                    sent, lost = self._flush()
                    to_client += sent
                    send_dropped += lost
                    slot = 0
                if single:
                    try:
                        n, addr = recv_into(slot_into[slot])
                    except BlockingIOError:  # nothing there (the fd was reused in this batch)
                        continue
                    except OSError:  # e.g. ECONNREFUSED from an earlier ICMP error
                        recv_errors += 1
                        continue
                    got = ((slot, n, addr[:2] if v6 else addr),)
                else:  # a busy socket: recvmmsg into consecutive slots
                    rb = batch6 if v6 else batch4
                    limit = min(reads, OUT_SLOTS - slot)
                    m = rb.receive_at(rfd, slot, limit)
                    if m <= 0:
                        recv_errors += m < 0
                        continue
                    full = full or m == limit  # a hot socket may hold more
                    nl, names, lens = rb.namelen, rb.names, rb.lens
                    got = []
                    for cur in range(slot, slot + m):
                        o = cur * nl
                        key = bytes(names[o + 2:o + 4]) + bytes(names[o + 8:o + 24]) if v6 \
                            else bytes(names[o + 2:o + 8])
                        got.append((cur, unpack_len(lens, cur * mmsg_size + len_offset)[0],
                                    peer_addrs.get(key) or self._peer_addr(key)))
                    slot += m  # those slots are taken, whatever becomes of the datagrams
                for cur, n, addr in got:
                    received += 1
                    ip = addr[0]
                    if ip in blocked:  # from turnd's own address: only another worker's relay,
                        if not live(addr):  # known to the client by its public address
                            dropped += 1
                            continue
                        addr = public(addr)
                        ip = addr[0]
                    expiry = permissions.get(ip)
                    if expiry is None or expiry < now or alloc.expires < now:
                        dropped += 1
                        continue
                    alloc.down_packets += 1
                    alloc.down_bytes += n
                    ch = peer_channels.get(addr)
                    head = cur * _STRIDE + HEADROOM  # where the payload is
                    if ch is not None and ch.expires >= now:
                        start = head - 4
                        pack_channel(arena, start, ch.number, n)
                        end = head + n
                    else:
                        header = data_indication_header(alloc, addr, n)
                        if header is None:
                            too_big += 1
                            continue
                        start = head - len(header)
                        arena[start:head] = header
                        end = head + n
                        pad = -n % 4
                        if pad:
                            arena[end:end + pad] = ZEROS[:pad]
                            end += pad
                    client = alloc.client_handle
                    if client.__class__ is udp_client:
                        q = client.queue
                        if q is not None:  # into this wakeup's sendmmsg
                            k = q.count
                            pack_name(q.names, k * mmsg_size, client.name_ptr, client.namelen)
                            pack_iov(q.iovs_mv, k * iov_size, base + start, end - start)
                            q.count = k + 1
                            if single:
                                slot += 1
                            continue
                        try:
                            client.sock.sendto(aview[start:end], client.addr)
                            to_client += 1
                        except OSError:
                            send_dropped += 1
                    elif client.send(aview[start:end]):
                        to_client += 1
                    else:
                        send_dropped += 1
        finally:
            if slot:
                sent, lost = self._flush()
                to_client += sent
                send_dropped += lost
            stats = self.stats
            stats.to_client += to_client
            stats.dropped_no_permission += dropped
            stats.send_dropped += send_dropped
            stats.recv_errors += recv_errors
            stats.dropped_too_big += too_big
        return received, full

    def _peer_addr(self, key: bytes) -> tuple:
        """(ip, port) of a sockaddr key, as recvfrom writes it (the cache is bounded)."""
        if len(self.peer_addrs) >= 65536:
            self.peer_addrs.clear()
        addr = self.peer_addrs[key] = mmsg.address(key)
        return addr

    def _peer_name(self, peer: tuple) -> tuple:
        """(buffer, address, length) of a peer's sockaddr, built once (the cache is bounded)."""
        if len(self.peer_names) >= 65536:
            self.peer_names.clear()
        raw = mmsg.sockaddr(peer)
        buf = ctypes.create_string_buffer(raw, len(raw))
        name = self.peer_names[peer] = (buf, ctypes.addressof(buf), len(raw))
        return name

    def _flush(self) -> tuple[int, int]:
        sent = dropped = 0
        for q in self.queues.values():
            if q.count:
                s, d = q.flush()
                sent += s
                dropped += d
        return sent, dropped

    def replay(self, sock: socket.socket, datagrams: list, now: float) -> None:
        """Datagrams read from listen socket ``sock`` before the engine ran (turnd/early.py),
        oldest first: through the same path as those it reads, BATCH at a time."""
        h = self.handlers[sock.fileno()]
        batch = h[5]
        for i in range(0, len(datagrams), BATCH):
            self._drain(h, now, batch.load(datagrams[i:i + BATCH]))
        self._flush()

    def _drain(self, h: tuple, now: float, loaded: int = 0) -> tuple[int, bool]:
        """Up to BATCH datagrams from clients on a listen socket, with one recvmmsg (or the
        ``loaded`` ones ``replay`` put in the slots): (how many, whether more may be
        waiting)."""
        _, sock, clients, slow_path, channel_end, batch = h
        forwarder = self.forwarder
        own_ips = forwarder.own_ips
        n_got = loaded or batch.receive(BATCH)
        if n_got <= 0:
            if n_got < 0:  # e.g. ECONNREFUSED from an earlier ICMP error: read again next time
                self.stats.recv_errors += 1
            return 0, n_got < 0
        arena = batch.buffer
        aview = memoryview(arena)
        abase = batch.base
        views, starts, names, lens = batch.views, batch.starts, batch.names, batch.lens
        namelen = batch.namelen
        v6 = namelen == 28
        unpack_len = mmsg.LEN.unpack_from
        mmsg_size, len_offset, iov_size = mmsg.MMSG_SIZE, mmsg.LEN_OFFSET, mmsg.IOV_SIZE
        pack_name, pack_iov = mmsg.NAME.pack_into, mmsg.IOV.pack_into
        run, run_fd, peer_names = self.peer_run, -1, self.peer_names
        run_names, run_iovs = run.names, run.iovs_mv
        to_peer = no_alloc = malformed = no_channel = no_perm = send_dropped = slow = 0
        try:
            for j in range(n_got):
                try:
                    n = unpack_len(lens, j * mmsg_size + len_offset)[0]
                    o = j * namelen
                    if v6:
                        key = bytes(names[o + 2:o + 4]) + bytes(names[o + 8:o + 24])
                    else:
                        key = bytes(names[o + 2:o + 8])
                    start = starts[j]
                    first = arena[start] if n else 0xFF
                    if 0x40 <= first < channel_end:  # ChannelData
                        alloc = clients.get(key)
                        if alloc is None or n < 4 or alloc.expires < now:
                            no_alloc += 1
                            continue
                        length = (arena[start + 2] << 8) | arena[start + 3]
                        if 4 + length > n:
                            malformed += 1
                            continue
                        ch = alloc.channels.get((first << 8) | arena[start + 1])
                        if ch is None or ch.expires < now:
                            no_channel += 1
                            continue
                        peer = ch.peer
                        expiry = alloc.permissions.get(peer[0])
                        if expiry is None or expiry < now:
                            no_perm += 1
                            continue
                        alloc.up_packets += 1
                        alloc.up_bytes += length
                        if ch.own:
                            if run.count:  # what came before goes first
                                run.fd = run_fd
                                sent, lost = run.flush()
                                to_peer += sent
                                send_dropped += lost
                            forwarder.to_peer(ch.relay, peer, aview[start + 4:start + 4 + length], now)
                            continue
                        # Into the run of datagrams through one relay socket (one sendmmsg).
                        fd = ch.relay.handle.fileno()
                        if fd != run_fd:
                            if run.count:
                                run.fd = run_fd
                                sent, lost = run.flush()
                                to_peer += sent
                                send_dropped += lost
                            run_fd = fd
                        name = peer_names.get(peer) or self._peer_name(peer)
                        k = run.count
                        pack_name(run_names, k * mmsg_size, name[1], name[2])
                        pack_iov(run_iovs, k * iov_size, abase + start + 4, length)
                        run.count = k + 1
                        continue
                    if first == 0:  # a Send indication? (the parser checks the type)
                        alloc = clients.get(key)
                        found = send_indication_untrusted(views[j], n) if alloc is not None else None
                        if found is not None:
                            peer, begin, end = found
                            relay = alloc.relays.get(6 if ":" in peer[0] else 4)
                            expiry = alloc.permissions.get(peer[0])
                            if relay is None or expiry is None or expiry < now or alloc.expires < now:
                                no_perm += 1
                                continue
                            alloc.up_packets += 1
                            alloc.up_bytes += end - begin
                            if peer[0] in own_ips:
                                if run.count:  # what came before goes first
                                    run.fd = run_fd
                                    sent, lost = run.flush()
                                    to_peer += sent
                                    send_dropped += lost
                                forwarder.to_peer(relay, peer, aview[start + begin:start + end], now)
                                continue
                            fd = relay.handle.fileno()
                            if fd != run_fd:
                                if run.count:
                                    run.fd = run_fd
                                    sent, lost = run.flush()
                                    to_peer += sent
                                    send_dropped += lost
                                run_fd = fd
                            name = peer_names.get(peer) or self._peer_name(peer)
                            k = run.count
                            pack_name(run_names, k * mmsg_size, name[1], name[2])
                            pack_iov(run_iovs, k * iov_size, abase + start + begin, end - begin)
                            run.count = k + 1
                            continue
                    if run.count:  # what came before goes first
                        run.fd = run_fd
                        sent, lost = run.flush()
                        to_peer += sent
                        send_dropped += lost
                    slow += 1
                    slow_path(bytes(aview[start:start + n]), mmsg.address(key), sock)
                except Exception:  # a bug: this datagram is dropped, not the batch
                    self.stats.internal_errors += 1
                    self.on_error()
        finally:
            if run.count:
                run.fd = run_fd
                sent, lost = run.flush()
                to_peer += sent
                send_dropped += lost
            stats = self.stats
            stats.packets_in += n_got
            stats.to_peer += to_peer
            stats.dropped_no_allocation += no_alloc
            stats.dropped_malformed += malformed
            stats.dropped_no_channel += no_channel
            stats.dropped_no_permission += no_perm
            stats.send_dropped += send_dropped
            stats.packets_slow_path += slow
        return n_got, n_got == BATCH
