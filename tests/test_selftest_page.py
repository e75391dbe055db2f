"""The self-test page turnd serves on its TCP and TLS ports: headless Chromium opens it,
runs it unattended and reports every transport and the call; plain HTTP gets the caps of any
unauthenticated input; TURN and STUN on the same ports go on working."""

from __future__ import annotations

import json
import socket
import tempfile

import attrs
import pytest
import trio

from turnd.config import (AuthConfig, Config, Endpoint, LimitsConfig, PeersConfig, RelayConfig,
                          SelftestConfig, ServerConfig, TlsConfig)
from turnd.server import serve
from turnd.stun import constants as c
from turnd.tls import generate, spki_sha256

from .browsers import Child, chromium_command
from .helpers import StreamTurn, turn_config
from .interop import need
from .webpage import serve_page


def page_config(cert) -> Config:
    # the default peer policy: the page's relay-only call is relay to relay inside turnd
    return Config(server=ServerConfig(listen=(Endpoint("127.0.0.1", 0),), realm="turnd.test",
                                      tls_listen=(Endpoint("127.0.0.1", 0),)),
                  tls=TlsConfig(*cert), auth=AuthConfig(users=(("cowork", "calls-pass"),)),
                  relay=RelayConfig(ports=(43000, 43999)), peers=PeersConfig())


async def run_page(nursery, url_of, cert, password="calls-pass", timeout=60) -> tuple:
    running = await nursery.start(serve, page_config(cert))
    reports: trio.MemoryReceiveChannel
    send, reports = trio.open_memory_channel(10)

    def on_request(path, query):
        if path == "/report":
            send.send_nowait(json.loads(query["body"][0]))
    report_port = await nursery.start(serve_page, b"", on_request)
    url = url_of(running) + (f"#user=cowork&password={password}&run"
                             f"&report=http://127.0.0.1:{report_port}/report")
    with tempfile.TemporaryDirectory() as profile:
        cmd, env = chromium_command(url, profile)
        cmd[1:1] = [f"--ignore-certificate-errors-spki-list={spki_sha256(cert[0])}"]
        child = await Child("chromium", cmd, env).start()
        try:
            with trio.fail_after(timeout):
                result = await reports.receive()
        finally:
            await child.stop()
    return running, result


@pytest.mark.interop
@pytest.mark.parametrize("over", ["tcp", "tls"])
async def test_chromium_runs_the_page_unattended_and_every_transport_passes(nursery, tmp_path, over):
    need("chromium")
    cert = generate("localhost", str(tmp_path))
    url_of = (lambda r: f"http://127.0.0.1:{r.tcp[0][1]}/") if over == "tcp" else \
        (lambda r: f"https://localhost:{r.tls[0][1]}/")
    running, result = await run_page(nursery, url_of, cert)
    for kind in ("udp", "tcp", "tls", "call"):
        assert result[kind]["ok"] is True, result
    assert result["udp"]["relay"].startswith("127.0.0.1:")
    assert result["call"]["rtt_ms"] >= 0
    assert set(result["call"]["by_transport"]) == {"udp", "tcp", "tls"}  # a call over each
    assert running.tcp_stats["http_requests"] >= 1
    assert running.core.stats["allocations_created"] >= 5  # one per URL, and the call's


@pytest.mark.interop
async def test_a_wrong_password_reports_401_for_each_transport(nursery, tmp_path):
    need("chromium")
    cert = generate("localhost", str(tmp_path))
    _, result = await run_page(nursery, lambda r: f"http://127.0.0.1:{r.tcp[0][1]}/", cert,
                               password="wrong")
    for kind in ("udp", "tcp", "tls"):
        assert result[kind]["ok"] is False and result[kind]["code"] == 401, result
        assert "wrong user name or password" in result[kind]["hint"]
    assert result["call"]["ok"] is False


# --- HTTP on the TURN ports, with no browser ---------------------------------------------

async def http(addr, request: bytes, tls_ca=None) -> bytes:
    stream = await trio.open_tcp_stream(*addr)
    if tls_ca:
        import ssl
        ctx = ssl.create_default_context(cafile=tls_ca)
        ctx.check_hostname = False
        stream = trio.SSLStream(stream, ctx, server_hostname="localhost")
    await stream.send_all(request)
    out = b""
    with trio.fail_after(10):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            out += data
    return out


async def test_the_page_is_self_contained_with_a_strict_policy_and_the_server_s_urls(nursery, tmp_path):
    cert = generate("localhost", str(tmp_path))
    running = await nursery.start(serve, page_config(cert))
    port, tls_port = running.tcp[0][1], running.tls[0][1]
    for addr, ca in ((running.tcp[0], None), (running.tls[0], cert[0])):
        out = await http(addr, b"GET / HTTP/1.1\r\nHost: turn.example.com:3478\r\n\r\n", ca)
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        csp = next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-security-policy"))
        assert b"default-src 'none'" in csp and b"'unsafe-inline'" not in csp
        assert b"http://" not in body.replace(b"http://127.0.0.1", b"") and b"https://" not in body
        assert b"<script src" not in body and b"<link" not in body  # nothing from elsewhere
        config = json.loads(body.split(b'id="config">')[1].split(b"</script>")[0])
        assert config["urls"] == {"udp": f"turn:turn.example.com:{port}?transport=udp",
                                  "tcp": f"turn:turn.example.com:{port}?transport=tcp",
                                  "tls": f"turns:turn.example.com:{tls_port}?transport=tcp"}
    # a Host that is not a plain name can't inject anything: the address reached is used
    out = await http(running.tcp[0], b'GET / HTTP/1.1\r\nHost: "></script><script>alert(1)//\r\n\r\n')
    assert b"alert(1)" not in out and b"turn:127.0.0.1:" in out
    assert (await http(running.tcp[0], b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")).startswith(b"HTTP/1.1 404 ")
    assert (await http(running.tcp[0], b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
            ).startswith(b"HTTP/1.1 405 ")
    head = await http(running.tcp[0], b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")


async def test_selftest_disabled_closes_http_like_any_non_stun(nursery):
    config = attrs.evolve(turn_config(), selftest=SelftestConfig(enabled=False))
    running = await nursery.start(serve, config)
    assert await http(running.tcp[0], b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == b""
    assert running.tcp_stats["http_requests"] == 0


async def test_http_requests_get_the_caps_of_any_unauthenticated_input(nursery):
    """A huge request, one that never ends, and a flood of them: each is cut, and TURN and
    STUN on the same port go on."""
    limits = LimitsConfig(tcp_first_message_timeout=2)
    running = await nursery.start(serve, turn_config(limits=limits))
    with trio.fail_after(20):
        big = await http(running.tcp[0], b"GET / HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n")
        assert not big.startswith(b"HTTP/1.1 200")  # over 8 KiB of request: no page
        start = trio.current_time()
        slow = await trio.open_tcp_stream(*running.tcp[0])
        await slow.send_all(b"GET / HTTP/1.1\r\n")
        for _ in range(20):  # a header line now and then: cut at the first-message deadline
            try:
                await slow.send_all(b"X: y\r\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
            await trio.sleep(0.2)
        assert trio.current_time() - start < 4
        turn = await StreamTurn.connect(running.tcp[0])
        assert (await turn.call(c.BINDING)).cls == c.SUCCESS
        await turn.allocate()
    assert running.tcp_stats["closed_idle"] >= 1
