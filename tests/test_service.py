"""Running turnd as a service: systemd's notify, watchdog and reload protocol against a fake
NOTIFY_SOCKET (a real unix datagram socket), reload under traffic, drain, shutdown, the
unit file, and the allocation log lines."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import trio

from turnd.stun import constants as c
from turnd.stun import decode_untrusted

from .daemon import Turnd
from .helpers import UdpTurn, relay_some, udp_client
from .turn_client import channel_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(ROOT, "systemd", "turnd.service")


def config_text(users='alice = "alicepw"', extra="", ports="45000-45499",
                peers='allow = ["127.0.0.1/32"]') -> str:
    return (f'[server]\nlisten = ["127.0.0.1:0"]\nrealm = "turnd.test"\n'
            f'[auth]\nusers = {{ {users} }}\n[relay]\nports = "{ports}"\n'
            f'[peers]\n{peers}\n{extra}' + ("" if "[metrics]" in extra else '[metrics]\nlisten = ""\n'))


class FakeSystemd:
    """What systemd listens on for sd_notify: a unix datagram socket."""

    def __init__(self, tmp_path):
        self.path = str(tmp_path / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.seen: list[dict] = []

    def wait_for(self, key: str, value: str | None = None, timeout: float = 15.0) -> dict:
        """The next message (after those already taken) that has ``key`` (= ``value``)."""
        import time
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.seen.append(msg)
            if key in msg and (value is None or msg[key] == value):
                return msg
        raise AssertionError(f"no {key}={value} from turnd; saw {self.seen[-10:]}")


def test_notify_watchdog_reload_drain_and_stop(tmp_path):
    systemd = FakeSystemd(tmp_path)
    d = Turnd(tmp_path, config_text(), env={"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": "400000"})
    try:
        ready = systemd.wait_for("READY", "1")
        assert ready["STATUS"] == "0 allocations, 0 relayed packets/s"
        for _ in range(3):  # every 0.2 s: half of WatchdogSec, from the event loop
            systemd.wait_for("WATCHDOG", "1", timeout=2)
        d.signal(signal.SIGHUP)
        reloading = systemd.wait_for("RELOADING", "1")
        assert abs(int(reloading["MONOTONIC_USEC"]) - time_usec()) < 5_000_000
        systemd.wait_for("READY", "1")
        d.wait_for("configuration reloaded from")
        d.signal(signal.SIGUSR1)
        assert systemd.wait_for("STATUS")["STATUS"].endswith(", draining")
        d.signal(signal.SIGTERM)
        systemd.wait_for("STOPPING", "1")
        assert d.proc.wait(timeout=15) == 0
    finally:
        d.stop()


def time_usec() -> int:
    import time
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_status_counts_allocations_and_packets(tmp_path):
    systemd = FakeSystemd(tmp_path)
    d = Turnd(tmp_path, config_text(), env={"NOTIFY_SOCKET": systemd.path})

    async def main():
        turn = await UdpTurn.connect(("127.0.0.1", d.port))
        await turn.allocate()
        status = await trio.to_thread.run_sync(systemd.wait_for, "STATUS")
        while not status["STATUS"].startswith("1 allocations"):
            status = await trio.to_thread.run_sync(systemd.wait_for, "STATUS")
    try:
        trio.run(main)
    finally:
        d.stop()


def test_without_notify_socket_nothing_is_sent_and_serving_works(tmp_path):
    from turnd.notify import Notifier
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval is None
    assert n.send("READY=1") is False
    # WATCHDOG_PID of another process: not ours to ping (sd_watchdog_enabled)
    other = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None
    ours = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())})
    assert ours.watchdog_interval == 0.5 and ours.address == "\0x"


# --- reload ---------------------------------------------------------------------------

async def _echo_peer(sock, count: int) -> None:
    for _ in range(count):
        data, addr = await sock.recvfrom(2048)
        await sock.sendto(data, addr)


async def test_reload_under_traffic_loses_nothing_and_applies_users_policy_and_limits(tmp_path):
    d = Turnd(tmp_path, config_text())
    try:
        turn = await UdpTurn.connect(("127.0.0.1", d.port))
        relayed = await turn.allocate()
        peer = await udp_client("127.0.0.1")
        await turn.bind(0x4001, peer.getsockname())
        count = 600
        got = 0
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_echo_peer, peer, count)
                for i in range(count):
                    if i == 200:  # mid-call: bob added, a limit and the peer policy changed
                        d.conf.write_text(config_text(
                            'alice = "alicepw", bob = "bobpw"', '[limits]\nmax_lifetime = 900\n',
                            peers='allow = ["127.0.0.1/32"]\ndeny = ["127.0.0.9/32"]'))
                        d.signal(signal.SIGHUP)
                    await turn.sock.sendto(channel_data(0x4001, b"%05d" % i), turn.server)
                    frame = await turn.recv(timeout=2)
                    assert frame == channel_data(0x4001, b"%05d" % i)
                    got += 1
                    await trio.sleep(0.002)
        assert got == count  # zero loss across the reload
        d.wait_for("configuration reloaded from")
        bob = await UdpTurn.connect(("127.0.0.1", d.port), "bob", "bobpw")
        await bob.allocate()  # a user added by the reload
        resp = await bob.call(c.REFRESH, [(c.LIFETIME, 3600)])
        assert resp.get(c.LIFETIME) == 900  # a limit changed by the reload
        # the running allocation is alice's still, and refreshes
        assert (await turn.call(c.REFRESH)).cls == c.SUCCESS
        # the new peer policy holds for new permissions
        resp = await bob.call(c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, ("127.0.0.9", 9))])
        assert resp.get(c.ERROR_CODE).code == 403
        assert relayed
    finally:
        d.stop()


async def test_a_bad_config_is_refused_and_the_old_one_stays(tmp_path):
    d = Turnd(tmp_path, config_text())
    try:
        d.conf.write_text(config_text() + "[limits]\nuser_quota = -1\n")
        d.signal(signal.SIGHUP)
        line = d.wait_for(r".*reload refused.*").group(0)
        assert "config error: limits.user_quota: -1: must be 0-1000000" in line
        turn = await UdpTurn.connect(("127.0.0.1", d.port))
        await turn.allocate()  # alice still logs in
        # keys a reload can't change are named, the rest applied
        d.conf.write_text(config_text('alice = "alicepw", bob = "bobpw"', ports="45500-45599"))
        d.signal(signal.SIGHUP)
        line = d.wait_for(r".*need a restart.*").group(0)
        assert line.endswith("not applied: relay.ports")
        bob = await UdpTurn.connect(("127.0.0.1", d.port), "bob", "bobpw")
        relayed = await bob.allocate()
        assert 45000 <= relayed[1] <= 45499  # the old range stays until a restart
    finally:
        d.stop()


# --- drain ----------------------------------------------------------------------------

@pytest.mark.parametrize("alternate", [None, "192.0.2.7:3478"])
async def test_drain_refuses_new_allocations_and_the_live_ones_run_on(tmp_path, alternate):
    text = config_text()
    if alternate:
        text = text.replace('realm = "turnd.test"\n', f'realm = "turnd.test"\nalternate = "{alternate}"\n')
    d = Turnd(tmp_path, text)
    try:
        turn = await UdpTurn.connect(("127.0.0.1", d.port))
        relayed = await turn.allocate()
        peer = await udp_client("127.0.0.1")
        await turn.bind(0x4001, peer.getsockname())
        d.signal(signal.SIGUSR1)
        d.wait_for("draining: new allocations are refused")
        other = await UdpTurn.connect(("127.0.0.1", d.port))
        resp = await other.call(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
        err = resp.get(c.ERROR_CODE)
        if alternate:
            assert err.code == 300 and resp.get(c.ALTERNATE_SERVER) == ("192.0.2.7", 3478)
        else:
            assert err.code == 403
        # the live allocation relays and refreshes on
        await turn.sock.sendto(channel_data(0x4001, b"on"), turn.server)
        assert (await peer.recvfrom(100))[0] == b"on"
        await peer.sendto(b"back", relayed)
        assert await turn.recv() == channel_data(0x4001, b"back")
        assert (await turn.call(c.REFRESH)).cls == c.SUCCESS
    finally:
        d.stop()


def test_turnd_drain_command_signals_the_daemon(tmp_path):
    d = Turnd(tmp_path, config_text())
    try:
        out = subprocess.run([sys.executable, "-m", "turnd", "drain", "--pid", str(d.proc.pid)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        d.wait_for("draining: new allocations are refused")
    finally:
        d.stop()


# --- logs -----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_one_line_per_allocation_event_with_counts_and_a_truncated_client(tmp_path, fmt):
    d = Turnd(tmp_path, config_text(extra=f'[log]\nformat = "{fmt}"\n'))
    try:
        turn = await UdpTurn.connect(("127.0.0.1", d.port))
        relayed = await turn.allocate()
        peer = await udp_client("127.0.0.1")
        await relay_some(turn, peer, relayed, 5, 100, 3, 10)
        await turn.call(c.REFRESH, [(c.LIFETIME, 0)])
        d.wait_for("deleted")
    finally:
        d.stop()
    lines = [ln for ln in d.text().splitlines() if "allocation " in ln]
    assert len(lines) == 2, d.text()
    port = turn.sock.getsockname()[1]
    assert str(port) not in lines[0].split("relay")[0]  # no client port: truncated by default
    if fmt == "json":
        created, deleted = (json.loads(ln) for ln in lines)
        assert created["message"] == "allocation created" and created["user"] == "alice"
        assert created["client"] == "127.0.0.0/24" and created["transport"] == "udp"
        assert created["relay"] == f"127.0.0.1:{relayed[1]}" and created["lifetime"] == 600
        assert deleted["message"] == "allocation deleted"
        assert (deleted["to_peers_packets"], deleted["to_peers_bytes"]) == (5, 500)
        assert (deleted["to_client_packets"], deleted["to_client_bytes"]) == (3, 30)
    else:
        assert re.search(r"allocation created user=alice client=127\.0\.0\.0/24 transport=udp "
                         rf"relay=127\.0\.0\.1:{relayed[1]} lifetime=600$", lines[0]), lines[0]
        assert re.search(r"allocation deleted .* to_peers_packets=5 to_peers_bytes=500 "
                         r"to_client_packets=3 to_client_bytes=30$", lines[1]), lines[1]


# --- the unit file --------------------------------------------------------------------

def test_the_unit_file_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing in CI: .ci/run must install systemd")
        pytest.skip("systemd-analyze not installed")
    text = open(UNIT).read()
    for key in ("Type=notify", "WatchdogSec=", "ExecReload=", "Restart=on-failure", "User=turnd",
                "AmbientCapabilities=CAP_NET_BIND_SERVICE", "NoNewPrivileges=yes",
                "ProtectSystem=strict", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
                "SystemCallFilter=@system-service", "MemoryDenyWriteExecute=yes", "LimitNOFILE=",
                "FileDescriptorStoreMax=", "NotifyAccess=all",
                "/etc/turnd/turnd.toml"):
        assert key in text, key
    assert "u turnd " in open(os.path.join(ROOT, "systemd", "turnd.sysusers")).read()
    # verify checks the binaries exist: point it at this checkout's turnd
    turnd = os.path.join(ROOT, ".venv", "bin", "turnd")
    unit = tmp_path / "turnd.service"
    unit.write_text(text.replace("/usr/local/bin/turnd", turnd))
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([analyze, "security", "--offline=true", str(unit)], capture_output=True,
                         text=True, cwd=tmp_path)
    score = re.search(r"Overall exposure level for turnd.service: ([\d.]+) (\w+)", out.stdout)
    assert score, out.stdout + out.stderr
    assert float(score.group(1)) <= 2.0, score.group(0)  # "OK" or better


@pytest.mark.parametrize("mode", ["truncated", "hashed", "full"])
async def test_client_addresses_in_the_logs_are_as_private_as_configured(tmp_path, mode):
    """By default no client address appears whole (nor its port); REST user names lose their
    expiry; "hashed" is stable for one caller; "full" shows everything."""
    from turnd.tools import rest_credential
    import time as _time
    extra = f'[log]\nclient_addresses = "{mode}"\n' if mode != "truncated" else ""
    text = config_text(extra=extra).replace("[auth]\n", '[auth]\nsecrets = ["s"]\n')
    d = Turnd(tmp_path, text)
    try:
        user, password = rest_credential("s", "web-7", 3600, _time.time())
        turn = await UdpTurn.connect(("127.0.0.1", d.port), user, password)
        await turn.allocate()
        again = await UdpTurn.connect(("127.0.0.1", d.port), user, password)
        await again.allocate()
        wrong = await UdpTurn.connect(("127.0.0.1", d.port), user, "nope")
        await wrong.call(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
        d.wait_for("refused with 401")
        d.wait_for(r"allocation created.*\n.*allocation created")
    finally:
        d.stop()
    log = d.text()
    ports = [s.sock.getsockname()[1] for s in (turn, again, wrong)]
    expiry = user.split(":")[0]
    assert expiry not in log and "user=web-7" in log and "unknown user 'web-7'" in log
    clients = re.findall(r"allocation created .*client=(\S+)", log)
    assert len(clients) == 2
    assert len(re.findall(r"allocation stopped .*to_client_bytes=", log)) == 2  # totals at stop
    if mode == "full":
        assert clients == [f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"]
    else:
        assert not any(str(p) in log for p in ports)
        if mode == "truncated":
            assert clients == ["127.0.0.0/24"] * 2
        else:  # one caller's lines can be followed: the same IP, the same hash
            assert clients[0] == clients[1] and re.fullmatch(r"h:[0-9a-f]{12}", clients[0])


@pytest.mark.parametrize("bad", [b'[server]\nrealm = "caf\xe9"\n', b"a = " + b"[" * 5000 + b"\n"])
async def test_a_reload_of_an_unreadable_file_is_refused_and_calls_go_on(tmp_path, bad):
    """A config that is not UTF-8, or nested 5,000 deep, once killed the daemon on SIGHUP."""
    d = Turnd(tmp_path, config_text())
    try:
        turn = await UdpTurn.connect(("127.0.0.1", d.port))
        relayed = await turn.allocate()
        peer = await udp_client("127.0.0.1")
        d.conf.write_bytes(bad)
        d.signal(signal.SIGHUP)
        line = d.wait_for(r".*reload refused.*").group(0)
        assert "not valid TOML" in line
        await relay_some(turn, peer, relayed, 3, 10, 3, 10)  # the call goes on
        assert d.proc.poll() is None
        out = subprocess.run([sys.executable, "-m", "turnd", "check-config", str(d.conf)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        out = subprocess.run([sys.executable, "-m", "turnd", "reload", "--pid", str(d.proc.pid)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and "not reloaded" in out.stderr  # checked before SIGHUP
    finally:
        d.stop()


def test_text_log_fields_escape_control_and_invisible_characters():
    import logging
    from turnd.logs import TextFormatter
    record = logging.LogRecord("turnd", logging.INFO, "", 0, "allocation %s", ("created",), None)
    record.fields = {"user": "eve\x1b[31m\u202eevil\nline", "n": 3}
    text = TextFormatter("turnd", journal=False).format(record)
    assert "\x1b" not in text and "\u202e" not in text and "\n" not in text
    assert "user='eve\\x1b[31m\\u202eevil\\nline' n=3" in text


def test_a_receive_buffer_capped_by_rmem_max_is_named_at_start(tmp_path):
    """The kernel grants UDP buffers up to net.core.rmem_max (208 KiB on a stock Linux):
    turnd says so, with the sysctl, instead of dropping silently at the first burst.  (Here
    it asks for more than this machine's rmem_max.)"""
    with open("/proc/sys/net/core/rmem_max") as f:
        asked = 2 * int(f.read()) + (1 << 20)
    conf = tmp_path / "turnd.toml"
    conf.write_text(config_text())
    code = ("import sys, turnd.sockets as s, turnd.server as v\n"
            f"s.SOCKET_BUFFER = v.SOCKET_BUFFER = {asked}\n"
            "from turnd.cli import main\n"
            f"sys.argv = ['turnd', 'serve', '--config', {str(conf)!r}]\n"
            "main()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "listening on udp" in line:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    text = "".join(lines)
    assert f"not the {asked >> 10} KiB asked: net.core.rmem_max caps it" in text, text
    assert "sysctl -w net.core.rmem_max=" in text
