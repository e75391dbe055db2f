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

log = logging.getLogger("turnd")

SLOT_SIZE = 64 * 1024      # bytes of shared memory per worker for its snapshot
PUBLISH_INTERVAL = 1.0     # seconds between a worker's snapshots
MAX_REQUEST = 8 * 1024     # bytes of an HTTP request to /metrics
REQUEST_TIMEOUT = 5.0      # seconds to read a request and write the answer
MAX_CONNECTIONS = 16       # scrapes served at once; more are closed at once

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
    return {"allocations": allocations, "traffic": up, "relay": running.stats.as_dict(),
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
        closed = fam(CounterMetricFamily, "turnd_connections_refused", "TCP and TLS connections refused or closed early, by reason.", ("reason",))
        draining = fam(GaugeMetricFamily, "turnd_draining", "1 while draining (new allocations refused).")
        internal = fam(CounterMetricFamily, "turnd_internal_errors", "Bugs caught: a packet or connection dropped.")
        for worker, s in sorted(snaps.items()):
            w = [worker] if labels else []
            for key, n in s["allocations"].items():
                family, transport = key.split("/")
                allocs.add_metric([*w, family, transport], n)
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
            for key, n in core.items():
                if key.startswith("error_"):
                    errors.add_metric([*w, key[6:]], n)
            policy.add_metric(w, core.get("peers_denied", 0))
            limited.add_metric(w, core.get("dropped_rate_limited", 0))
            created.add_metric(w, core.get("allocations_created", 0))
            for how in ("deleted", "expired", "closed"):
                made.add_metric([*w, how], core.get(f"allocations_{how}", 0))
            st = s["streams"]
            conns.add_metric(w, st.get("open", 0))
            conns_total.add_metric(w, st.get("connections", 0))
            for key, n in st.items():
                if key.startswith(("refused_", "closed_")) or key in ("tls_handshake_failed", "accept_errors"):
                    closed.add_metric([*w, key], n)
            draining.add_metric(w, 1 if s["draining"] else 0)
            internal.add_metric(w, s["internal_errors"])
        yield from (allocs, packets, volume, drops, auth, errors, policy, limited, created, made,
                    conns, conns_total, closed, draining, internal)
        up = GaugeMetricFamily("turnd_uptime_seconds", "Seconds since turnd started.")
        up.add_metric([], time.time() - self.started)
        yield up
        info = InfoMetricFamily("turnd_build", "turnd's version and Python's.")
        info.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield info


def registry_for(snapshots, started: float) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(snapshots, started))
    return registry


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


async def serve_http(listener: trio.SocketListener, registry: CollectorRegistry) -> None:
    """GET /metrics (and /) answer the metrics; anything else 404 or 405.  One request per
    connection, within MAX_REQUEST bytes and REQUEST_TIMEOUT seconds."""
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def one(stream: trio.SocketStream) -> None:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            await stream.aclose()
            return
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                await _answer(stream, registry)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError):
            pass
        except Exception:
            log.exception("metrics endpoint error")
        finally:
            limiter.release()
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(one, [listener])


async def _answer(stream: trio.SocketStream, registry: CollectorRegistry) -> None:
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
    target = event.target.split(b"?")[0]
    if event.method not in (b"GET", b"HEAD"):
        status, body, ctype = 405, b"method not allowed\n", "text/plain"
    elif target in (b"/metrics", b"/"):
        status, body, ctype = 200, generate_latest(registry), CONTENT_TYPE_LATEST
    else:
        status, body, ctype = 404, b"not found: /metrics\n", "text/plain"
    headers = [("Content-Type", ctype), ("Content-Length", str(len(body))), ("Connection", "close")]
    if status == 405:
        headers.append(("Allow", "GET, HEAD"))
    out = conn.send(h11.Response(status_code=status, headers=headers))
    if event.method != b"HEAD":
        out += conn.send(h11.Data(data=body))
    out += conn.send(h11.EndOfMessage())
    await stream.send_all(out)
