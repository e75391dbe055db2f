"""A small TURN client for tests: builds authenticated requests, learns realm/nonce.

Sans-I/O like the server: it makes bytes and reads bytes, so the same client
drives the core in memory and the daemon over real sockets.
"""

from __future__ import annotations

import os

from turnd.stun import Message, decode_untrusted, encode, long_term_key
from turnd.stun import constants as c


class TurnClient:
    def __init__(self, username: str, password: str, *, integrity: str = "sha1",
                 fingerprint: bool = False):
        self.username = username
        self.password = password
        self.integrity = integrity
        self.fingerprint = fingerprint
        self.realm: str | None = None
        self.nonce: str | None = None

    @property
    def key(self) -> bytes:
        return long_term_key(self.username, self.realm, self.password)

    def request(self, method: int, attributes=(), *, tid: bytes | None = None,
                auth: bool = True) -> tuple[Message, bytes]:
        attrs = list(attributes)
        if auth and self.nonce is not None:
            attrs += [(c.USERNAME, self.username), (c.REALM, self.realm), (c.NONCE, self.nonce)]
        msg = Message(method, c.REQUEST, tid or os.urandom(12), attrs)
        key = self.key if auth and self.nonce is not None else None
        return msg, encode(msg, key=key, integrity=self.integrity, fingerprint=self.fingerprint)

    def indication(self, method: int, attributes) -> bytes:
        return encode(Message(method, c.INDICATION, os.urandom(12), list(attributes)),
                      fingerprint=self.fingerprint)

    def learn(self, data: bytes) -> Message:
        """Decode a response; a 401/438 teaches the realm and nonce."""
        msg = decode_untrusted(data)
        err = msg.get(c.ERROR_CODE)
        if err is not None and err.code in (401, 438):
            self.realm = msg.get(c.REALM)
            self.nonce = msg.get(c.NONCE)
        return msg


def channel_data(number: int, payload: bytes) -> bytes:
    return number.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload


def send_indication(client: TurnClient, peer, payload: bytes) -> bytes:
    return client.indication(c.SEND, [(c.XOR_PEER_ADDRESS, peer), (c.DATA_ATTR, payload)])
