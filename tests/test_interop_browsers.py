"""Real browsers: headless Chromium and Firefox ESR make relay-only WebRTC calls through
turnd (two peer connections in one page, each allowed relayed candidates only)."""

import os
import tempfile
import urllib.parse

import pytest
import trio

from turnd.config import (AuthConfig, Config, Endpoint, PeersConfig, RelayConfig, ServerConfig,
                          TlsConfig)
from turnd.server import serve
from turnd.tls import generate, spki_sha256

from .browsers import Child, chromium_command, firefox_command
from .interop import need
from .webpage import serve_page

pytestmark = pytest.mark.interop

PAGE = os.path.join(os.path.dirname(__file__), "webrtc_page.html")


def udp_url(running) -> str:
    return f"turn:127.0.0.1:{running.udp[0][1]}?transport=udp"


async def relay_only_call(nursery, command, config: Config, timeout: float = 60, url=udp_url,
                          flags=()):
    """Serve turnd and the page, run the browser on it (``url(running)``: the TURN URL it
    is given); the page's report."""
    running = await nursery.start(serve, config)
    logs: list = []
    send, receive = trio.open_memory_channel(10)

    def on_request(path, query):
        if path == "/result":
            send.send_nowait(query)
        elif path == "/log":
            logs.append(" ".join(query))

    http_port = await nursery.start(serve_page, open(PAGE, "rb").read(), on_request)
    query = urllib.parse.urlencode({"turn": url(running),
                                    "user": "cowork", "pass": "calls-pass"})
    with tempfile.TemporaryDirectory() as profile:
        cmd, env = command(f"http://127.0.0.1:{http_port}/?{query}", profile)
        cmd[1:1] = flags
        child = await Child("browser", cmd, env).start()
        try:
            with trio.fail_after(timeout):
                result = await receive.receive()
        finally:
            await child.stop()
    return running, result, logs


def candidate_types(result) -> set:
    """The types of the candidates gathered (Firefox also reports an empty end-of-candidates)."""
    return {t for t in result["types"][0].split(",") if t}


def call_config(default_family: str = "ipv4", tls=None) -> Config:
    # Default peer policy: loopback is NOT allowed; the call works because both peers are
    # turnd's own relay addresses (relay to relay, delivered inside turnd).
    return Config(server=ServerConfig(listen=(Endpoint("127.0.0.1", 0),), realm="turnd.test",
                                      tls_listen=(Endpoint("127.0.0.1", 0),) if tls else ()),
                  tls=TlsConfig(*tls) if tls else TlsConfig(),
                  auth=AuthConfig(users=(("cowork", "calls-pass"),)),
                  relay=RelayConfig(ports=(43000, 43999), default_family=default_family),
                  peers=PeersConfig())


@pytest.mark.parametrize("default_family", ["ipv4", "keep"])
async def test_chromium_relay_only_call(nursery, default_family):
    need("chromium")
    running, result, logs = await relay_only_call(nursery, chromium_command, call_config(default_family))
    assert result.get("ok") == ["1"], (result, logs)
    assert result["msg"] == ["hello through turnd"]
    assert candidate_types(result) == {"relay"}
    assert running.core.stats["allocations_created"] >= 2
    assert running.stats.internal > 0  # relay to relay, delivered inside turnd


@pytest.mark.parametrize("transport", ["tcp", "tls"])
async def test_chromium_relay_only_call_over_tcp_and_tls(nursery, tmp_path, transport):
    """Where UDP is blocked: turn:...?transport=tcp, and turns: with the test certificate
    trusted by its SPKI hash, with the default peer policy."""
    need("chromium")
    tls = generate("localhost", str(tmp_path / "tls")) if transport == "tls" else None
    if tls:
        url = lambda r: f"turns:localhost:{r.tls[0][1]}?transport=tcp"  # noqa: E731
        flags = [f"--ignore-certificate-errors-spki-list={spki_sha256(tls[0])}"]
    else:
        url = lambda r: f"turn:127.0.0.1:{r.tcp[0][1]}?transport=tcp"  # noqa: E731
        flags = []
    running, result, logs = await relay_only_call(nursery, chromium_command, call_config(tls=tls),
                                                  url=url, flags=flags)
    assert result.get("ok") == ["1"], (result, logs)
    assert result["msg"] == ["hello through turnd"]
    assert candidate_types(result) == {"relay"}
    assert running.tcp_stats["connections"] >= 2
    assert running.tcp_stats["tls_connections"] >= (2 if tls else 0)
    assert running.core.stats["allocations_created"] >= 2
    with trio.fail_after(5):  # the browser is gone: its connections, so its allocations end
        while running.core.stats.get("allocations_closed", 0) < 2:
            await trio.sleep(0.05)
    assert running.stats.internal > 0


async def test_firefox_relay_only_call_with_send_and_data_indications(nursery):
    """Firefox never binds channels: every datagram is a Send indication with FINGERPRINT,
    relayed on the fast path, and comes back to the other side as a Data indication."""
    need("firefox-esr")
    running, result, logs = await relay_only_call(nursery, firefox_command, call_config(), timeout=90)
    assert result.get("ok") == ["1"], (result, logs)
    assert result["msg"] == ["hello through turnd"]
    assert candidate_types(result) == {"relay"}
    stats = running.core.stats
    assert stats["allocations_created"] >= 2
    assert not any(k.startswith("error_") and k not in ("error_401", "error_438") for k in stats), stats
    assert all(not alloc.channels for alloc in running.core.allocations.values())
    assert running.stats.internal > 0
    # the fast path carried them: what reached the slow path is the requests and the
    # indications Firefox sends before its permissions exist, not the call
    assert running.stats.internal > running.stats.packets_slow_path
