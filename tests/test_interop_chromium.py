"""A real browser: headless Chromium makes a relay-only WebRTC call through turnd."""

import os
import tempfile
import urllib.parse

import pytest
import trio

from turnd.config import AuthConfig, Config, Endpoint, PeersConfig, RelayConfig, ServerConfig
from turnd.server import serve

from .interop import need
from .webpage import serve_page

pytestmark = pytest.mark.interop

PAGE = os.path.join(os.path.dirname(__file__), "webrtc_page.html")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-features=WebRtcHideLocalIpsWithMdns"]


async def http_server(results: trio.MemorySendChannel, logs: list, *, task_status):
    """Serves the page and takes the page's reports (/result?..., /log?...)."""
    def on_request(path, query):
        if path == "/result":
            results.send_nowait(query)
        elif path == "/log":
            logs.append(" ".join(query))

    await serve_page(open(PAGE, "rb").read(), on_request, task_status=task_status)


@pytest.mark.parametrize("default_family", ["ipv4", "keep"])
async def test_relay_only_webrtc_call_through_turnd(nursery, default_family):
    browser = need("chromium")
    # Default peer policy: loopback is NOT allowed; the call works because both
    # peers are turnd's own relay addresses (relay to relay, delivered internally).
    config = Config(
        server=ServerConfig(listen=(Endpoint("127.0.0.1", 0),), realm="turnd.test"),
        auth=AuthConfig(users=(("cowork", "calls-pass"),)),
        relay=RelayConfig(ports=(43000, 43999), default_family=default_family),
        peers=PeersConfig())
    running = await nursery.start(serve, config)
    send, receive = trio.open_memory_channel(10)
    logs: list = []
    http_port = await nursery.start(http_server, send, logs)
    query = urllib.parse.urlencode({"turn": f"turn:127.0.0.1:{running.udp[0][1]}?transport=udp",
                                    "user": "cowork", "pass": "calls-pass"})
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, *FLAGS, f"--user-data-dir={profile}", f"http://127.0.0.1:{http_port}/?{query}"]
        async with trio.open_nursery() as inner:
            proc = await inner.start(lambda task_status: trio.run_process(
                cmd, capture_stdout=True, capture_stderr=True, check=False, task_status=task_status))
            with trio.fail_after(60):
                result = await receive.receive()
            proc.kill()
    assert result.get("ok") == ["1"], (result, logs)
    assert result["msg"] == ["hello through turnd"]
    assert set(result["types"][0].split(",")) == {"relay"}
    assert running.core.stats["allocations_created"] >= 2
    assert running.stats.internal > 0  # relay to relay, delivered inside turnd
