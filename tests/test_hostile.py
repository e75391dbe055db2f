"""Hostile traffic while calls go on: another process floods turnd with garbage,
oversized and unauthenticated requests from 200 loopback addresses and abusive TCP
connections, while relay-only calls (real sockets, paced like media) continue.  The calls
lose nothing, nothing fails inside turnd, and its memory stays flat."""

from __future__ import annotations

import gc
import os
import sys
import tracemalloc

import trio

from turnd.config import AuthConfig, Config, Endpoint, LimitsConfig, PeersConfig, RelayConfig, ServerConfig
from turnd.server import serve

from .helpers import USERS, UdpTurn
from .test_hardening import binding_still_answered
from .turn_client import channel_data

FLOOD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flood.py")
CALLS = 3
RATE = 100        # packets per second each way, per call (media-like pacing)
SECONDS = 5.0


async def one_way(sender: UdpTurn, receiver: UdpTurn, server, number: int, arrives_on: int,
                  got: list) -> None:
    """``sender`` sends RATE numbered ChannelData packets a second for SECONDS on channel
    ``number``; every one ``receiver`` gets (on its channel ``arrives_on``) is recorded."""
    total = int(RATE * SECONDS)

    async def receive():
        while len(got) < total:
            data, _ = await receiver.sock.recvfrom(2048)
            if data[:2] == arrives_on.to_bytes(2, "big"):
                got.append(int(data[4:12]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        start = trio.current_time()
        for seq in range(total):
            await trio.sleep_until(start + seq / RATE)
            await sender.sock.sendto(channel_data(number, b"%08d" % seq + b"m" * 152), server)
        with trio.move_on_after(2):
            while len(got) < total:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


async def test_calls_lose_nothing_while_a_hostile_process_floods(nursery):
    config = Config(
        server=ServerConfig(listen=(Endpoint("127.0.0.1", 0),), realm="turnd.test"),
        auth=AuthConfig(users=USERS, secrets=("rest-secret",)),
        relay=RelayConfig(ports=(44000, 44099)), peers=PeersConfig(),  # default peer policy
        limits=LimitsConfig(tcp_connections_per_ip=20, unauthenticated_rate=20))
    running = await nursery.start(serve, config)
    server = running.udp[0]
    with trio.fail_after(60):
        calls = []
        for i in range(CALLS):
            a = await UdpTurn.connect(server)
            b = await UdpTurn.connect(server, "bob", "bobpw")
            relay_a, relay_b = await a.allocate(), await b.allocate()
            await a.bind(0x4000 + i, relay_b)
            await b.bind(0x4100 + i, relay_a)
            calls.append((a, b, i))
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            results = []
            async with trio.open_nursery() as inner:
                flood = await inner.start(lambda task_status: trio.run_process(
                    [sys.executable, FLOOD, "127.0.0.1", str(server[1]), str(running.tcp[0][1]),
                     str(SECONDS - 1), "2000"], capture_stdout=True, check=True,
                    task_status=task_status))
                for a, b, i in calls:
                    got_b, got_a = [], []
                    results += [got_b, got_a]
                    # B's channel 0x41xx delivers what A sends on 0x40xx, and back
                    inner.start_soon(one_way, a, b, server, 0x4000 + i, 0x4100 + i, got_b)
                    inner.start_soon(one_way, b, a, server, 0x4100 + i, 0x4000 + i, got_a)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        await binding_still_answered(running)
    total = int(RATE * SECONDS)
    assert [len(got) for got in results] == [total] * (2 * CALLS)  # nothing lost
    assert all(got == sorted(got) for got in results)
    stats = running.core.stats
    # The flood really arrived: each kind was answered or dropped as it should be.
    assert stats.get("bad_requests", 0) > 50          # oversized and malformed: small 400s
    assert stats.get("dropped_not_stun", 0) > 500     # garbage
    assert stats.get("dropped_rate_limited", 0) > 100  # 401s past the per-IP rate
    assert stats.get("auth_failures", 0) > 10          # bad REST logins
    assert running.tcp_stats["connections"] > 5
    assert running.shell.internal_errors == 0 and running.stats.internal_errors == 0
    assert len(running.core.allocations) == 2 * CALLS
    assert grown < 512 * 1024, grown  # flat: no state per hostile packet
