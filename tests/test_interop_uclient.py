"""coturn's turnutils_uclient and turnutils_peer against turnd: zero lost packets."""

import re
import socket
import subprocess

import pytest
import trio

from turnd.config import (AuthConfig, Config, Endpoint, PeersConfig, RelayConfig, ServerConfig,
                           TlsConfig)
from turnd.server import serve
from turnd.tls import generate

from .interop import need

pytestmark = pytest.mark.interop

SECRET = "rest-api-secret"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s4:
        s4.bind(("127.0.0.1", 0))
        port = s4.getsockname()[1]
    return port


def interop_config(tls=None) -> Config:
    return Config(
        server=ServerConfig(listen=(Endpoint("127.0.0.1", 0), Endpoint("::1", 0)), realm="turnd.test",
                            tls_listen=(Endpoint("127.0.0.1", 0),) if tls else ()),
        tls=TlsConfig(*tls) if tls else TlsConfig(),
        auth=AuthConfig(users=(("alice", "secret"),), secrets=(SECRET,)),
        # coturn's uclient picks channel numbers from RFC 5766's 0x4000-0x7FFF
        relay=RelayConfig(ports=(42000, 42999), legacy_channel_numbers=True),
        peers=PeersConfig(allow=("127.0.0.1/32", "::1/128")))


@pytest.fixture
async def peer_port(nursery):
    tool = need("turnutils_peer")
    port = free_udp_port()
    proc = await nursery.start(lambda task_status: trio.run_process(
        [tool, "-L", "127.0.0.1", "-L", "::1", "-p", str(port)], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, task_status=task_status, check=False))
    await trio.sleep(0.3)
    yield port
    proc.terminate()


MODES = {
    "channels": [],                    # default: EVEN-PORT + RESERVATION-TOKEN, ChannelData
    "no-rtcp": ["-c"],
    "send-indications": ["-s"],
    "client-to-client": ["-y"],
    "ipv6-relay": ["-x", "-e", "::1"],
    "ipv4-relay": ["-X"],
    "dual-allocation": ["-Z"],
    "dual-allocation-ipv6-peer": ["-Z", "-e", "::1"],
    "rest-secret": ["-W", SECRET],
    "extra-requests": ["-G"],
    "dont-fragment": ["-g"],
    # TURN over TCP and TLS (RFC 8656 §3.1), relaying to the peer over UDP
    "tcp-channels": ["-t"],
    "tcp-send-indications": ["-t", "-s"],
    "tls-channels": ["-t", "-S"],
    "tls-send-indications": ["-t", "-S", "-s"],
}


@pytest.mark.parametrize("mode", list(MODES))
async def test_uclient(nursery, peer_port, mode, tmp_path):
    tool = need("turnutils_uclient")
    args = MODES[mode]
    tls = generate("localhost", str(tmp_path)) if "-S" in args else None
    running = await nursery.start(serve, interop_config(tls))
    port = (running.tls if tls else running.tcp if "-t" in args else running.udp)[0][1]
    creds = ["-u", "alice"] + ([] if "-W" in args else ["-w", "secret"])
    peer = [] if "-e" in args else ["-e", "127.0.0.1"]
    cmd = [tool, *creds, *peer, "-r", str(peer_port), "-m", "2", "-n", "30", "-l", "200",
           "-z", "5", *args, "127.0.0.1", "-p", str(port)]
    with trio.fail_after(60):
        result = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    out = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    lost = re.findall(r"Total lost packets (\d+)", out)
    sent = re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)\s*$", out, re.M)
    assert result.returncode == 0, out[-2000:]
    assert lost and lost[-1] == "0", out[-2000:]
    assert sent and int(sent[-1][0]) > 0 and sent[-1][0] == sent[-1][1], out[-2000:]
    assert running.core.stats.get("allocations_created", 0) >= 2
    if "-t" in args:  # the allocations were the streams'
        assert running.tcp_stats["connections"] >= 2
        assert running.tcp_stats["tls_connections"] >= (2 if tls else 0)
        with trio.fail_after(2):  # uclient is gone: so are its allocations
            while running.core.allocations:
                await trio.sleep(0.01)
    if mode == "client-to-client":
        assert running.stats.internal > 0
    else:
        assert running.stats.to_peer > 0 and running.stats.to_client > 0
