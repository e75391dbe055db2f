"""turnd selftest: against turnd over UDP, TCP and TLS, against coturn (Debian's turnserver)
over UDP and TCP, and failing with the right reason on a wrong password, a closed port and
an untrusted certificate."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import pytest
import trio

from turnd.config import Endpoint, TlsConfig
from turnd.server import serve
from turnd.tls import generate

from .helpers import turn_config
from .interop import need


def selftest(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "turnd", "selftest", *args], capture_output=True,
                          text=True, timeout=120)


async def test_selftest_passes_against_turnd_over_udp_tcp_and_tls(nursery, tmp_path):
    import attrs
    cert = generate("localhost", str(tmp_path))
    # the default peer policy: the selftest's two allocations reach each other inside turnd
    config = attrs.evolve(turn_config(allow=(), tls_listen=(Endpoint("127.0.0.1", 0),)),
                          tls=TlsConfig(*cert))
    running = await nursery.start(serve, config)
    port, tls_port = running.udp[0][1], running.tls[0][1]
    urls = [f"turn:127.0.0.1:{port}?transport=udp", f"turn:127.0.0.1:{port}?transport=tcp",
            f"turns:localhost:{tls_port}?transport=tcp"]
    out = await trio.to_thread.run_sync(lambda: selftest(f"stun:127.0.0.1:{port}", *urls, "--user",
                                                         "alice", "--password", "alicepw", "--insecure"))
    assert out.returncode == 0, out.stdout + out.stderr
    stun, *lines = out.stdout.splitlines()
    assert re.fullmatch(rf"OK    stun:127\.0\.0\.1:{port}  sees this client as 127\.0\.0\.1:\d+, "
                        r"round trip [\d.]+ ms", stun), stun
    assert len(lines) == 3
    for url, line in zip(urls, lines):
        assert re.fullmatch(rf"OK    {re.escape(url)}  relayed 127\.0\.0\.1:\d+ in \d+ ms, "
                            r"round trip [\d.]+ ms", line), line
    assert running.stats.internal >= 6  # really relayed, both ways, on each transport
    # without --insecure the self-signed certificate is the reason
    out = await trio.to_thread.run_sync(lambda: selftest(urls[2], "--user", "alice", "--password", "alicepw"))
    assert out.returncode == 1
    assert "TLS handshake: self-signed certificate (--insecure accepts" in out.stdout
    # a wrong password: 401, and what to check
    out = await trio.to_thread.run_sync(lambda: selftest(urls[0], urls[1], "--user", "alice",
                                                         "--password", "nope"))
    assert out.returncode == 1
    for line in out.stdout.splitlines():
        assert "allocate: 401 " in line and "wrong user name or password" in line


def test_selftest_says_what_is_wrong_with_a_closed_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = selftest(f"turn:127.0.0.1:{port}?transport=udp", f"turn:127.0.0.1:{port}?transport=tcp",
                   "--user", "u", "--password", "p")
    assert out.returncode == 1
    udp, tcp = out.stdout.splitlines()
    assert "nothing listens on that UDP port" in udp
    assert f"connect over TCP: connection refused: nothing listens on TCP port {port}" in tcp
    # stun: URLs are checked with a Binding request
    out = selftest(f"stun:127.0.0.1:{port}", "--user", "u", "--password", "p")
    assert out.returncode == 1 and "nothing listens on that UDP port" in out.stdout
    out = selftest("http://example.com", "--user", "u", "--password", "p")
    assert out.returncode == 1 and "expected turn:HOST" in out.stdout


@pytest.mark.interop
def test_selftest_passes_against_coturn_over_udp_and_tcp(tmp_path):
    tool = need("turnserver")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "coturn.conf"
    conf.write_text(f"listening-ip=127.0.0.1\nlistening-port={port}\nrelay-ip=127.0.0.1\n"
                    "lt-cred-mech\nuser=alice:alicepw\nrealm=coturn.test\nallow-loopback-peers\n"
                    "no-cli\nno-tls\nno-dtls\nlog-file=stdout\nno-stdout-log\nsimple-log\n"
                    "min-port=41000\nmax-port=41999\n")
    proc = subprocess.Popen([tool, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        urls = [f"turn:127.0.0.1:{port}?transport=udp", f"turn:127.0.0.1:{port}?transport=tcp"]
        deadline = time.monotonic() + 20
        while True:  # coturn takes a moment to listen
            out = selftest(*urls, "--user", "alice", "--password", "alicepw")
            if out.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert out.returncode == 0, out.stdout + out.stderr
        assert all(line.startswith("OK ") for line in out.stdout.splitlines())
        out = selftest(urls[0], "--user", "alice", "--password", "wrong")
        assert out.returncode == 1 and "allocate: 401" in out.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("mode", ["escapes", "no-relayed-address"])
async def test_a_hostile_server_cannot_fool_or_crash_selftest(nursery, mode):
    """A server whose reason phrase holds terminal escapes (a fake "OK" on screen), or whose
    Allocate success has no XOR-RELAYED-ADDRESS: a FAIL line, printable, and the next URL is
    still checked."""
    from turnd.stun import Message, decode_untrusted, encode
    from turnd.stun import constants as sc
    from turnd.stun.attributes import ErrorCode
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    async def evil():
        while True:
            data, addr = await sock.recvfrom(4096)
            msg = decode_untrusted(data)
            if mode == "escapes":
                attrs_ = [(sc.ERROR_CODE, ErrorCode(403, "\x1b]0;pwned\x07\x1b[2J\x1b[HOK    all good\u202e"))]
                cls = sc.ERROR
            else:
                attrs_, cls = [], sc.SUCCESS
            await sock.sendto(encode(Message(msg.method, cls, msg.transaction_id, attrs_)), addr)
    nursery.start_soon(evil)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    out = await trio.to_thread.run_sync(lambda: selftest(
        f"turn:127.0.0.1:{port}?transport=udp", f"turn:127.0.0.1:{closed}?transport=udp",
        "--user", "u", "--password", "p"))
    assert out.returncode == 1
    first, second = out.stdout.splitlines()
    assert first.startswith("FAIL  ") and second.startswith("FAIL  ")
    assert all(ch.isprintable() for ch in out.stdout.replace("\n", ""))
    if mode == "escapes":
        assert "allocate: 403 \\x1b]0;pwned" in first
    else:
        assert "no XOR-RELAYED-ADDRESS" in first
