"""turnd sessions: the live allocations from the running daemon (over the metrics listener),
and --close; who may ask; listing 10,000 allocations without stalling the relay."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import attrs
import trio

from turnd.config import Endpoint, MetricsConfig
from turnd.server import serve
from turnd.stun import constants as c

from .daemon import Turnd
from .helpers import (StreamTurn, UdpTurn, http_status, mass_allocate, relay_some, turn_config,
                      udp_client)


def turnd(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "turnd", *args], capture_output=True, text=True,
                          timeout=60)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_sessions_list_udp_and_tcp_allocations_with_counters_and_close_one(tmp_path):
    mport = free_port()
    d = Turnd(tmp_path, '[server]\nlisten = ["127.0.0.1:0"]\nrealm = "turnd.test"\n'
              '[auth]\nusers = { alice = "alicepw", bob = "bobpw" }\n[relay]\nports = "45200-45299"\n'
              f'[peers]\nallow = ["127.0.0.1/32"]\n[metrics]\nlisten = "127.0.0.1:{mport}"\n')
    try:
        udp = await UdpTurn.connect(("127.0.0.1", d.port))
        relayed = await udp.allocate()
        peer = await udp_client("127.0.0.1")
        await relay_some(udp, peer, relayed, 3, 100, 2, 40)
        tcp = await StreamTurn.connect(("127.0.0.1", d.port), "bob", "bobpw")
        await tcp.allocate()
        out = await trio.to_thread.run_sync(turnd, "sessions", "--config", str(d.conf), "--json")
        assert out.returncode == 0, out.stderr
        rows = {r["user"]: r for r in json.loads(out.stdout)["sessions"]}
        a, b = rows["alice"], rows["bob"]
        assert a["transport"] == "udp" and a["client"] == f"127.0.0.1:{udp.sock.getsockname()[1]}"
        assert a["relayed"] == [f"127.0.0.1:{relayed[1]}"]
        assert (a["permissions"], a["channels"]) == (1, 1)
        assert (a["to_peers_packets"], a["to_peers_bytes"]) == (3, 300)
        assert (a["to_client_packets"], a["to_client_bytes"]) == (2, 80)
        assert 500 <= a["expires_in"] <= 600 and a["age"] >= 0
        assert b["transport"] == "tcp"
        table = await trio.to_thread.run_sync(turnd, "sessions", "--config", str(d.conf), "--user", "bob")
        assert "bob" in table.stdout and "alice" not in table.stdout and "1 allocations" in table.stdout
        # close alice's: it ends at once, her next request gets 437, the log says who
        out = await trio.to_thread.run_sync(turnd, "sessions", "--config", str(d.conf), "--close", a["id"])
        assert out.returncode == 0 and out.stdout.strip() == f"closed {a['id']}", out.stderr
        resp = await udp.call(c.REFRESH)
        assert resp.get(c.ERROR_CODE).code == 437
        d.wait_for(rf"allocation {a['id']} closed by the admin at 127\.0\.0\.1")
        d.wait_for(r"allocation closed_by_admin user=alice")
        out = await trio.to_thread.run_sync(turnd, "sessions", "--config", str(d.conf), "--close", a["id"])
        assert out.returncode == 1 and "no allocation" in out.stderr
        from .test_metrics import scrape, value
        s = await scrape(("127.0.0.1", mport))
        assert value(s, "turnd_allocations_ended_total", how="closed_by_admin") == 1
    finally:
        d.stop()


async def test_sessions_need_loopback_or_the_admin_token(nursery, tmp_path):
    """From another address (here: a non-loopback view of the listener is simulated by the
    token check itself) only a matching Bearer token gets in."""
    from turnd.metrics import Admin
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    admin = Admin(None, str(token))
    assert admin.allowed("127.0.0.1", {})
    assert admin.allowed("::1", {})
    assert not admin.allowed("192.0.2.1", {})
    assert not admin.allowed("192.0.2.1", {b"authorization": b"Bearer wrong"})
    assert admin.allowed("192.0.2.1", {b"authorization": b"Bearer s3cret-token"})
    assert not Admin(None, "").allowed("192.0.2.1", {b"authorization": b"Bearer "})
    # and a POST to close needs the POST method
    config = attrs.evolve(turn_config(), metrics=MetricsConfig(listen=Endpoint("127.0.0.1", 0)))
    running = await nursery.start(serve, config)

    def get(path, method="GET"):
        return http_status(f"http://127.0.0.1:{running.metrics[1]}{path}", method)
    assert await trio.to_thread.run_sync(get, "/sessions/close?id=x") == 405
    assert await trio.to_thread.run_sync(get, "/sessions/close?id=x", "POST") == 404


async def test_listing_ten_thousand_allocations_does_not_stall_relaying(nursery):
    """10,000 allocations in the core; a sessions listing runs while a UDP call relays: the
    listing yields every 500 allocations, and the call loses nothing."""
    from .helpers import turn_config as tc
    from turnd.config import LimitsConfig, RelayConfig
    config = attrs.evolve(tc(relay=RelayConfig(ports=(20000, 40999)),
                             limits=LimitsConfig(ip_quota=0)),
                          metrics=MetricsConfig(listen=Endpoint("127.0.0.1", 0)))
    running = await nursery.start(serve, config)
    core = running.core
    # 10,000 allocations made through the core itself (as if 10,000 clients had come)
    made = mass_allocate(running, 10_000)
    assert made >= 5000 and len(core.allocations) == made
    peer = await udp_client("127.0.0.1")
    turn = await UdpTurn.connect(running.udp[0])
    relayed = await turn.allocate()
    await turn.bind(0x4001, peer.getsockname())
    gaps = []

    async def call():
        from .turn_client import channel_data
        for i in range(200):
            t0 = trio.current_time()
            await turn.sock.sendto(channel_data(0x4001, b"%04d" % i), turn.server)
            with trio.fail_after(2):
                await peer.recvfrom(100)
            gaps.append(trio.current_time() - t0)
            await trio.sleep(0.002)

    def listing():
        with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics[1]}/sessions", timeout=30) as r:
            return len(json.loads(r.read())["sessions"])
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            n.start_soon(call)
            counts = []
            for _ in range(3):
                counts.append(await trio.to_thread.run_sync(listing))
    assert counts == [made + 1] * 3 and len(gaps) == 200  # every datagram relayed meanwhile
    print(f"{made} allocations listed 3 times; call round trips: max {max(gaps) * 1000:.1f} ms, "
          f"median {sorted(gaps)[100] * 1000:.2f} ms")


async def test_sessions_refuse_web_pages_and_rebound_names(nursery):
    """A page in a browser on the admin's machine (it sends Origin), or a DNS name rebound to
    127.0.0.1 (its Host is a name), can't list or close sessions."""
    config = attrs.evolve(turn_config(), metrics=MetricsConfig(listen=Endpoint("127.0.0.1", 0)))
    running = await nursery.start(serve, config)
    turn = await UdpTurn.connect(running.udp[0])
    await turn.allocate()
    alloc_id = next(iter(running.core.allocations.values())).id
    port = running.metrics[1]

    def request(path, method="GET", **headers):
        return http_status(f"http://127.0.0.1:{port}{path}", method, **headers)
    run = trio.to_thread.run_sync
    assert await run(lambda: request("/sessions", Origin="http://evil.example")) == 403
    assert await run(lambda: request("/sessions", Host="evil.example:9641")) == 403
    assert await run(lambda: request(f"/sessions/close?id={alloc_id}", "POST",
                                     Origin="null")) == 403
    assert running.core.allocations  # still there
    assert await run(lambda: request("/sessions")) == 200
    assert await run(lambda: request(f"/sessions/close?id={alloc_id}", "POST")) == 200
    assert not running.core.allocations
