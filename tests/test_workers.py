"""[server] workers = 2: a master and two worker processes on shared SO_REUSEPORT sockets."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import trio

from turnd.stun import decode_untrusted
from turnd.stun import constants as c

from .daemon import Turnd
from .helpers import UdpTurn, recv_or_none
from .turn_client import channel_data, send_indication

PORTS = (47000, 47999)  # worker 0: 47000-47499, worker 1: 47500-47999


class Daemon(Turnd):
    """turnd with workers, in its own process group; its log is read as it goes."""

    def __init__(self, tmp_path, workers: int = 2, extra: str = ""):
        super().__init__(tmp_path, f'[server]\nlisten = ["127.0.0.1:0"]\nrealm = "turnd.test"\n'
                         f'workers = {workers}\n[auth]\nusers = {{ alice = "alicepw", bob = "bobpw" }}\n'
                         f'[relay]\nports = "{PORTS[0]}-{PORTS[1]}"\n{extra}'
                         + ("" if "[metrics]" in extra else '[metrics]\nlisten = ""\n'))
        for i in range(workers):
            self.wait_for(rf"worker {i} started")

    def worker_pids(self) -> dict[int, int]:
        return {int(i): int(p) for i, p in re.findall(r"worker (\d+) started \(pid (\d+)\)", self.text())}


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    yield d
    d.stop()


def worker_of(relayed) -> int:
    return 0 if relayed[1] < (PORTS[0] + PORTS[1] + 1) // 2 else 1


async def clients_on_both_workers(server, tries: int = 40):
    """Allocations until there is one in each worker (the kernel picks by address)."""
    found: dict[int, tuple] = {}
    for i in range(tries):
        turn = await UdpTurn.connect(server, *(("alice", "alicepw") if i % 2 else ("bob", "bobpw")))
        relayed = await turn.allocate()
        found.setdefault(worker_of(relayed), (turn, relayed))
        if len(found) == 2:
            return found
    raise AssertionError("every allocation landed in one worker")


async def test_relay_to_relay_between_two_workers(daemon):
    server = ("127.0.0.1", daemon.port)
    with trio.fail_after(30):
        found = await clients_on_both_workers(server)
        (a, relay_a), (b, relay_b) = found[0], found[1]
        # Default peer policy: loopback peers are refused, turnd's live relays are not.
        await a.permit(relay_b)
        await b.bind(0x4100, relay_a)
        await a.sock.sendto(send_indication(a.client, relay_b, b"from worker 0"), server)
        assert await b.recv() == channel_data(0x4100, b"from worker 0")
        await b.sock.sendto(channel_data(0x4100, b"from worker 1"), server)
        msg = decode_untrusted(await a.recv())
        assert msg.get(c.DATA_ATTR) == b"from worker 1"
        assert msg.get(c.XOR_PEER_ADDRESS) == relay_b


async def test_a_port_of_another_worker_that_is_not_a_relay_is_never_reached(daemon):
    server = ("127.0.0.1", daemon.port)
    with trio.fail_after(30):
        found = await clients_on_both_workers(server)
        a, relay_a = found[0]
        # Some other program on a port of worker 1's slice, on turnd's own address.
        service, taken = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM), None
        for port in range(PORTS[1], PORTS[1] - 200, -1):  # a free port in worker 1's slice
            try:
                await service.bind(("127.0.0.1", port))
            except OSError:
                continue
            taken = port
            break
        assert taken is not None
        await a.permit(("127.0.0.1", 1))  # turnd's relay address: allowed (its live relays)
        await a.sock.sendto(send_indication(a.client, ("127.0.0.1", taken), b"probe"), server)
        assert await recv_or_none(service) is None
        resp = await a.call(c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4000), (c.XOR_PEER_ADDRESS, ("127.0.0.1", taken))])
        assert resp.get(c.ERROR_CODE).code == 403


async def test_a_dead_worker_is_restarted_on_the_same_socket_with_the_same_secret(daemon):
    server = ("127.0.0.1", daemon.port)
    with trio.fail_after(40):
        found = await clients_on_both_workers(server)
        victim, relayed = found[1]
        survivor, _ = found[0]
        pid = daemon.worker_pids()[1]
        mark = len(daemon.text())
        os.kill(pid, signal.SIGKILL)
        daemon.wait_for(r"worker 1 \(pid \d+\) exited with -9; restarting", after=mark)
        daemon.wait_for(r"worker 1 started", after=mark)
        # Its allocation is gone (437), but not its nonce (no 438): the secret is shared
        # and the new worker reads the same socket, so the client's packets reach it.
        msg, data = victim.client.request(c.REFRESH, [(c.LIFETIME, 600)])
        await victim.sock.sendto(data, server)
        reply = decode_untrusted((await victim.sock.recvfrom(2048))[0])
        assert reply.get(c.ERROR_CODE).code == 437
        # The killed worker's relay port is no longer one of turnd's live relays.
        resp = await survivor.call(c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4000),
                                                    (c.XOR_PEER_ADDRESS, relayed)])
        assert resp.get(c.ERROR_CODE).code == 403
        # ...and it can allocate again, while the other worker's client never noticed.
        assert worker_of(await victim.allocate()) == 1
        assert (await survivor.call(c.REFRESH, [(c.LIFETIME, 600)])).cls == c.SUCCESS


def test_sigterm_stops_every_worker(tmp_path):
    daemon = Daemon(tmp_path)
    pids = daemon.worker_pids()
    start = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - start < 12
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "stopping 2 workers" in daemon.text()


def test_too_few_relay_ports_for_the_workers_is_one_line(tmp_path):
    conf = tmp_path / "t.toml"
    conf.write_text('[server]\nlisten = ["127.0.0.1:0"]\nworkers = 4\n[relay]\nports = "50000-50002"\n')
    out = subprocess.run([sys.executable, "-m", "turnd", "serve", "--config", str(conf)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == "turnd: relay.ports has 3 ports: too few for 4 workers"


async def test_drain_reaches_every_worker_and_a_restarted_one_and_early_signals_kill_none(tmp_path):
    daemon = Daemon(tmp_path)
    try:
        # signals right away (a worker may still be starting) are not fatal to anyone
        for pid in daemon.worker_pids().values():
            os.kill(pid, signal.SIGHUP)
        daemon.proc.send_signal(signal.SIGUSR1)  # drain: the master passes it on
        for i in range(2):
            daemon.wait_for(r"turnd\[\d\] INFO draining: new allocations are refused")
        pid = daemon.worker_pids()[1]
        mark = len(daemon.text())
        os.kill(pid, signal.SIGKILL)
        daemon.wait_for(r"worker 1 started", after=mark)
        daemon.wait_for(r"turnd\[1\] INFO draining", after=mark)  # restarted: draining too
        assert "exited with -1" not in daemon.text()
        with trio.fail_after(20):
            refused = 0
            for _ in range(12):  # clients land on both workers: every one is refused
                t = await UdpTurn.connect(("127.0.0.1", daemon.port))
                resp = await t.call(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
                refused += resp.get(c.ERROR_CODE) is not None and resp.get(c.ERROR_CODE).code == 403
                t.sock.close()
        assert refused == 12
    finally:
        daemon.stop()
