"""Restart without dropping a call: SIGUSR2 hands the sockets and allocations to a successor
(turnd/handover.py); a UDP client's allocation, permission and channel relay on without a new
Allocate; a successor that can't start leaves the old one serving."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys

import pytest
import trio

from turnd.stun import constants as c

from .daemon import Turnd
from .helpers import StreamTurn, UdpTurn, udp_client
from .turn_client import channel_data

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from fakesystemd import FdStoringSystemd  # noqa: E402

CONFIG = ('[server]\nlisten = ["127.0.0.1:0"]\nrealm = "turnd.test"\n'
          '[auth]\nusers = { alice = "alicepw", bob = "bobpw" }\n[relay]\nports = "44600-44699"\n'
          '[peers]\nallow = ["127.0.0.1/32"]\n[metrics]\nlisten = ""\n')


def successor_pid(d: Turnd) -> int:
    return int(d.wait_for(r"restart: successor started \(pid (\d+)\)").group(1))


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def restarting_turnd(tmp_path, config: str = CONFIG):
    """turnd, and at the end every successor it started stopped too."""
    d = Turnd(tmp_path, config)
    try:
        yield d
    finally:
        d.stop()
        for pid in re.findall(r"successor started \(pid (\d+)\)", d.text()):
            kill(int(pid))


@contextlib.contextmanager
def under_fake_systemd(tmp_path):
    """turnd with a fake systemd that keeps its descriptors; at the end both stopped, and
    every turnd the fake one started."""
    systemd = FdStoringSystemd(str(tmp_path / "notify.sock"))
    d = Turnd(tmp_path, CONFIG, env={"NOTIFY_SOCKET": systemd.path})
    try:
        yield systemd, d
    finally:
        d.stop()
        systemd.close()


async def test_a_udp_call_goes_on_through_a_restart_without_a_new_allocate(tmp_path):
    with restarting_turnd(tmp_path) as d:
        turn = await UdpTurn.connect(("127.0.0.1", d.port))
        relayed = await turn.allocate()
        peer = await udp_client("127.0.0.1")
        await turn.bind(0x4001, peer.getsockname())
        stream = await StreamTurn.connect(("127.0.0.1", d.port), "bob", "bobpw")
        stream_relayed = await stream.allocate()
        await stream.bind(0x4002, peer.getsockname())
        _, half = stream.client.request(c.REFRESH)  # half a request in flight across the switch
        await stream.send(half[:7])
        lost = 0
        async with trio.open_nursery() as n:
            async def echo():
                while True:
                    data, addr = await peer.recvfrom(2048)
                    await peer.sendto(data, addr)
            n.start_soon(echo)
            for i in range(300):
                if i == 100:
                    d.signal(signal.SIGUSR2)
                await turn.sock.sendto(channel_data(0x4001, b"%05d" % i), turn.server)
                got = await turn.recv(timeout=1)
                if got != channel_data(0x4001, b"%05d" % i):
                    lost += 1
                await trio.sleep(0.005)
            n.cancel_scope.cancel()
        successor_pid(d)
        d.wait_for(r"restart: handed over to pid \d+ \(2 allocations, 1 TCP connections; sockets "
                   r"unread for \d+ ms\); 0 allocations end with their connections")
        d.wait_for(r"restart: adopted 2 allocations")
        assert d.proc.wait(timeout=15) == 0  # the predecessor is gone
        assert lost == 0
        # the same allocation: its channel, its permission, its nonce (no 438), its refresh
        assert (await turn.call(c.REFRESH)).cls == c.SUCCESS
        await peer.sendto(b"after", relayed)
        assert await turn.recv() == channel_data(0x4001, b"after")
        # the TCP connection went along, where it stood: the rest of the half-sent request is
        # answered, and its allocation relays both ways
        await stream.send(half[7:])
        resp = stream.client.learn(await stream.frame())
        assert resp.cls == c.SUCCESS and resp.method == c.REFRESH
        await stream.send(channel_data(0x4002, b"tcp after"))
        peer_got = await peer.recvfrom(2048)
        assert peer_got[0] == b"tcp after"
        await peer.sendto(b"to tcp", stream_relayed)
        assert await stream.frame() == channel_data(0x4002, b"to tcp")
        # the successor serves new clients too
        other = await UdpTurn.connect(("127.0.0.1", d.port), "bob", "bobpw")
        await other.allocate()


async def test_a_successor_with_a_broken_config_leaves_the_old_one_serving(tmp_path):
    d = Turnd(tmp_path, CONFIG)
    try:
        turn = await UdpTurn.connect(("127.0.0.1", d.port))
        await turn.allocate()
        d.conf.write_text(CONFIG + "[limits]\nuser_quota = -1\n")
        # turnd restart checks the file first
        out = subprocess.run([sys.executable, "-m", "turnd", "restart", "--pid", str(d.proc.pid)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and "not restarted" in out.stderr
        d.signal(signal.SIGUSR2)  # a signal anyway: the successor fails, the old one stays
        new = successor_pid(d)
        d.wait_for(r"restart failed: the successor did not start .*; still serving")
        assert d.proc.poll() is None
        assert (await turn.call(c.REFRESH)).cls == c.SUCCESS
        with pytest.raises(ProcessLookupError):
            os.kill(new, 0)
    finally:
        d.stop()


async def test_a_successor_failing_after_the_freeze_gives_tcp_calls_back_to_the_old_one(tmp_path):
    """The config checks out but the successor can't listen where it says (another program
    has the port): it fails after the predecessor froze its TCP connections.  Those are
    served again from where they stood: a half-sent request is answered, the allocation
    relays, the exit status of ``turnd restart`` says it failed."""
    import socket as _socket
    d = Turnd(tmp_path, CONFIG)
    taken = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))  # someone else's port
    try:
        peer = await udp_client("127.0.0.1")
        stream = await StreamTurn.connect(("127.0.0.1", d.port), "bob", "bobpw")
        stream_relayed = await stream.allocate()
        await stream.bind(0x4002, peer.getsockname())
        _, half = stream.client.request(c.REFRESH)
        await stream.send(half[:7])
        d.conf.write_text(CONFIG.replace(
            '"127.0.0.1:0"', f'"127.0.0.1:{d.port}", "127.0.0.1:{taken.getsockname()[1]}"'))
        out = await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "turnd", "restart", "--pid", str(d.proc.pid)],
            capture_output=True, text=True, timeout=60))
        assert out.returncode == 1, out
        assert "restart failed" in out.stderr and f"pid {d.proc.pid} still serves" in out.stderr, out
        d.wait_for(r"restart failed: the successor did not take over .*; still serving")
        await stream.send(half[7:])
        resp = stream.client.learn(await stream.frame())
        assert resp.cls == c.SUCCESS and resp.method == c.REFRESH
        await stream.send(channel_data(0x4002, b"still here"))
        assert (await peer.recvfrom(2048))[0] == b"still here"
        await peer.sendto(b"back", stream_relayed)
        assert await stream.frame() == channel_data(0x4002, b"back")
        assert "allocation closed" not in d.text()
    finally:
        taken.close()
        d.stop()


async def test_a_drain_goes_on_through_a_restart(tmp_path):
    with restarting_turnd(tmp_path) as d:
        turn = await UdpTurn.connect(("127.0.0.1", d.port))
        await turn.allocate()
        d.signal(signal.SIGUSR1)
        d.wait_for("draining: new allocations are refused")
        d.signal(signal.SIGUSR2)
        d.wait_for("restart: the predecessor was draining; so is this turnd")
        assert d.proc.wait(timeout=15) == 0
        other = await UdpTurn.connect(("127.0.0.1", d.port), "bob", "bobpw")
        resp = await other.call(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
        assert resp.get(c.ERROR_CODE).code == 403  # still draining
        assert (await turn.call(c.REFRESH)).cls == c.SUCCESS  # the live one runs on


async def test_allocations_outside_the_new_relay_ports_end_with_a_line_each(tmp_path):
    with restarting_turnd(tmp_path) as d:
        turn = await UdpTurn.connect(("127.0.0.1", d.port))
        await turn.allocate()
        d.conf.write_text(CONFIG.replace('ports = "44600-44699"', 'ports = "44800-44899"'))
        d.signal(signal.SIGUSR2)
        d.wait_for("restart: adopted 0 allocations; 1 no longer fit this config")
        line = d.wait_for(r"allocation ended .*").group(0)
        assert "user=alice" in line and "no longer fits this config" in line, line
        assert "to_peers_packets=0" in line, line
        resp = await turn.call(c.REFRESH)
        assert resp.get(c.ERROR_CODE).code == 437  # the client learns it is gone
        relayed = await turn.allocate()  # and makes a new one, in the new range
        assert 44800 <= relayed[1] <= 44899


async def test_connections_without_an_allocation_are_not_carried(tmp_path):
    """What a restart carries, it carries while nothing reads: connections that hold no call
    (here: half a 64 KiB message each, from a client that never authenticated) stay behind
    and close with the old process; a connection with an allocation goes along."""
    with restarting_turnd(tmp_path) as d:
        idle = []
        for _ in range(20):
            s = trio.socket.socket()
            await s.connect(("127.0.0.1", d.port))
            await s.send(b"\x00\x01\xff\xfc\x21\x12\xa4\x42" + bytes(12) + bytes(60000))
            idle.append(s)
        stream = await StreamTurn.connect(("127.0.0.1", d.port), "bob", "bobpw")
        await stream.allocate()
        await trio.sleep(0.2)
        d.signal(signal.SIGUSR2)
        d.wait_for(r"restart: handed over to pid \d+ \(1 allocations, 1 TCP connections; sockets "
                   r"unread for \d+ ms\); 0 allocations end with their connections \(TLS, or TCP "
                   r"beyond the hand-over limit\); 20 connections without an allocation close")
        assert d.proc.wait(timeout=15) == 0
        with trio.fail_after(5):
            assert await idle[0].recv(100) == b""  # closed with the old process
        resp = await stream.call(c.REFRESH)
        assert resp.cls == c.SUCCESS  # the one with a call went along
        for s in idle:
            s.close()


async def test_tls_allocations_end_cleanly_and_their_clients_come_back(tmp_path):
    """A TLS session can't move (it lives in OpenSSL): its connection closes, its allocation
    ends with a line of its own in the old process's log, and the client connects again to
    the successor, TLS and all."""
    from turnd.tls import generate
    cert, key = generate("localhost", str(tmp_path / "tls"))
    with restarting_turnd(tmp_path, CONFIG + f'[tls]\ncert = "{cert}"\nkey = "{key}"\n') as d:
        tls = await StreamTurn.connect(("127.0.0.1", d.port), "bob", "bobpw", tls_ca=cert)
        await tls.allocate()
        udp = await UdpTurn.connect(("127.0.0.1", d.port))
        await udp.allocate()
        d.signal(signal.SIGUSR2)
        d.wait_for(r"restart: handed over to pid \d+ \(1 allocations, 0 TCP connections; sockets "
                   r"unread for \d+ ms\); 1 allocations end with their connections")
        assert d.proc.wait(timeout=15) == 0
        line = d.wait_for(r"allocation (stopped|closed) .*").group(0)
        assert "user=bob" in line and "transport=tls" in line, line
        with trio.fail_after(5):
            try:
                assert await tls.stream.receive_some(100) == b""
            except trio.BrokenResourceError:
                pass  # (closed without close_notify: the process ended)
        again = await StreamTurn.connect(("127.0.0.1", d.port), "bob", "bobpw", tls_ca=cert)
        assert await again.allocate()
        assert (await udp.call(c.REFRESH)).cls == c.SUCCESS  # (the UDP one went along)


async def test_under_systemd_the_successor_becomes_the_main_pid(tmp_path):
    from .test_service import FakeSystemd
    systemd = FakeSystemd(tmp_path)
    d = Turnd(tmp_path, CONFIG, env={"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": "400000",
                                     "WATCHDOG_PID": "1"})
    new = None
    try:
        await trio.to_thread.run_sync(systemd.wait_for, "READY", "1")
        d.signal(signal.SIGUSR2)
        msg = await trio.to_thread.run_sync(systemd.wait_for, "MAINPID")
        new = successor_pid(d)
        assert int(msg["MAINPID"]) == new
        await trio.to_thread.run_sync(lambda: systemd.wait_for("WATCHDOG", "1", timeout=3))
    finally:
        d.stop()
        if new:
            kill(new)


@pytest.mark.interop
@pytest.mark.parametrize("how", ["turnd restart", "systemctl restart"])
async def test_a_chromium_relay_only_call_survives_a_restart_mid_call(nursery, tmp_path, how):
    """A relay-only call in headless Chromium (a message every 50 ms over a data channel,
    answered) through a hand-over (SIGUSR2), and through a stop and a start by a systemd
    that keeps the sockets: no gap over 2 s, nothing lost."""
    import tempfile
    import urllib.parse
    from .browsers import Child, chromium_command
    from .interop import need
    from .webpage import serve_page
    need("chromium")
    systemd = FdStoringSystemd(str(tmp_path / "notify.sock")) if how == "systemctl restart" else None
    # the default peer policy: relay to relay, inside turnd
    d = Turnd(tmp_path, '[server]\nlisten = ["127.0.0.1:0"]\nrealm = "turnd.test"\n'
              '[auth]\nusers = { cowork = "calls-pass" }\n[relay]\nports = "44700-44799"\n'
              '[metrics]\nlisten = ""\n', env={"NOTIFY_SOCKET": systemd.path} if systemd else None)
    new = None
    send, events = trio.open_memory_channel(10)

    def on_request(path, query):
        if path in ("/started", "/result"):
            send.send_nowait((path, query))
    page = open(os.path.join(os.path.dirname(__file__), "webrtc_longcall.html"), "rb").read()
    http_port = await nursery.start(serve_page, page, on_request)
    query = urllib.parse.urlencode({"turn": f"turn:127.0.0.1:{d.port}?transport=udp",
                                    "user": "cowork", "pass": "calls-pass", "seconds": "8"})
    try:
        with tempfile.TemporaryDirectory() as profile:
            cmd, env = chromium_command(f"http://127.0.0.1:{http_port}/?{query}", profile)
            child = await Child("chromium", cmd, env).start()
            try:
                with trio.fail_after(60):
                    path, _ = await events.receive()
                    assert path == "/started"
                    await trio.sleep(2)  # mid-call
                    if systemd is None:
                        d.signal(signal.SIGUSR2)
                    else:
                        systemd.drain()
                        d.signal(signal.SIGTERM)
                        await trio.to_thread.run_sync(d.proc.wait)
                        systemd.drain()
                        systemd.start_with_store(str(d.conf), open(tmp_path / "second.log", "w"))
                    path, result = await events.receive()
            finally:
                await child.stop()
        if systemd is None:
            new = successor_pid(d)
            d.wait_for(r"restart: handed over to pid \d+ \(2 allocations")
        else:
            assert "restart: adopted 2 allocations" in (tmp_path / "second.log").read_text()
        assert result.get("ok") == ["1"], result
        sent, received = int(result["sent"][0]), int(result["received"][0])
        assert received >= sent - 1 and sent > 100, result  # (the last may be in flight)
        assert int(result["max_gap_ms"][0]) < 2000, result
        print(f"call through {how}:", result)
    finally:
        d.stop()
        if new:
            kill(new)
        if systemd is not None:
            systemd.close()  # (and the turnd it started)


@pytest.mark.parametrize("how", ["crash", "systemctl restart"])
async def test_systemd_s_store_lets_the_next_turnd_carry_the_call(tmp_path, how):
    """After a crash (SIGKILL, as the watchdog kills) the state is as last written (at most a
    second old); ``systemctl restart`` (SIGTERM, the store preserved) writes it as it stands
    when stopping, so even an allocation made just before goes on."""
    with under_fake_systemd(tmp_path) as (systemd, d):
        turn = await UdpTurn.connect(("127.0.0.1", d.port))
        relayed = await turn.allocate()
        peer = await udp_client("127.0.0.1")
        await turn.bind(0x4001, peer.getsockname())
        await trio.sleep(1.5)  # the state is written at most once a second
        systemd.drain()
        assert {"state", f"udp-127.0.0.1-{d.port}", f"tcp-127.0.0.1-{d.port}",
                f"relay-127.0.0.1-{relayed[1]}"} <= set(systemd.store)
        stored_state = os.pread(systemd.store["state"], 1 << 20, 0)
        assert b'"version": 1' in stored_state and b'"allocations": [{' in stored_state, stored_state[:300]
        late = await UdpTurn.connect(("127.0.0.1", d.port), user="bob", password="bobpw")
        late_relayed = await late.allocate()  # younger than the last write
        await late.bind(0x4002, peer.getsockname())
        if how == "crash":
            os.kill(d.proc.pid, signal.SIGKILL)  # (or the watchdog's kill)
        else:
            os.kill(d.proc.pid, signal.SIGTERM)  # systemctl restart: stop, then start
        d.proc.wait()
        systemd.drain()
        await turn.sock.sendto(channel_data(0x4001, b"while down"), turn.server)  # waits in the kernel
        systemd.start_with_store(str(d.conf), open(tmp_path / "second.log", "w"))
        with trio.fail_after(20):
            assert (await peer.recvfrom(2048))[0] == b"while down"  # relayed by the next turnd
            await peer.sendto(b"back", relayed)
            assert await turn.recv() == channel_data(0x4001, b"back")
            assert (await turn.call(c.REFRESH)).cls == c.SUCCESS  # its nonce is good too
            if how == "systemctl restart":
                await late.sock.sendto(channel_data(0x4002, b"late"), late.server)
                assert (await peer.recvfrom(2048))[0] == b"late"
                await peer.sendto(b"late back", late_relayed)
                assert await late.recv() == channel_data(0x4002, b"late back")
        log = (tmp_path / "second.log").read_text()
        adopted = 2 if how == "systemctl restart" else 1
        assert f"restart: adopted {adopted} allocations" in log, log
        if how == "systemctl restart":
            assert "2 UDP allocations kept in systemd's file descriptor store" in d.text()


async def test_datagrams_arriving_while_the_next_turnd_starts_are_read_early_not_dropped(tmp_path):
    """systemctl restart under load: the next turnd takes a few tenths of a second to start,
    more than a listen socket's buffer holds at a busy moment.  turnd/early.py reads the
    socket first thing and the engine serves what it read: nothing is lost.  (The listen
    socket's buffer is shrunk here so that the same happens at test rates.)"""
    import socket as _socket
    with under_fake_systemd(tmp_path) as (systemd, d):
        turn = await UdpTurn.connect(("127.0.0.1", d.port))
        await turn.allocate()
        peer = await udp_client("127.0.0.1")
        peer.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, 4 << 20)
        await turn.bind(0x4001, peer.getsockname())
        os.kill(d.proc.pid, signal.SIGTERM)
        d.proc.wait()
        systemd.drain()
        listener = _socket.socket(fileno=os.dup(systemd.store[f"udp-127.0.0.1-{d.port}"]))
        listener.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, 128 << 10)  # ~200 datagrams
        listener.close()
        systemd.start_with_store(str(d.conf), open(tmp_path / "second.log", "w"))
        sent, got = 3000, set()
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                async def receive():
                    while len(got) < sent:
                        got.add((await peer.recvfrom(2048))[0])
                nursery.start_soon(receive)
                for i in range(sent):  # 2,000 a second while the next turnd starts
                    await turn.sock.sendto(channel_data(0x4001, b"%06d" % i), turn.server)
                    if i % 10 == 9:
                        await trio.sleep(0.005)
                with trio.move_on_after(10):
                    while len(got) < sent:
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        log = (tmp_path / "second.log").read_text()
        assert len(got) == sent, (sent - len(got), log[-3000:])
        early = re.search(r"restart: (\d+) datagrams that arrived while this turnd started were "
                          r"read early", log)
        assert early and int(early.group(1)) > 0, log


async def test_a_flood_while_the_next_turnd_starts_does_not_hold_it_up(tmp_path):
    """Tiny datagrams as fast as one process sends them, for 8 s, from the moment turnd stops
    until well after the next one started: the early reader stops at its memory cap and the
    catching up at its time cap, so the next turnd serves the call (peer -> client over its
    relay socket) while the flood still goes on, instead of after it."""
    import time as _time
    with under_fake_systemd(tmp_path) as (systemd, d):
        flooder = None
        try:
            turn = await UdpTurn.connect(("127.0.0.1", d.port))
            relayed = await turn.allocate()
            peer = await udp_client("127.0.0.1")
            await turn.bind(0x4001, peer.getsockname())
            os.kill(d.proc.pid, signal.SIGTERM)
            d.proc.wait()
            systemd.drain()
            flood_seconds = 8.0
            flooder = subprocess.Popen([sys.executable, "-c", (
                "import socket, time\n"
                "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                f"to, end = ('127.0.0.1', {d.port}), time.monotonic() + {flood_seconds}\n"
                "while time.monotonic() < end:\n"
                "    for _ in range(2000):\n"
                "        try:\n"
                "            s.sendto(b'x', to)\n"
                "        except OSError:\n"
                "            pass\n")])
            await trio.sleep(0.3)
            started = _time.monotonic()
            systemd.start_with_store(str(d.conf), open(tmp_path / "second.log", "w"))
            with trio.fail_after(30):
                while True:  # the peer writes to the client every 50 ms until one arrives
                    await peer.sendto(b"through", relayed)
                    got = await turn.recv(timeout=0.05)
                    if got == channel_data(0x4001, b"through"):
                        break
            served_after = _time.monotonic() - started
            assert flooder.poll() is None, "the flood ended before the next turnd served"
            log = (tmp_path / "second.log").read_text()
            assert "restart: adopted 1 allocations" in log, log
            print(f"served {served_after:.1f} s after starting, during the flood")
        finally:
            if flooder is not None:
                flooder.kill()
                flooder.wait()