#!/usr/bin/env python3
"""Capture what real TURN clients send, as a seed corpus for coverage-guided fuzzing.

    .venv/bin/python tests/fuzz/capture.py [--out tests/corpus/clients] [--only STEP ...]

Starts turnd in-process on loopback and puts a small capturing proxy (UDP and TCP on one
port) between each real client and turnd; every datagram / byte chunk the *client* sends
towards the server is recorded.  Then runs, one after another and each under a timeout:

* headless Chromium: a relay-only data-channel call through ``turn:...?transport=udp``
  (tests/webrtc_page.html, the flags of tests/test_interop_chromium.py), and one attempt
  with ``?transport=tcp`` (turnd answers TURN over TCP with 400 for now: only the first
  messages of the stream are captured);
* headless Firefox ESR: the same call over UDP (Send indications, FINGERPRINT everywhere);
* coturn's turnutils_uclient in several modes, with turnutils_peer as the echo peer.

Writes each distinct client->server message to ``OUT/<client>-<transport>-<NNN>.bin``
(UDP: one datagram per file; TCP: the whole client->server byte stream of one connection
per file), deduplicated and thinned to at most --max-files per client+transport, preferring
variety.  Files of a client+transport that captured nothing this time are left alone.

Every process it starts runs in its own process group and is killed with its group;
the whole run is bounded by --timeout.
"""

from __future__ import annotations

import argparse
import collections
import errno
import logging
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import time
import urllib.parse

import trio

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from turnd.config import (AuthConfig, Config, Endpoint, PeersConfig,  # noqa: E402
                          RelayConfig, ServerConfig)
from turnd.server import serve  # noqa: E402
from tests.webpage import serve_page  # noqa: E402
from tests.browsers import Child, chromium_command, firefox_command  # noqa: E402

PAGE = os.path.join(ROOT, "tests", "webrtc_page.html")
USER, PASSWORD, SECRET = "alice", "secret", "rest-api-secret"
# turnutils_uclient modes: (name, extra arguments).  "-t" fails at Allocate (TURN over TCP
# is not served yet); its first messages are what we want.
UCLIENT_MODES = [
    ("channels", []),                  # EVEN-PORT (R bit), RESERVATION-TOKEN, ChannelData
    ("send-indications", ["-s"]),
    ("client-to-client", ["-y"]),
    ("dual-allocation", ["-Z"]),       # ADDITIONAL-ADDRESS-FAMILY
    ("ipv6-relay", ["-x", "-e", "::1"]),  # REQUESTED-ADDRESS-FAMILY
    ("dont-fragment", ["-g"]),
    ("rest-secret", ["-W", SECRET]),
    ("extra-requests", ["-G"]),
    ("padded-channels", ["-D"]),       # ChannelData padded to 4 bytes over UDP
    ("origin", ["-o", "https://origin.turnd.test"]),  # ORIGIN, comprehension-optional
    ("tcp", ["-t"]),
]

log = logging.getLogger("capture")


# --------------------------------------------------------------------------- messages

METHODS = {0x001: "Binding", 0x003: "Allocate", 0x004: "Refresh", 0x006: "Send", 0x007: "Data",
           0x008: "CreatePermission", 0x009: "ChannelBind", 0x00A: "Connect",
           0x00B: "ConnectionBind", 0x00C: "ConnectionAttempt"}
CLASSES = {0: "request", 1: "indication", 2: "success", 3: "error"}
COOKIE = b"\x21\x12\xa4\x42"
FINGERPRINT, DATA, LIFETIME, USERNAME = 0x8028, 0x0013, 0x000D, 0x0006


def payload_kind(data: bytes) -> str:
    """What a relayed payload looks like (RFC 7983 demultiplexing)."""
    if not data:
        return "empty"
    b = data[0]
    if b < 4:
        return "stun" if data[4:8] == COOKIE else "bytes"
    if 20 <= b < 64:
        return "dtls"
    if 128 <= b < 192:
        return "rtp"
    return "bytes"


def describe(msg: bytes) -> dict:
    """Kind, label and a 'shape' for one STUN message or ChannelData frame."""
    if len(msg) >= 20 and msg[0] < 0x40 and msg[4:8] == COOKIE:
        t, length = struct.unpack_from("!HH", msg)
        method = (t & 0xF) | ((t >> 1) & 0x70) | ((t >> 2) & 0xF80)
        cls = ((t >> 4) & 1) | ((t >> 7) & 2)
        attrs, extra, pos, end = [], [], 20, min(len(msg), 20 + length)
        while pos + 4 <= end:
            at, al = struct.unpack_from("!HH", msg, pos)
            value = msg[pos + 4:pos + 4 + al]
            attrs.append(at)
            if at == DATA:
                extra.append(payload_kind(value))
            elif at == LIFETIME and value == bytes(4):
                extra.append("lifetime 0")
            elif at == USERNAME and re.match(rb"\d+:", value):
                extra.append("REST username")
            pos += 4 + al + (-al % 4)
        label = f"{METHODS.get(method, hex(method))} {CLASSES[cls]}"
        fp = FINGERPRINT in attrs
        return {"kind": "stun", "label": label, "fingerprint": fp,
                "shape": ("stun", method, cls, tuple(attrs), tuple(extra))}
    if len(msg) >= 4 and 0x40 <= msg[0] < 0x80:
        channel, length = struct.unpack_from("!HH", msg)
        body = msg[4:4 + length]
        padded = len(msg) > 4 + length
        # one shape per payload kind, size class and padding: a handful, not every frame
        size = "tiny" if length < 32 else "small" if length < 256 else "large"
        return {"kind": "channeldata", "label": "ChannelData", "fingerprint": False,
                "shape": ("channeldata", payload_kind(body), size, padded,
                          "legacy" if channel >= 0x5000 else "rfc8656")}
    return {"kind": "other", "label": "other", "fingerprint": False,
            "shape": ("other", msg[:1], len(msg) // 256)}


def split_stream(data: bytes) -> tuple[list[bytes], int]:
    """Frames in a client->server TCP stream (ChannelData padded); trailing bytes left over."""
    frames, pos = [], 0
    while pos + 4 <= len(data):
        first = data[pos]
        length = struct.unpack_from("!H", data, pos + 2)[0]
        if first < 0x40:
            take = total = 20 + length
        elif first < 0x80:
            total = 4 + length
            take = total + (-total % 4)
        else:
            break
        if pos + total > len(data):
            break
        frames.append(data[pos:pos + total])
        pos += take
    return frames, len(data) - min(pos, len(data))


def labels(msg: bytes) -> list[str]:
    d = describe(msg)
    if d["kind"] == "stun":
        return [d["label"] + (" +FINGERPRINT" if d["fingerprint"] else "")]
    return [d["label"]]


# --------------------------------------------------------------------------- selection

def select_datagrams(messages: list[bytes], limit: int) -> list[bytes]:
    """Dedupe, then keep up to ``limit`` preferring variety: first the first message of every
    method/class (and ChannelData), then one of every other shape (attribute list, payload
    kind, ...) taken round-robin over the methods/classes, then second copies of STUN shapes.
    ChannelData is kept to a handful whatever its shapes."""
    unique = list(dict.fromkeys(messages))
    by_shape: dict = {}
    for i, msg in enumerate(unique):
        by_shape.setdefault(describe(msg)["shape"], []).append(i)
    shapes_in_category: collections.Counter = collections.Counter()
    ranked = []
    for shape, indexes in by_shape.items():  # in order of first appearance
        category = shape[:3] if shape[0] == "stun" else shape[:1]
        nth_shape = shapes_in_category[category]
        shapes_in_category[category] += 1
        ranked.append((0 if nth_shape == 0 else 1, nth_shape, indexes[0]))
        if shape[0] == "stun" and len(indexes) > 1:
            ranked.append((2, nth_shape, indexes[1]))
    keep, channeldata = [], 0
    for _, _, i in sorted(ranked):
        if describe(unique[i])["kind"] == "channeldata":
            if channeldata >= 6:
                continue
            channeldata += 1
        keep.append(i)
        if len(keep) >= limit:
            break
    return [unique[i] for i in sorted(keep)]


def select_streams(streams: list[bytes], limit: int) -> list[bytes]:
    """Dedupe non-empty streams; prefer distinct sequences of message types."""
    unique = [s for s in dict.fromkeys(streams) if s]
    first, rest, seen = [], [], set()
    for s in unique:
        key = tuple(describe(f)["shape"][:3] for f in split_stream(s)[0])
        (rest if key in seen else first).append(s)
        seen.add(key)
    chosen = set(map(id, (first + rest)[:limit]))
    return [s for s in unique if id(s) in chosen]


# --------------------------------------------------------------------------- proxy

class Capture:
    def __init__(self) -> None:
        self.datagrams: dict[tuple, list[bytes]] = collections.defaultdict(list)
        self.streams: dict[tuple, list[bytes]] = collections.defaultdict(list)


async def udp_proxy(listen: trio.socket.SocketType, upstream: tuple, record, *, task_status):
    """Forward datagrams from each client address through its own upstream socket."""
    upstreams: dict = {}

    async def back(up, client):
        while True:
            try:
                data = await up.recv(65535)
                await listen.sendto(data, client)
            except OSError:  # ECONNREFUSED on a connected UDP socket and the like
                await trio.sleep(0.01)

    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                data, client = await listen.recvfrom(65535)
                record(data)
                up = upstreams.get(client)
                if up is None:
                    if len(upstreams) >= 256:
                        continue
                    up = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    await up.bind(("127.0.0.1", 0))
                    await up.connect(upstream)
                    upstreams[client] = up
                    nursery.start_soon(back, up, client)
                try:
                    await up.send(data)
                except OSError:
                    pass
    finally:
        for up in upstreams.values():
            up.close()


async def tcp_proxy(listener: trio.SocketListener, upstream: tuple, record, *, task_status):
    """Pipe each connection both ways; record the client's bytes of each connection."""

    async def handle(client: trio.SocketStream):
        chunks: list[bytes] = []
        try:
            async with client:
                try:
                    server = await trio.open_tcp_stream(*upstream)
                except OSError:
                    return
                async with server, trio.open_nursery() as pipes:
                    async def up():
                        try:
                            while data := await client.receive_some(65536):
                                chunks.append(data)
                                await server.send_all(data)
                            await server.send_eof()
                        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                            pipes.cancel_scope.cancel()

                    async def down():
                        try:
                            while data := await server.receive_some(65536):
                                await client.send_all(data)
                        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                            pass
                        pipes.cancel_scope.cancel()

                    pipes.start_soon(up)
                    pipes.start_soon(down)
        finally:
            record(b"".join(chunks))

    task_status.started()
    await trio.serve_listeners(handle, [listener])


async def open_proxy_sockets():
    """A UDP socket and a TCP listener on the same loopback port."""
    for _ in range(50):
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        tcp = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            await tcp.bind(("127.0.0.1", port))
        except OSError as exc:
            udp.close()
            tcp.close()
            if exc.errno == errno.EADDRINUSE:
                continue
            raise
        tcp.listen(64)
        return udp, trio.SocketListener(tcp), port
    raise RuntimeError("no loopback port free for both UDP and TCP")


class Proxy:
    """``async with Proxy(...) as port``: proxies the client's traffic to turnd while open."""

    def __init__(self, nursery, running, capture: Capture, client: str):
        self.nursery, self.running, self.capture, self.client = nursery, running, capture, client

    async def __aenter__(self) -> int:
        udp, listener, port = await open_proxy_sockets()
        self.scope, self.done = trio.CancelScope(), trio.Event()
        turn_udp = next(a for a in self.running.udp if ":" not in a[0])
        turn_tcp = next(a for a in self.running.tcp if ":" not in a[0])
        dgrams = self.capture.datagrams[(self.client, "udp")]
        streams = self.capture.streams[(self.client, "tcp")]

        async def both(task_status):
            try:
                with self.scope:
                    async with trio.open_nursery() as n:
                        await n.start(udp_proxy, udp, turn_udp, dgrams.append)
                        await n.start(tcp_proxy, listener, turn_tcp, streams.append)
                        task_status.started()
            finally:
                udp.close()
                listener.socket.close()
                self.done.set()

        await self.nursery.start(both)
        return port

    async def __aexit__(self, *exc):
        try:
            await trio.sleep(0.2)  # the last replies
        finally:
            self.scope.cancel()
        await self.done.wait()


# --------------------------------------------------------------------------- processes

# --------------------------------------------------------------------------- browsers

# Put in front of the page's script: remember the peer connections and data channels; once
# the first message arrived, send a few more of other sizes, close the connections (TURN
# clients then release their allocations) and report /closed.
INJECT = b"""<script>
(() => {
  const pcs = [], channels = [];
  const Orig = window.RTCPeerConnection;
  window.RTCPeerConnection = function (...args) {
    const pc = new Orig(...args);
    pcs.push(pc);
    const create = pc.createDataChannel.bind(pc);
    pc.createDataChannel = (...a) => { const ch = create(...a); channels.push(ch); return ch; };
    return pc;
  };
  window.RTCPeerConnection.prototype = Orig.prototype;
  const realFetch = window.fetch.bind(window);
  let closing = false;
  window.fetch = (url, ...rest) => {
    if (!closing && String(url).startsWith('/result')) {
      closing = true;
      for (const n of [1, 3, 150, 1100]) { try { channels.forEach((ch) => ch.send('x'.repeat(n))); } catch (e) {} }
      setTimeout(() => {
        pcs.forEach((pc) => pc.close());
        setTimeout(() => realFetch('/closed').catch(() => {}), 2000);
      }, HOLD_MS);
    }
    return realFetch(url, ...rest);
  };
})();
</script>
"""


class Pages:
    """A local HTTP server for the page; /result and /closed reports go to ``events``."""

    def __init__(self, hold_ms: int):
        page = open(PAGE, "rb").read()
        inject = INJECT.replace(b"HOLD_MS", str(hold_ms).encode())
        self.page = page.replace(b"<script>", inject + b"<script>", 1) if b"<script>" in page else page
        self.events = None

    def expect(self):
        send, receive = trio.open_memory_channel(16)
        self.events = send
        return receive

    async def serve(self, *, task_status):
        def on_request(path, query):
            if path in ("/result", "/closed") and self.events is not None:
                try:
                    self.events.send_nowait((path, query))
                except trio.WouldBlock:
                    pass

        await serve_page(self.page, on_request, task_status=task_status)


async def browser_call(name: str, cmd: list[str], env: dict, pages: Pages, expect_call: bool,
                       call_timeout: float) -> str:
    """Run one browser on the page; returns a status line."""
    events = pages.expect()
    child = await Child(name, cmd, env).start()
    status = "no result"
    try:
        with trio.move_on_after(call_timeout):
            async for path, query in events:
                if path == "/result":
                    if query.get("ok") == ["1"]:
                        status = f"call ok ({query.get('types', ['?'])[0]} candidates)"
                        break
                    status = f"call failed: {query.get('msg')}"
                    return status
        if status.startswith("call ok"):
            with trio.move_on_after(20):
                async for path, _ in events:
                    if path == "/closed":
                        status += ", closed cleanly"
                        break
            await trio.sleep(1.0)  # Refresh(LIFETIME 0) and its retransmissions
        elif not expect_call:
            status = "no call (expected)"
        return status
    finally:
        pages.events = None
        await child.stop()


async def run_chromium(nursery, running, capture, pages, http_port, transport, tmp) -> str:
    async with Proxy(nursery, running, capture, "chromium") as port:
        query = urllib.parse.urlencode({"turn": f"turn:127.0.0.1:{port}?transport={transport}",
                                        "user": USER, "pass": PASSWORD})
        found = chromium_command(f"http://127.0.0.1:{http_port}/?{query}",
                                 tempfile.mkdtemp(prefix="chromium-", dir=tmp))
        if found is None:
            return "skipped: chromium not installed"
        return await browser_call("chromium", *found, pages, transport == "udp",
                                  45 if transport == "udp" else 12)


async def run_firefox(nursery, running, capture, pages, http_port, transport, tmp) -> str:
    async with Proxy(nursery, running, capture, "firefox") as port:
        query = urllib.parse.urlencode({"turn": f"turn:127.0.0.1:{port}?transport={transport}",
                                        "user": USER, "pass": PASSWORD})
        found = firefox_command(f"http://127.0.0.1:{http_port}/?{query}",
                                tempfile.mkdtemp(prefix="firefox-", dir=tmp))
        if found is None:
            return "skipped: firefox-esr not installed"
        return await browser_call("firefox", *found, pages, transport == "udp",
                                  60 if transport == "udp" else 15)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run_uclient(nursery, running, capture, peer_port, mode, args) -> str:
    tool = shutil.which("turnutils_uclient")
    if not tool:
        return "skipped: turnutils_uclient not installed"
    creds = ["-u", USER] + ([] if "-W" in args else ["-w", PASSWORD])
    peer = [] if "-e" in args else ["-e", "127.0.0.1"]
    async with Proxy(nursery, running, capture, "uclient") as port:
        # -l 170: not a multiple of 4, so -D (padded ChannelData) differs from the default
        cmd = [tool, *creds, *peer, "-r", str(peer_port), "-m", "2", "-n", "20", "-l", "170",
               "-z", "5", *args, "127.0.0.1", "-p", str(port)]
        child = await Child(f"uclient {mode}", cmd).start()
        rc = await child.wait(30)
        out = child.text()
    lost = re.findall(r"Total lost packets \d+ \([^)]*\)", out)
    if rc is None:
        return "timed out (stopped)"
    return f"exit {rc}" + (f", {lost[-1]}" if lost else "")


# --------------------------------------------------------------------------- main

def turnd_config() -> Config:
    return Config(
        server=ServerConfig(listen=(Endpoint("127.0.0.1", 0), Endpoint("::1", 0)), realm="turnd.test"),
        auth=AuthConfig(users=((USER, PASSWORD),), secrets=(SECRET,)),
        # coturn's uclient picks channel numbers from RFC 5766's 0x4000-0x7FFF
        relay=RelayConfig(ports=(45000, 45999), legacy_channel_numbers=True),
        peers=PeersConfig(allow=("127.0.0.1/32", "::1/128")))


STEPS = ["chromium-udp", "chromium-tcp", "firefox-udp", "firefox-tcp", "uclient"]


async def capture_all(steps: list[str], hold_ms: int) -> tuple[Capture, list]:
    capture, statuses = Capture(), []
    with tempfile.TemporaryDirectory(prefix="turnd-capture-") as tmp:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(serve, turnd_config())
            pages = Pages(hold_ms)
            http_port = await nursery.start(pages.serve)
            for step in steps:
                t0 = time.monotonic()
                if step.startswith(("chromium", "firefox")):
                    client, transport = step.split("-")
                    run = run_chromium if client == "chromium" else run_firefox
                    status = await run(nursery, running, capture, pages, http_port, transport, tmp)
                    statuses.append((step, status, time.monotonic() - t0))
                elif step == "uclient":
                    tool = shutil.which("turnutils_peer")
                    if not tool:
                        statuses.append((step, "skipped: turnutils_peer not installed", 0))
                        continue
                    peer_port = free_udp_port()
                    peer = await Child("turnutils_peer", [tool, "-L", "127.0.0.1", "-L", "::1",
                                                          "-p", str(peer_port)]).start()
                    try:
                        await trio.sleep(0.3)
                        for mode, args in UCLIENT_MODES:
                            t0 = time.monotonic()
                            status = await run_uclient(nursery, running, capture, peer_port, mode, args)
                            statuses.append((f"uclient {mode} ({' '.join(args) or 'default'})",
                                             status, time.monotonic() - t0))
                            print(f"  {statuses[-1][0]}: {status}", flush=True)
                    finally:
                        await peer.stop()
                    continue
                print(f"  {statuses[-1][0]}: {statuses[-1][1]} [{statuses[-1][2]:.1f}s]", flush=True)
            nursery.cancel_scope.cancel()
    return capture, statuses


def write_corpus(capture: Capture, out: str, limit: int) -> dict:
    os.makedirs(out, exist_ok=True)
    written: dict = {}
    groups = [(k, "udp", v) for k, v in capture.datagrams.items()] + \
             [(k, "tcp", v) for k, v in capture.streams.items()]
    for (client, transport), kind, items in sorted(groups, key=lambda g: g[0]):
        items = [i for i in items if i]
        if not items:
            continue
        chosen = select_datagrams(items, limit) if kind == "udp" else select_streams(items, limit)
        prefix = f"{client}-{transport}-"
        for name in os.listdir(out):  # replace this group's files, keep the others
            if name.startswith(prefix) and name.endswith(".bin"):
                os.remove(os.path.join(out, name))
        for n, data in enumerate(chosen):
            with open(os.path.join(out, f"{prefix}{n:03d}.bin"), "wb") as f:
                f.write(data)
        written[(client, transport)] = (len(items), chosen)
    return written


def summarize(written: dict, statuses: list, out: str) -> None:
    print("\nRuns:")
    for step, status, seconds in statuses:
        print(f"  {step:48s} {status} [{seconds:.1f}s]")
    print(f"\nCorpus in {out}:")
    for (client, transport), (captured, chosen) in sorted(written.items()):
        types: collections.Counter = collections.Counter()
        leftovers = 0
        for data in chosen:
            if transport == "tcp":
                frames, rest = split_stream(data)
                leftovers += bool(rest)
            else:
                frames = [data]
            for frame in frames:
                types.update(labels(frame))
        unit = "connections" if transport == "tcp" else "datagrams"
        print(f"  {client}-{transport}: {len(chosen)} files (from {captured} {unit} captured)")
        for label, count in sorted(types.items()):
            print(f"      {count:4d}  {label}")
        if leftovers:
            print(f"      ({leftovers} streams end in a partial frame)")
    if not written:
        print("  nothing captured")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "tests", "corpus", "clients"))
    parser.add_argument("--only", nargs="+", choices=STEPS, default=STEPS,
                        help="run only these steps (default: all)")
    parser.add_argument("--max-files", type=int, default=40, help="per client+transport")
    parser.add_argument("--hold", type=float, default=6.0,
                        help="seconds a browser call stays up before it is closed")
    parser.add_argument("--timeout", type=float, default=240, help="for the whole run")
    opts = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s")

    async def bounded():
        with trio.move_on_after(opts.timeout) as scope:
            result = await capture_all(opts.only, int(opts.hold * 1000))
        if scope.cancelled_caught:
            print(f"whole run timed out after {opts.timeout:.0f}s: nothing written", file=sys.stderr)
            return None
        return result

    print("Capturing (each client under its own timeout):", flush=True)
    result = trio.run(bounded)
    if result is None:
        return 1
    capture, statuses = result
    written = write_corpus(capture, opts.out, opts.max_files)
    summarize(written, statuses, opts.out)
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
