"""Shared helpers for daemon tests: configs on port 0, a tiny STUN client."""

from __future__ import annotations

import os

import trio

from turnd.config import Config, Endpoint, ServerConfig
from turnd.stun import Message, decode_untrusted, encode
from turnd.stun import constants as c


def server_config(**server) -> Config:
    server.setdefault("listen", (Endpoint("127.0.0.1", 0), Endpoint("::1", 0)))
    return Config(server=ServerConfig(**server))


def family_of(host: str):
    return trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET


async def udp_client(host: str):
    sock = trio.socket.socket(family_of(host), trio.socket.SOCK_DGRAM)
    await sock.bind((host, 0))
    return sock


async def udp_exchange(sock, data: bytes, server, timeout: float = 2.0) -> bytes | None:
    await sock.sendto(data, server)
    with trio.move_on_after(timeout):
        reply, _ = await sock.recvfrom(65536)
        return reply
    return None


def binding_request(attributes=(), *, fingerprint=False) -> tuple[Message, bytes]:
    msg = Message(c.BINDING, c.REQUEST, os.urandom(12), list(attributes))
    return msg, encode(msg, fingerprint=fingerprint)


def parse(data: bytes) -> Message:
    return decode_untrusted(data)


# --- TURN over real sockets ------------------------------------------------------

from turnd.config import AuthConfig, LimitsConfig, PeersConfig, RelayConfig  # noqa: E402

from .turn_client import TurnClient  # noqa: E402

USERS = (("alice", "alicepw"), ("bob", "bobpw"))


def turn_config(allow=("127.0.0.1/32", "::1/128"), relay=None, limits=None, **server) -> Config:
    server.setdefault("listen", (Endpoint("127.0.0.1", 0), Endpoint("::1", 0)))
    server.setdefault("realm", "turnd.test")
    return Config(server=ServerConfig(**server), auth=AuthConfig(users=USERS),
                  relay=relay or RelayConfig(ports=(40000, 40999)),
                  peers=PeersConfig(allow=tuple(allow)), limits=limits or LimitsConfig())


class TurnCalls:
    """Requests and answers (a 401 or 438 teaches the realm and nonce, then once more),
    over ``_send`` and ``_next`` of a transport."""

    async def call(self, method, attributes=()) -> Message:
        for _ in range(2):
            msg, data = self.client.request(method, attributes)
            await self._send(data)
            while True:
                reply = await self._next()
                if reply[0] < 0x40:
                    resp = self.client.learn(reply)
                    if resp.transaction_id == msg.transaction_id:
                        break
            err = resp.get(c.ERROR_CODE)
            if err is None or err.code not in (401, 438):
                return resp
        return resp

    async def allocate(self, extra=()) -> tuple:
        resp = await self.call(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17), *extra])
        assert resp.cls == c.SUCCESS, resp
        return resp.get(c.XOR_RELAYED_ADDRESS)

    async def permit(self, *peers):
        resp = await self.call(c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, p) for p in peers])
        assert resp.cls == c.SUCCESS, resp

    async def bind(self, number, peer):
        resp = await self.call(c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, number), (c.XOR_PEER_ADDRESS, peer)])
        assert resp.cls == c.SUCCESS, resp


class UdpTurn(TurnCalls):
    """A TURN client over a real UDP socket."""

    def __init__(self, sock, server, client: TurnClient):
        self.sock, self.server, self.client = sock, server, client

    @classmethod
    async def connect(cls, server, user="alice", password="alicepw", host=None):
        sock = await udp_client(host or server[0])
        return cls(sock, server, TurnClient(user, password))

    async def _send(self, data: bytes) -> None:
        await self.sock.sendto(data, self.server)

    async def _next(self) -> bytes:
        return (await self.sock.recvfrom(65536))[0]

    async def recv(self, timeout=2.0) -> bytes | None:
        with trio.move_on_after(timeout):
            data, _ = await self.sock.recvfrom(65536)
            return data
        return None


async def relay_some(turn: "UdpTurn", peer, relayed, up: int, up_size: int, down: int,
                     down_size: int, number: int = 0x4001) -> None:
    """Bind channel ``number`` to ``peer``; relay ``up`` datagrams of ``up_size`` bytes to it
    and ``down`` of ``down_size`` back, each waited for."""
    from .turn_client import channel_data
    await turn.bind(number, peer.getsockname())
    for _ in range(up):
        await turn.sock.sendto(channel_data(number, b"x" * up_size), turn.server)
        await peer.recvfrom(65536)
    for _ in range(down):
        await peer.sendto(b"y" * down_size, relayed)
        await turn.recv()


def http_status(url: str, method: str = "GET", **headers) -> int:
    """The status of one HTTP request (blocking: call it through trio.to_thread)."""
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url, method=method, headers=headers,
                                 data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def recv_or_none(sock, timeout=0.3):
    with trio.move_on_after(timeout):
        return await sock.recvfrom(65536)
    return None


class StreamTurn(TurnCalls):
    """A TURN client over a real TCP or TLS stream (frames read with turnd's StreamFramer,
    which is tested on its own)."""

    def __init__(self, stream, client: TurnClient):
        from turnd.stun.framing import StreamFramer
        self.stream, self.client = stream, client
        self.framer = StreamFramer(0x80)

    @classmethod
    async def connect(cls, server, user="alice", password="alicepw", *, tls_ca: str | None = None,
                      prefix: bytes = b""):
        """``tls_ca``: the PEM the server's certificate must chain to (TLS); ``prefix``: bytes
        sent first (a PROXY header)."""
        import ssl
        stream = await trio.open_tcp_stream(*server)
        if prefix:
            await stream.send_all(prefix)
        if tls_ca is not None:
            ctx = ssl.create_default_context(cafile=tls_ca)
            ctx.check_hostname = False
            stream = trio.SSLStream(stream, ctx, server_hostname="localhost")
            await stream.do_handshake()
        return cls(stream, TurnClient(user, password))

    async def frame(self, timeout: float = 2.0) -> bytes | None:
        """The next frame from the server; None after ``timeout`` or at the end of the stream."""
        with trio.move_on_after(timeout):
            while True:
                frame = self.framer.next_frame_untrusted()
                if frame is not None:
                    return frame
                data = await self.stream.receive_some(65536)
                if not data:
                    return None
                self.framer.feed(data)
        return None

    async def _send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _next(self) -> bytes:
        reply = await self.frame()
        assert reply is not None, "no answer"
        return reply

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await self.stream.aclose()


def mass_allocate(running, n: int) -> int:
    """``n`` allocations made through the running daemon's core and shell, as if ``n``
    clients on 10.x.y.z had each allocated over UDP (their answers go nowhere).  Each holds a
    real relay socket: fewer when the open-files limit can't take ``n``.  Returns how many."""
    import resource
    import socket

    from turnd.server import UdpOrigin
    from turnd.turn.protocol import FiveTuple, Reply
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    n = min(n, hard - 1000)
    shell, core = running.shell, running.core
    # the daemon's own IPv4 listen socket (the engine knows its clients by it)
    out = next(h[1] for h in shell.engine.handlers.values()
               if h[0] and h[1].family == socket.AF_INET)  # (h[0]: a listener's handler)
    made = 0
    for i in range(n):
        addr = (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 40000)
        ft = FiveTuple("udp", addr, running.udp[0])
        client = TurnClient("alice", "alicepw")
        for _ in range(2):
            _, data = client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
            actions = core.handle_untrusted(data, ft, shell.now())
            shell.execute(actions, UdpOrigin(shell, out, addr))
            reply = next(a.data for a in actions if isinstance(a, Reply))
            if client.learn(reply).cls == c.SUCCESS:
                made += 1
                break
    return made
