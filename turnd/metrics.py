"""Prometheus metrics (``[metrics] listen``), in the text format of the official
``prometheus-client`` package, served over HTTP with ``h11`` (sans-I/O, like the core).

Nothing is counted for metrics: the hot path's plain integers (``relay.RelayStats``, the
core's counters, each allocation's packets and bytes) are read when Prometheus scrapes, by a
custom collector, so there is no library call per packet.  ``snapshot(running)`` turns one
process's state into plain numbers; with ``[server] workers`` each worker writes its
snapshot into its slot of the shared memory once a second and the master serves them all,
labelled ``worker="N"``.  No per-user labels (coturn's per-user metrics leaked memory).
"""

from __future__ import annotations

import json
import logging
import platform
import struct
import time

import h11
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from . import __version__
from .logs import address_text

log = logging.getLogger("turnd")

SLOT_SIZE = 64 * 1024      # bytes of shared memory per worker for its snapshot
PUBLISH_INTERVAL = 1.0     # seconds between a worker's snapshots
MAX_REQUEST = 8 * 1024     # bytes of an HTTP request to /metrics
REQUEST_TIMEOUT = 2.0     # seconds to read a request and write the answer
CACHE_SECONDS = 1.0       # a scrape within this of the last one gets the same text
MAX_CONNECTIONS = 16       # scrapes served at once; more are closed at once

COMMON_CODES = ("300", "400", "401", "403", "420", "437", "438", "441", "442", "486", "508")
DROP_REASONS = ("dropped_no_allocation", "dropped_no_channel", "dropped_no_permission",
                "dropped_own_address", "dropped_malformed", "dropped_too_big", "send_dropped",
                "recv_errors")


def snapshot(running) -> dict:
    """One process's numbers (JSON-able)."""
    shell = running.shell
    allocations: dict[str, int] = {}
    up = list(shell.closed_traffic)
    for alloc in running.core.allocations.values():
        for family in alloc.relays:
            k = f"ipv{family}/{alloc.five_tuple.transport}"
            allocations[k] = allocations.get(k, 0) + 1
        up[0] += alloc.up_packets
        up[1] += alloc.up_bytes
        up[2] += alloc.down_packets
        up[3] += alloc.down_bytes
    pools = running.core.pools.values()
    ports = [sum(p.high - p.low + 1 for p in pools), sum(len(p) for p in pools)]
    return {"allocations": allocations, "traffic": up, "relay": running.stats.as_dict(),
            "ports": ports,
            "core": dict(running.core.stats), "streams": dict(running.tcp_stats),
            "draining": running.core.draining is not None, "internal_errors": shell.internal_errors}


class Collector:
    """Builds the metric families from ``snapshots()``: {worker label or "": snapshot}."""

    def __init__(self, snapshots, started: float):
        self.snapshots, self.started = snapshots, started

    def describe(self):
        return []

    def collect(self):
        snaps = self.snapshots()
        labels = ["worker"] if any(snaps) else []

        def fam(kind, name, doc, extra=()):
            return kind(name, doc, labels=[*labels, *extra])

        allocs = fam(GaugeMetricFamily, "turnd_allocations", "Live allocations.", ("family", "transport"))
        packets = fam(CounterMetricFamily, "turnd_relayed_packets", "Datagrams relayed.", ("direction",))
        volume = fam(CounterMetricFamily, "turnd_relayed_bytes", "Payload bytes relayed.", ("direction",))
        drops = fam(CounterMetricFamily, "turnd_dropped_packets", "Datagrams dropped, by reason.", ("reason",))
        auth = fam(CounterMetricFamily, "turnd_auth_failures", "Failed authentications, by reason.", ("reason",))
        errors = fam(CounterMetricFamily, "turnd_error_responses", "STUN error responses sent, by code.", ("code",))
        policy = fam(CounterMetricFamily, "turnd_peer_policy_refusals", "Peers refused by the peer policy.")
        limited = fam(CounterMetricFamily, "turnd_rate_limited", "Unauthenticated requests dropped by limits.unauthenticated_rate.")
        made = fam(CounterMetricFamily, "turnd_allocations_ended", "Allocations ended, by how.", ("how",))
        created = fam(CounterMetricFamily, "turnd_allocations_created", "Allocations created.")
        conns = fam(GaugeMetricFamily, "turnd_connections", "Open TCP and TLS connections.")
        conns_total = fam(CounterMetricFamily, "turnd_connections_accepted", "TCP and TLS connections accepted.")
        refused = fam(CounterMetricFamily, "turnd_connections_refused", "TCP and TLS connections refused at once, by cap.", ("reason",))
        closed = fam(CounterMetricFamily, "turnd_connections_closed", "TCP and TLS connections turnd closed, by reason.", ("reason",))
        ports = fam(GaugeMetricFamily, "turnd_relay_ports", "Relay ports (all families) in relay.ports, and free.", ("state",))
        draining = fam(GaugeMetricFamily, "turnd_draining", "1 while draining (new allocations refused).")
        internal = fam(CounterMetricFamily, "turnd_internal_errors", "Bugs caught: a packet or connection dropped.")
        page = fam(CounterMetricFamily, "turnd_selftest_page_requests", "HTTP requests on the TCP/TLS ports (the self-test page).")
        for worker, s in sorted(snaps.items()):
            w = [worker] if labels else []
            seen = {f"{f}/{t}": 0 for f in ("ipv4", "ipv6") for t in ("udp", "tcp", "tls")}
            seen.update(s["allocations"])
            for key, n in seen.items():  # zeros too: a dashboard shows 0, not "no data"
                family, transport = key.split("/")
                allocs.add_metric([*w, family, transport], n)
            total, free = s.get("ports", (0, 0))
            ports.add_metric([*w, "total"], total)
            ports.add_metric([*w, "free"], free)
            t = s["traffic"]
            packets.add_metric([*w, "to_peers"], t[0])
            packets.add_metric([*w, "to_clients"], t[2])
            volume.add_metric([*w, "to_peers"], t[1])
            volume.add_metric([*w, "to_clients"], t[3])
            for reason in DROP_REASONS:
                drops.add_metric([*w, reason.removeprefix("dropped_")], s["relay"].get(reason, 0))
            core = s["core"]
            for reason, key in (("wrong_password_or_user", "auth_failures"), ("stale_nonce", "error_438"),
                                ("wrong_user_for_allocation", "error_441")):
                auth.add_metric([*w, reason], core.get(key, 0))
            codes = dict.fromkeys(COMMON_CODES, 0)
            codes.update({key[6:]: n for key, n in core.items() if key.startswith("error_")})
            for code, n in codes.items():
                errors.add_metric([*w, code], n)
            policy.add_metric(w, core.get("peers_denied", 0))
            limited.add_metric(w, core.get("dropped_rate_limited", 0))
            created.add_metric(w, core.get("allocations_created", 0))
            for how in ("deleted", "expired", "closed", "closed_by_admin", "not_adopted"):
                made.add_metric([*w, how], core.get(f"allocations_{how}", 0))
            st = s["streams"]
            conns.add_metric(w, st.get("open", 0))
            conns_total.add_metric(w, st.get("connections", 0))
            for key, n in st.items():
                if key.startswith("refused_"):
                    refused.add_metric([*w, key[8:]], n)
                elif key.startswith("closed_"):
                    closed.add_metric([*w, key[7:]], n)
                elif key == "tls_handshake_failed":
                    closed.add_metric([*w, key], n)
            draining.add_metric(w, 1 if s["draining"] else 0)
            internal.add_metric(w, s["internal_errors"])
            page.add_metric(w, st.get("http_requests", 0))
        yield from (allocs, packets, volume, drops, auth, errors, policy, limited, created, made,
                    conns, conns_total, refused, closed, ports, draining, internal, page)
        up = GaugeMetricFamily("turnd_uptime_seconds", "Seconds since turnd started.")
        up.add_metric([], time.time() - self.started)
        yield up
        info = InfoMetricFamily("turnd_build", "turnd's version and Python's.")
        info.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield info


class CachedRegistry:
    """The rendered metrics, made at most once per CACHE_SECONDS however often anyone
    scrapes: a flood of scrapes costs the relay one snapshot a second."""

    def __init__(self, registry: CollectorRegistry):
        self.registry, self.text, self.at = registry, b"", -1e9

    def render(self) -> bytes:
        now = time.monotonic()
        if now - self.at >= CACHE_SECONDS:
            self.text, self.at = generate_latest(self.registry), now
        return self.text


def registry_for(snapshots, started: float) -> CachedRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(snapshots, started))
    return CachedRegistry(registry)


# --- workers: snapshots through shared memory ------------------------------------------

def write_slot(buf, index: int, snap: dict) -> None:
    """Worker ``index`` publishes its snapshot (length-prefixed JSON; a sequence number
    around it so a reader never takes a half-written one)."""
    data = json.dumps(snap).encode()[:SLOT_SIZE - 12]
    base = index * SLOT_SIZE
    seq = struct.unpack_from("<I", buf, base)[0] + 1
    struct.pack_into("<I", buf, base, seq | 1)  # odd: being written
    struct.pack_into("<I", buf, base + 4, len(data))
    buf[base + 12:base + 12 + len(data)] = data
    struct.pack_into("<I", buf, base + 8, seq | 1)
    struct.pack_into("<I", buf, base, (seq | 1) + 1)  # even: done


def read_slot(buf, index: int) -> dict | None:
    base = index * SLOT_SIZE
    for _ in range(3):
        seq = struct.unpack_from("<I", buf, base)[0]
        if seq == 0 or seq & 1:
            continue
        n = struct.unpack_from("<I", buf, base + 4)[0]
        data = bytes(buf[base + 12:base + 12 + min(n, SLOT_SIZE - 12)])
        if struct.unpack_from("<I", buf, base)[0] == seq:
            try:
                return json.loads(data)
            except ValueError:
                return None
    return None


async def publish(running, buf, index: int) -> None:
    """A worker: its snapshot into its slot, every PUBLISH_INTERVAL."""
    while True:
        try:
            write_slot(buf, index, snapshot(running))
        except Exception:
            running.shell.internal_error()
        await trio.sleep(PUBLISH_INTERVAL)


# --- the HTTP endpoint ---------------------------------------------------------------

def open_listener(endpoint):
    """The metrics socket, bound at start-up (a port in use is one line, like any other)."""
    from .sockets import open_socket
    sock = open_socket("tcp", endpoint.host, endpoint.port, what="metrics")
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


class Admin:
    """The admin's side of the metrics listener: ``/sessions`` (the live allocations, JSON)
    and ``POST /sessions/close?id=ID``.  Loopback clients may; anyone else needs
    ``Authorization: Bearer <the token in [metrics] admin_token_file>``."""

    CHUNK = 500  # allocations formatted between two checkpoints: listing never stalls relaying

    def __init__(self, running, token_file: str = ""):
        self.running, self.token_file = running, token_file
        self.lock = trio.Lock()  # one listing at a time
        self.cached: tuple[float, str | None, bytes] = (-1e9, None, b"")

    def allowed(self, peer_ip: str, headers: dict) -> bool:
        import ipaddress
        import hmac
        if ipaddress.ip_address(peer_ip).is_loopback:
            return True
        if not self.token_file:
            return False
        try:
            with open(self.token_file) as f:
                token = f.read().strip()
        except OSError:
            return False
        given = headers.get(b"authorization", b"")
        return bool(token) and hmac.compare_digest(given, b"Bearer " + token.encode())

    async def sessions(self, user: str | None) -> bytes:
        """The listing; the same bytes within CACHE_SECONDS (however many ask)."""
        async with self.lock:
            at, who, body = self.cached
            if time.monotonic() - at < CACHE_SECONDS and who == user:
                return body
            body = await self._sessions(user)
            self.cached = (time.monotonic(), user, body)
            return body

    async def _sessions(self, user: str | None) -> bytes:
        running = self.running
        now = running.shell.now()
        allocs = list(running.core.allocations.values())
        parts, out = [], []
        for i, a in enumerate(allocs):
            if i and i % self.CHUNK == 0:  # format a chunk, then let the relay run
                if out:
                    parts.append(json.dumps(out)[1:-1])
                    out = []
                await trio.lowlevel.checkpoint()
            if user is not None and a.username != user:
                continue
            ft = a.five_tuple
            out.append({"id": a.id, "user": a.username, "client": address_text(ft.client),
                        "transport": ft.transport,
                        "relayed": [address_text(r.advertised) for r in a.relays.values()],
                        "permissions": len(a.permissions), "channels": len(a.channels),
                        "to_peers_packets": a.up_packets, "to_peers_bytes": a.up_bytes,
                        "to_client_packets": a.down_packets, "to_client_bytes": a.down_bytes,
                        "age": round(now - a.created), "expires_in": max(0, round(a.expires - now))})
        if out:
            parts.append(json.dumps(out)[1:-1])
        return ('{"sessions": [' + ", ".join(parts) + "]}").encode()

    def close(self, alloc_id: str, by: str) -> bool:
        self.cached = (-1e9, None, b"")
        shell = self.running.shell
        actions = self.running.core.close_allocation(alloc_id)
        if not actions:
            return False
        log.info("allocation %s closed by the admin at %s", alloc_id, by)
        shell.execute(actions, None)
        return True


def _unquote(value: bytes) -> str:
    import urllib.parse
    return urllib.parse.unquote(value.decode("ascii", errors="replace"))


def _host_is_an_address(host: bytes) -> bool:
    """Host: an IP literal (with a port) or localhost, as turnd sessions sends it."""
    import ipaddress
    from .webpage import host_in_header
    text = host_in_header(host)
    if text == "localhost":
        return True
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


async def serve_http(listener: trio.SocketListener, registry: CollectorRegistry,
                     admin: Admin | None = None) -> None:
    """GET /metrics (and /) answer the metrics; /sessions the admin's; anything else 404 or
    405.  One request per connection, within MAX_REQUEST bytes and REQUEST_TIMEOUT seconds."""
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def one(stream: trio.SocketStream) -> None:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            await trio.aclose_forcefully(stream)
            return
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                await _answer_untrusted(stream, registry, admin)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError):
            pass
        except Exception:
            log.exception("metrics endpoint error")
        finally:
            limiter.release()
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(one, [listener])


async def _answer_untrusted(stream: trio.SocketStream, registry: CollectorRegistry, admin: Admin | None) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            conn.receive_data(data)
            if not data and conn.their_state is not h11.DONE:
                return
            continue
        if isinstance(event, h11.Request):
            break
        return
    path, _, query = event.target.partition(b"?")
    params = dict(p.split(b"=", 1) for p in query.split(b"&") if b"=" in p)
    method = event.method
    ctype = "text/plain; charset=utf-8"
    if path in (b"/metrics", b"/"):
        if method not in (b"GET", b"HEAD"):
            status, body = 405, b"method not allowed\n"
        else:
            status, body, ctype = 200, registry.render(), CONTENT_TYPE_LATEST
    elif path in (b"/sessions", b"/sessions/close") and admin is not None:
        peer = stream.socket.getpeername()[0]
        headers_ = dict(event.headers)
        if b"origin" in headers_ or not _host_is_an_address(headers_.get(b"host", b"")):
            # a web page (any Origin) or a DNS-rebound name: never the admin's own tools
            status, body = 403, b"forbidden: no Origin, and Host must be an address\n"
        elif not admin.allowed(peer, headers_):
            status, body = 403, b"forbidden: from loopback, or Authorization: Bearer <admin token>\n"
        elif path == b"/sessions" and method in (b"GET", b"HEAD"):
            user = params.get(b"user")
            status, body = 200, await admin.sessions(_unquote(user) if user else None)
            ctype = "application/json"
        elif path == b"/sessions/close" and method == b"POST":
            alloc_id = _unquote(params.get(b"id", b""))
            found = admin.close(alloc_id, peer)
            status, body = (200, b'{"closed": true}') if found else (404, b'{"closed": false}')
            ctype = "application/json"
        else:
            status, body = 405, b"method not allowed\n"
    elif path in (b"/sessions", b"/sessions/close"):
        status, body = 501, b"sessions are not served with server.workers > 1\n"
    else:
        status, body = 404, b"not found: /metrics\n"
    headers = [("Content-Type", ctype), ("Content-Length", str(len(body))), ("Connection", "close")]
    if status == 405:
        headers.append(("Allow", "POST" if path == b"/sessions/close" else "GET, HEAD"))
    out = conn.send(h11.Response(status_code=status, headers=headers))
    if method != b"HEAD":
        out += conn.send(h11.Data(data=body))
    out += conn.send(h11.EndOfMessage())
    await stream.send_all(out)
