"""[metrics] listen: a Prometheus scrape over real HTTP, parsed with prometheus-client's own
parser, in one process and with workers."""

from __future__ import annotations

import re
import time
import urllib.request

import attrs
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from turnd.config import Endpoint, MetricsConfig
from turnd.server import serve
from turnd.stun import constants as c

from .daemon import Turnd
from .helpers import StreamTurn, UdpTurn, http_status, relay_some, turn_config, udp_client


def scrape_sync(addr) -> dict:
    with urllib.request.urlopen(f"http://{addr[0]}:{addr[1]}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def scrape(addr) -> dict:
    return await trio.to_thread.run_sync(scrape_sync, addr)


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_a_scrape_shows_allocations_traffic_refusals_and_connections(nursery):
    config = attrs.evolve(turn_config(), metrics=MetricsConfig(listen=Endpoint("127.0.0.1", 0)))
    running = await nursery.start(serve, config)
    with trio.fail_after(20):
        udp = await UdpTurn.connect(running.udp[0])
        relayed = await udp.allocate()
        peer = await udp_client("127.0.0.1")
        await relay_some(udp, peer, relayed, 7, 100, 4, 50)
        tcp = await StreamTurn.connect(running.tcp[0])
        await tcp.allocate()
        wrong = await UdpTurn.connect(running.udp[0], "alice", "wrong")
        resp = await wrong.call(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
        assert resp.get(c.ERROR_CODE).code == 401
        denied = await udp.call(c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, ("10.0.0.1", 1))])
        assert denied.get(c.ERROR_CODE).code == 403
        s = await scrape(running.metrics)
    assert value(s, "turnd_allocations", family="ipv4", transport="udp") == 1
    assert value(s, "turnd_allocations", family="ipv4", transport="tcp") == 1
    assert value(s, "turnd_relayed_packets_total", direction="to_peers") == 7
    assert value(s, "turnd_relayed_bytes_total", direction="to_peers") == 700
    assert value(s, "turnd_relayed_packets_total", direction="to_clients") == 4
    assert value(s, "turnd_relayed_bytes_total", direction="to_clients") == 200
    assert value(s, "turnd_auth_failures_total", reason="wrong_password_or_user") == 1
    assert value(s, "turnd_peer_policy_refusals_total") == 1
    assert value(s, "turnd_connections") == 1
    assert value(s, "turnd_allocations_created_total") == 2
    assert value(s, "turnd_uptime_seconds") > 0
    assert any(k[0] == "turnd_build_info" for k in s)
    # no per-user labels anywhere
    assert not any(dict(labels).get("user") for _, labels in s)
    # traffic of ended allocations still counts
    await udp.call(c.REFRESH, [(c.LIFETIME, 0)])
    await trio.sleep(1.1)  # scrapes within a second get the same (cached) text
    s = await scrape(running.metrics)
    assert value(s, "turnd_relayed_packets_total", direction="to_peers") == 7
    assert value(s, "turnd_allocations_ended_total", how="deleted") == 1


async def test_other_paths_and_methods_and_floods(nursery):
    config = attrs.evolve(turn_config(), metrics=MetricsConfig(listen=Endpoint("127.0.0.1", 0)))
    running = await nursery.start(serve, config)
    host, port = running.metrics

    def get(path, method="GET"):
        return http_status(f"http://{host}:{port}{path}", method)
    with trio.fail_after(20):
        assert await trio.to_thread.run_sync(get, "/nope") == 404
        assert await trio.to_thread.run_sync(get, "/metrics", "POST") == 405
        # a request that never ends, and one far too large, do not stop the next scrape
        slow = await trio.open_tcp_stream(host, port)
        await slow.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        big = await trio.open_tcp_stream(host, port)
        await big.send_all(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
        assert await trio.to_thread.run_sync(get, "/metrics") == 200


def test_workers_report_each_labelled(tmp_path):
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        mport = probe.getsockname()[1]
    d = Turnd(tmp_path, '[server]\nlisten = ["127.0.0.1:0"]\nrealm = "turnd.test"\nworkers = 2\n'
              '[auth]\nusers = { alice = "alicepw" }\n[relay]\nports = "46000-46999"\n'
              f'[metrics]\nlisten = "127.0.0.1:{mport}"\n')
    try:
        d.wait_for("worker 1 started")
        d.wait_for(rf"metrics on http://127\.0\.0\.1:{mport}/metrics")

        async def allocate_some():
            clients = []
            for _ in range(6):  # spread over both workers by their source ports
                t = await UdpTurn.connect(("127.0.0.1", d.port))
                await t.allocate()
                clients.append(t)
            return clients
        trio.run(allocate_some)
        deadline = time.monotonic() + 10
        while True:
            s = scrape_sync(("127.0.0.1", mport))
            workers = {dict(labels).get("worker") for name, labels in s if name == "turnd_allocations_created_total"}
            created = sum(v for (name, _), v in s.items() if name == "turnd_allocations_created_total")
            if (workers == {"0", "1"} and created == 6) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert workers == {"0", "1"}, s
        assert created == 6
    finally:
        d.stop()


async def test_a_flood_of_scrapes_costs_one_snapshot_a_second(nursery):
    config = attrs.evolve(turn_config(), metrics=MetricsConfig(listen=Endpoint("127.0.0.1", 0)))
    import turnd.metrics as metrics
    calls = []
    real = metrics.snapshot

    def counting(running):
        calls.append(1)
        return real(running)
    metrics_snapshot, metrics.snapshot = metrics.snapshot, counting
    try:
        running = await nursery.start(serve, config)
        start = trio.current_time()
        for _ in range(40):
            await scrape(running.metrics)
        elapsed = trio.current_time() - start
    finally:
        metrics.snapshot = metrics_snapshot
    assert len(calls) <= elapsed / metrics.CACHE_SECONDS + 1
