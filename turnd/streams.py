"""TCP and TLS clients: accepting connections within the caps, telling what each one
speaks from its first bytes, and one reader and one writer task per connection.

A connection is classified once (docs/design.md):

1. From a ``[server] proxy_protocol`` source: a PROXY v1 or v2 header first (else closed,
   counted ``closed_bad_proxy``); the client is who the header names.  From anyone else
   a PROXY header is closed and counted (``closed_untrusted_proxy``): nobody but a trusted
   proxy may choose the address turnd sees.
2. On a ``tls_listen`` port, TLS; on a plain TCP port, a TLS ClientHello (first byte 0x16)
   is served as TLS too when ``[tls]`` has a certificate (as coturn does: one port can
   serve both), else closed and counted (``closed_tls_no_cert``).  The handshake must end
   within ``limits.tls_handshake_timeout``.
3. Then STUN and ChannelData frames (turnd/stun/framing.py), relayed by the engine's
   stream path (``Forwarder.from_stream_untrusted``); the rest goes to the core.

Deadlines: everything up to the first whole STUN message within
``limits.tcp_first_message_timeout`` (a TLS handshake within its own), then a message at
least every ``limits.tcp_idle_timeout`` (bytes alone don't count: no slowloris).  Memory:
one largest frame (64 KiB) being read, ``relay.STREAM_BUFFER`` (64 KiB) being written, and
the kernel's socket buffers.  When the connection ends, its allocation goes with it.
"""

from __future__ import annotations

import errno
import functools
import os
import ipaddress
import logging
import socket
import ssl

import trio

from . import proxy, relay
from .sockets import local_address
from .stun.errors import StunDecodeError
from .stun.framing import StreamFramer
from .turn.protocol import FiveTuple, client_key
from .turn.ratelimit import TokenBuckets

log = logging.getLogger("turnd")

ACCEPT_BATCH = 64
# accept() errors that mean "out of resources for now": wait a little, don't spin.
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
TLS_RECORD = 0x16  # the first byte of a TLS handshake record (a ClientHello)
FIRST_READ = 4096
# Frames from all TCP/TLS connections together between two turns of the rest (the UDP
# engine above all): hundreds of connections full of tiny frames get this much, not 64 each.
ROUND_BUDGET = 256
HANDOVER_BYTES = 16 << 20  # unframed and unsent bytes of TCP connections a restart carries
RECV_BUFFER = 64 * 1024  # SO_RCVBUF of a connection: what a client can leave queued for us
RATE_BUCKETS = 4096  # per-IP connection rate: token buckets indexed by a hash of the address

STREAM_STATS = ("connections", "open", "tls_connections", "closed_not_stun", "closed_idle",
                "closed_reset", "refused_per_ip", "refused_total", "accept_errors",
                "closed_tls_no_cert", "tls_handshake_failed", "closed_bad_proxy",
                "closed_untrusted_proxy", "closed_misuse", "refused_rate", "http_requests",
                "not_handed_over")
HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ",
                b"CONNECT ", b"TRACE ")


class FrameBudget:
    """ROUND_BUDGET frames for all connections together per scheduler round.  A reader asks
    ``await grant()`` for how many it may handle now; when the round's budget is spent, the
    first to ask waits for one round of everything else (a checkpoint) and refills it, the
    others wait for that."""

    def __init__(self) -> None:
        self.left = ROUND_BUDGET
        self.refilled: trio.Event | None = None

    async def grant(self) -> int:
        while self.left <= 0:
            if self.refilled is None:
                self.refilled = event = trio.Event()
                await trio.lowlevel.checkpoint()  # everyone else, the engine too, runs first
                self.left, self.refilled = ROUND_BUDGET, None
                event.set()
            else:
                await self.refilled.wait()
        return min(self.left, relay.STREAM_FRAMES)


class _Closed(Exception):
    """This connection ends here; ``counter`` says why (a tcp_stats key), or None."""

    def __init__(self, counter: str | None):
        self.counter = counter


def _leaf(group: BaseExceptionGroup) -> BaseException:
    """The exception that ended a connection's reader or writer (not the other's
    cancellation)."""
    while True:
        inner = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)] or group.exceptions
        first = inner[0]
        if not isinstance(first, BaseExceptionGroup):
            return first
        group = first


class _Prefixed(trio.abc.Stream):
    """A stream whose first bytes were read already (to classify the connection): they
    come out first, then the socket's.  What trio.SSLStream reads its handshake from."""

    def __init__(self, inner: trio.SocketStream, first: bytes):
        self.inner, self.first = inner, first

    async def receive_some(self, max_bytes=None):
        if self.first:
            data, self.first = self.first, b""
            return data
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


class StreamServer:
    """The TCP/TLS side of one ``Shell``: accept loops and connections."""

    def __init__(self, shell):
        self.shell = shell
        self.config = shell.config
        self.core = shell.core
        self.stats = dict.fromkeys(STREAM_STATS, 0)
        self.per_ip: dict[str, int] = {}  # open connections by client_key (IPv6: /64)
        self.cap = 0  # set by the shell: limits.tcp_connections or what open files allow
        self.tls_context: ssl.SSLContext | None = None
        self.trusted = tuple(ipaddress.ip_network(n) for n in self.config.server.proxy_protocol)
        self.channel_end = (self.core.config.channel_max >> 8) + 1
        self.connections: set[relay.StreamClient] = set()
        self.page_ports: dict[str, int | None] = {}  # the self-test page's TURN URLs: set by serve()
        self.budget = FrameBudget()
        self.rate = TokenBuckets(RATE_BUCKETS)  # new connections per client address

    def reconfigure(self, config) -> None:
        """A reload: caps, deadlines and trusted proxies for what comes next."""
        from .server import tcp_cap
        self.config = config
        self.trusted = tuple(ipaddress.ip_network(n) for n in config.server.proxy_protocol)
        self.cap = tcp_cap(config)

    def is_trusted_proxy(self, ip: str) -> bool:
        if not self.trusted:
            return False
        addr = ipaddress.ip_address(ip)
        return any(addr in net for net in self.trusted)

    # --- accepting -----------------------------------------------------------------------

    async def accept_loop(self, lsock: socket.socket, tls: bool, nursery: trio.Nursery) -> None:
        """Accept connections on a listening socket (``tls``: a tls_listen port)."""
        while True:
            await trio.lowlevel.wait_readable(lsock)
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, addr = lsock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                        self.stats["accept_errors"] += 1
                        self.shell.log_limited("accept", logging.WARNING,
                                               "cannot accept TCP connections: %s", exc.strerror)
                        await trio.sleep(0.1)
                        break
                    continue  # ECONNABORTED and the like: that connection is gone already
                self._admit(conn, (addr[0], addr[1]), tls, nursery)
            else:
                await trio.lowlevel.checkpoint()

    def _refuse(self, counter: str, why: str) -> None:
        self.stats[counter] += 1
        self.shell.log_limited(counter, logging.WARNING, "TCP connection refused: %s", why)

    def _admit(self, conn: socket.socket, addr: tuple, tls: bool, nursery: trio.Nursery) -> None:
        if self.stats["open"] >= self.cap:
            self._refuse("refused_total", f"{self.cap} are open (limits.tcp_connections, or "
                         "what the open-files limit leaves)")
            conn.close()
            return
        proxied = self.is_trusted_proxy(addr[0])
        key = None
        if not proxied:  # a proxy's clients are counted by the address its header gives
            key = self._claim(addr[0])
            if key is None:
                conn.close()
                return
        self.stats["connections"] += 1
        self.stats["open"] += 1
        conn.setblocking(False)
        try:  # what a client can leave queued for turnd to work through is bounded
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
        except OSError:
            pass
        nursery.start_soon(self.connection, conn, addr, tls, proxied, key)

    def _claim(self, ip: str) -> str | None:
        """Count one more connection of ``ip``'s client key; None when it has its cap or
        opens connections faster than limits.tcp_connection_rate."""
        key = client_key(ip)
        if not self.rate.ok(key, self.shell.now(), self.config.limits.tcp_connection_rate):
            self._refuse("refused_rate", "a client address opens connections faster than "
                         f"limits.tcp_connection_rate ({self.config.limits.tcp_connection_rate}/s)")
            return None
        cap = self.config.limits.tcp_connections_per_ip
        if self.per_ip.get(key, 0) >= cap:
            self._refuse("refused_per_ip", f"a client address has limits.tcp_connections_per_ip "
                         f"({cap}) open")
            return None
        self.per_ip[key] = self.per_ip.get(key, 0) + 1
        return key

    def _release(self, key: str) -> None:
        n = self.per_ip[key] - 1
        if n:
            self.per_ip[key] = n
        else:
            del self.per_ip[key]

    # --- one connection ------------------------------------------------------------------

    async def connection(self, conn: socket.socket, addr: tuple, tls: bool, proxied: bool,
                         key: str | None, adopted: dict | None = None) -> None:
        """One connection, from its first byte (or, ``adopted``, from where a predecessor
        turnd left it: turnd/handover.py)."""
        claimed = [key] if key else []
        try:
            if adopted is not None:
                await self._resume(conn, adopted)
            else:
                await self._serve(conn, addr, tls, proxied, claimed)
        except _Closed as closed:
            if closed.counter:
                self.stats[closed.counter] += 1
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            self.stats["closed_reset"] += 1  # the client went away: nothing to report
        except Exception:
            self.shell.internal_error()
        finally:
            conn.close()
            self.stats["open"] -= 1
            for k in claimed:
                self._release(k)

    async def _serve(self, conn: socket.socket, addr: tuple, tls: bool, proxied: bool,
                     claimed: list) -> None:
        limits = self.config.limits
        raw = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
        client = addr
        with trio.move_on_after(limits.tcp_first_message_timeout) as first_scope:
            first = b""
            if proxied:
                client, first = await self._proxy_header(raw, addr)
                if client != addr:  # the proxy's client: counted as any other client
                    key = self._claim(client[0])
                    if key is None:
                        raise _Closed(None)
                    claimed.append(key)
            if not first:
                first = await raw.receive_some(FIRST_READ)
                if not first:
                    raise _Closed(None)
            if not proxied and (first[:6] == proxy.V1_PREFIX or first[:12] == proxy.V2_SIGNATURE):
                self.shell.log_limited("untrusted proxy", logging.WARNING,
                                       "PROXY header from %s, not in server.proxy_protocol: "
                                       "connection closed", "an untrusted source")
                raise _Closed("closed_untrusted_proxy")
            stream: trio.abc.Stream = raw
            if tls or first[0] == TLS_RECORD:
                if self.tls_context is None:
                    raise _Closed("closed_tls_no_cert" if first[0] == TLS_RECORD else "closed_not_stun")
                stream = trio.SSLStream(_Prefixed(raw, first), self.tls_context, server_side=True,
                                        https_compatible=True)
                first = b""
                try:
                    with trio.fail_after(limits.tls_handshake_timeout):
                        await stream.do_handshake()
                except (trio.BrokenResourceError, trio.TooSlowError):
                    raise _Closed("tls_handshake_failed") from None
                self.stats["tls_connections"] += 1
                tls = True
                first = await stream.receive_some(FIRST_READ)  # the first bytes inside TLS
                if not first:
                    raise _Closed(None)
            if self.config.selftest.enabled and first.startswith(HTTP_METHODS):
                # A fresh TURN connection starts with STUN: these bytes are a browser
                # asking for the self-test page (turnd/webpage.py), answered, then closed.
                self.stats["http_requests"] += 1
                from .webpage import answer_http_untrusted
                await answer_http_untrusted(stream, first, local_address(conn), tls, self)
                raise _Closed(None)
            if first[0] >= 0x40:  # a fresh connection starts with STUN, never ChannelData
                raise _Closed("closed_misuse" if first[0] < 0x80 else "closed_not_stun")
        if first_scope.cancelled_caught:
            raise _Closed("closed_idle")
        ft = FiveTuple("tls" if tls else "tcp", client, local_address(conn))
        framer = StreamFramer(self.channel_end)
        try:
            framer.feed(first)
        except StunDecodeError:
            raise _Closed("closed_not_stun") from None
        del first  # the framer holds the bytes now: keep one copy, not two
        sc = relay.StreamClient(None if tls else conn)
        await self._run(sc, stream, ft, framer, first_scope.deadline)

    async def _run(self, sc: relay.StreamClient, stream, ft: FiveTuple, framer: StreamFramer,
                   deadline: float) -> None:
        """The connection's reader and writer, until it ends (or is handed over)."""
        sc.framer, sc.ft = framer, ft
        self.connections.add(sc)
        try:
            with trio.CancelScope() as sc.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, sc, stream)
                    await self._reader(sc, stream, ft, framer, deadline)
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # the reader's or the writer's, as it was
            raise _leaf(group) from None
        finally:
            self.connections.discard(sc)
            if not sc.handed:  # (handed over: the successor serves it and its allocation)
                sc.closed = True
                self.shell.execute(self.core.connection_closed(ft), None)
            sc.done.set()

    async def freeze(self) -> list:
        """A hand-over: stop reading and writing every plain TCP connection that carries an
        allocation, exactly where it is (what its framer holds, what waits to be written),
        up to HANDOVER_BYTES of those in all (the state travels while nothing reads; the
        others stay here and close when this turnd exits; TLS ones can't move at all: their
        session lives in OpenSSL).  Returns [(StreamClient, a dup of its fd)]."""
        frozen, held = [], 0
        for sc in list(self.connections):
            if sc.sock is None or sc.closed or sc.alloc is None:
                continue
            size = sc.framer.buffered + len(sc.buffer)
            if held + size > HANDOVER_BYTES:
                self.stats["not_handed_over"] += 1
                continue
            held += size
            frozen.append(sc)
        fds = {}
        for sc in frozen:
            sc.handed = True
            fds[sc] = os.dup(sc.sock.fileno())  # the connection's own fd closes as its task ends
            sc.scope.cancel()
        for sc in frozen:
            await sc.done.wait()
        return [(sc, fds[sc]) for sc in frozen]

    def adopt(self, conn: socket.socket, entry: dict, alloc) -> None:
        """A successor takes over a connection (``entry``: client, server, what was read and
        not yet framed, what waited to be written) with its allocation, if any (or, after a
        failed hand-over, the predecessor takes its own back)."""
        client = tuple(entry["client"])
        key = self._claim_adopted(client[0])
        self.stats["connections"] += 1
        self.stats["open"] += 1
        conn.setblocking(False)
        self.nursery.start_soon(self.connection, conn, client, False, False, key,
                                dict(entry, alloc=alloc))

    def _claim_adopted(self, ip: str) -> str:
        key = client_key(ip)
        self.per_ip[key] = self.per_ip.get(key, 0) + 1
        return key

    async def _resume(self, conn: socket.socket, entry: dict) -> None:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
        ft = FiveTuple("tcp", tuple(entry["client"]), tuple(entry["server"]))
        framer = StreamFramer(self.channel_end)
        framer.restore(bytes.fromhex(entry["read"]), int(entry["pad"]))
        sc = relay.StreamClient(conn)
        sc.buffer += bytes.fromhex(entry["write"])
        if sc.buffer:
            sc.ready.set()
        alloc = entry.get("alloc")
        if alloc is not None:
            alloc.client_handle = sc.attach(alloc)
            engine = self.shell.engine
            for r in alloc.relays.values():
                if r.handle.fileno() not in engine.handlers:  # (a failed hand-over: still there)
                    engine.add_relay(r)
        await self._run(sc, stream, ft, framer,
                        trio.current_time() + self.config.limits.tcp_idle_timeout)

    async def _proxy_header(self, raw: trio.SocketStream, addr: tuple) -> tuple[tuple, bytes]:
        """The client a trusted proxy speaks for, and the bytes after its header."""
        buf = b""
        while True:
            data = await raw.receive_some(proxy.MAX_HEADER - len(buf))
            if not data:
                raise _Closed(None)
            buf += data
            try:
                parsed = proxy.parse_untrusted(buf)
            except proxy.ProxyHeaderError as exc:
                self.shell.log_limited("bad proxy", logging.WARNING,
                                       "bad PROXY header from trusted proxy %s (%s): connection "
                                       "closed", addr[0], exc)
                raise _Closed("closed_bad_proxy") from None
            if parsed is not None:
                found, used = parsed
                return found or addr, buf[used:]
            if len(buf) >= proxy.MAX_HEADER:
                raise _Closed("closed_bad_proxy")

    async def _reader(self, sc: relay.StreamClient, stream, ft: FiveTuple,
                      framer: StreamFramer, deadline: float) -> None:
        limits = self.config.limits
        shell = self.shell
        slow = functools.partial(self._slow_path, ft, sc)
        forward = shell.forwarder.from_stream_untrusted
        budget = self.budget
        with trio.CancelScope(deadline=deadline) as idle:
            while True:
                try:
                    while framer.buffered:
                        requests = sc.requests
                        handled = forward(sc, framer, shell.now(), slow, await budget.grant())
                        if not handled:
                            break
                        budget.left -= handled
                        # Alive: it relays, or asks something.  Frames that do nothing
                        # (indications without an allocation) don't keep it open.
                        if sc.alloc is not None or sc.requests != requests:
                            idle.deadline = trio.current_time() + limits.tcp_idle_timeout
                        await trio.lowlevel.checkpoint()  # a burst of tiny frames takes turns
                except relay.StreamMisuse:
                    raise _Closed("closed_misuse") from None
                except StunDecodeError:
                    raise _Closed("closed_not_stun") from None
                while len(sc.buffer) + sc.writing >= relay.STREAM_BUFFER and not sc.closed:
                    sc.room = trio.Event()  # replies wait for the client to read: no more
                    await sc.room.wait()    # requests are taken meanwhile
                if sc.closed:
                    raise _Closed("closed_reset")
                data = await stream.receive_some(framer.room)
                if not data:
                    return
                try:
                    framer.feed(data)
                except StunDecodeError:
                    raise _Closed("closed_not_stun") from None
                del data  # the framer holds the bytes now: keep one copy, not two
        if idle.cancelled_caught:
            raise _Closed("closed_idle")

    def _slow_path(self, ft: FiveTuple, sc: relay.StreamClient, frame: bytes) -> None:
        # An exception here (a bug) closes this connection (see ``connection``).
        if not (frame[0] & 0x01 or frame[1] & 0x10):  # the class bits: a request
            sc.requests += 1
        self.shell.execute(self.core.handle_untrusted(frame, ft, self.shell.now()), sc)

    async def _writer(self, sc: relay.StreamClient, stream) -> None:
        """Empty the connection's write buffer whenever something is in it.  Plain TCP is
        written from the buffer itself, so a hand-over knows exactly what was not sent."""
        if sc.sock is not None:
            sock = sc.sock
            while True:
                await sc.ready.wait()
                sc.ready = trio.Event()
                while sc.buffer:
                    try:
                        sent = sock.send(sc.buffer)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(sock)
                        continue
                    del sc.buffer[:sent]
                    sc.room.set()
        while True:
            await sc.ready.wait()
            sc.ready = trio.Event()
            while sc.buffer:
                data = bytes(sc.buffer)
                sc.buffer.clear()
                sc.writing = len(data)  # in flight: still counted against STREAM_BUFFER
                await stream.send_all(data)
                sc.writing = 0
                sc.room.set()
