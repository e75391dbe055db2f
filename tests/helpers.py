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
