"""The sans-I/O server: bytes plus a 5-tuple in, actions out.

``TurnServer.handle_untrusted(data, five_tuple, now)`` takes one datagram (or
one stream frame) from a client and returns a list of actions for the trio
shell to carry out.  It never blocks, never reads a clock, never touches a
socket.
"""

from __future__ import annotations

from typing import NamedTuple

import attrs

from ..stun import constants as c
from ..stun.errors import StunDecodeError, StunError
from ..stun.integrity import verify_fingerprint
from ..stun.message import Message, decode_untrusted, encode

Address = tuple  # (ip: str, port: int)


class FiveTuple(NamedTuple):
    transport: str  # "udp", "tcp" or "tls"
    client: Address
    server: Address


@attrs.frozen
class Reply:
    """Send ``data`` to the client on the 5-tuple the request came in on."""
    data: bytes


@attrs.frozen
class ProtocolConfig:
    realm: str = "turnd"
    software: str = ""


class TurnServer:
    def __init__(self, config: ProtocolConfig):
        self.config = config
        self.stats: dict[str, int] = {}

    def count(self, name: str) -> None:
        self.stats[name] = self.stats.get(name, 0) + 1

    # --- entry point -------------------------------------------------------------

    def handle_untrusted(self, data: bytes, ft: FiveTuple, now: float) -> list:
        try:
            msg = decode_untrusted(data)
        except StunDecodeError as exc:
            if exc.is_stun and exc.cls == c.REQUEST:
                self.count("bad_requests")
                return [Reply(self._error_bytes(exc.method, exc.transaction_id,
                                                StunError(c.BAD_REQUEST, exc.reason[:127])))]
            self.count("dropped_not_stun")
            return []
        if msg.fingerprint_offset is not None and not verify_fingerprint(msg):
            self.count("dropped_bad_fingerprint")
            return []
        if msg.cls != c.REQUEST:
            if msg.cls == c.INDICATION:
                return self._indication(msg, ft, now)
            self.count("dropped_responses")
            return []
        try:
            if msg.unknown_required:
                raise StunError(c.UNKNOWN_ATTRIBUTE,
                                attributes=[(c.UNKNOWN_ATTRIBUTES, msg.unknown_required)])
            return self._request(msg, ft, now)
        except StunError as err:
            self.count(f"error_{err.code}")
            return [Reply(self._error_bytes(msg.method, msg.transaction_id, err,
                                            fingerprint=msg.fingerprint_offset is not None))]

    # --- requests ------------------------------------------------------------------

    def _request(self, msg: Message, ft: FiveTuple, now: float) -> list:
        if msg.method == c.BINDING:
            self.count("binding_requests")
            resp = self._response(msg, [(c.XOR_MAPPED_ADDRESS, ft.client)])
            return [Reply(encode(resp, fingerprint=msg.fingerprint_offset is not None))]
        raise StunError(c.BAD_REQUEST, "Unknown method")

    def _indication(self, msg: Message, ft: FiveTuple, now: float) -> list:
        # A Binding indication is a keepalive: nothing to answer.
        self.count("indications")
        return []

    # --- building responses --------------------------------------------------------

    def _software(self) -> list:
        return [(c.SOFTWARE, self.config.software)] if self.config.software else []

    def _response(self, msg: Message, attributes: list, cls: int = c.SUCCESS) -> Message:
        return Message(msg.method, cls, msg.transaction_id, attributes + self._software())

    def _error_bytes(self, method: int, transaction_id: bytes, err: StunError, *,
                     fingerprint: bool = False, key: bytes | None = None) -> bytes:
        from ..stun.attributes import ErrorCode
        msg = Message(method, c.ERROR, transaction_id,
                      [(c.ERROR_CODE, ErrorCode(err.code, err.reason))] + err.attributes
                      + self._software())
        return encode(msg, key=key, fingerprint=fingerprint)
