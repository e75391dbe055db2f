"""Real browsers: headless Chromium and Firefox ESR make relay-only WebRTC calls through
turnd (two peer connections in one page, each allowed relayed candidates only)."""

import os
import tempfile
import urllib.parse

import pytest
import trio

from turnd.config import AuthConfig, Config, Endpoint, PeersConfig, RelayConfig, ServerConfig
from turnd.server import serve

from .browsers import Child, chromium_command, firefox_command
from .interop import need
from .webpage import serve_page

pytestmark = pytest.mark.interop

PAGE = os.path.join(os.path.dirname(__file__), "webrtc_page.html")


async def relay_only_call(nursery, command, config: Config, timeout: float = 60):
    """Serve turnd and the page, run the browser on it; the page's report."""
    running = await nursery.start(serve, config)
    logs: list = []
    send, receive = trio.open_memory_channel(10)

    def on_request(path, query):
        if path == "/result":
            send.send_nowait(query)
        elif path == "/log":
            logs.append(" ".join(query))

    http_port = await nursery.start(serve_page, open(PAGE, "rb").read(), on_request)
    query = urllib.parse.urlencode({"turn": f"turn:127.0.0.1:{running.udp[0][1]}?transport=udp",
                                    "user": "cowork", "pass": "calls-pass"})
    with tempfile.TemporaryDirectory() as profile:
        cmd, env = command(f"http://127.0.0.1:{http_port}/?{query}", profile)
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


def call_config(default_family: str = "ipv4") -> Config:
    # Default peer policy: loopback is NOT allowed; the call works because both peers are
    # turnd's own relay addresses (relay to relay, delivered inside turnd).
    return Config(server=ServerConfig(listen=(Endpoint("127.0.0.1", 0),), realm="turnd.test"),
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
