"""``turnd selftest``: is a TURN server usable from here?  For each URL (as in RTCIceServer:
``turn:H:P?transport=udp``, ``turn:H:P?transport=tcp``, ``turns:H:P?transport=tcp``) it
allocates twice, gives each allocation a permission for the other's relayed address, binds a
channel on the first, relays a packet from the first to the second and back, and says OK with
the relayed address and the round trip, or which step failed, with the STUN error and what an
admin should check.  Plain RFC 8656, so it works against any TURN server, coturn included.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
import urllib.parse

import attrs
import trio

from .logs import address_text
from .stun import Message, decode_untrusted, encode, long_term_key
from .stun import constants as c
from .stun.errors import StunDecodeError
from .stun.framing import StreamFramer

TIMEOUT = 5.0  # seconds for each answer
CHANNEL = 0x4000

HINTS = {
    401: "wrong user name or password (or an expired REST credential; check the server's clock)",
    403: "the server refused the peer (its peer policy) or is draining",
    437: "the 5-tuple already has an allocation",
    441: "the credentials differ from those the allocation was made with",
    442: "the server does not relay over this transport",
    486: "a quota is reached on the server (user, address or total)",
    508: "the server has no free relay port (its relay port range is used up)",
    300: "the server is draining and names another server",
}


class Failed(Exception):
    """A step failed: ``str()`` is the line to print."""


def safe(text) -> str:
    """Text a server chose (a reason phrase), fit for a terminal: control, escape and
    invisible characters shown as escapes, at most 127 characters."""
    text = str(text)[:127]
    return text if text.isprintable() else ascii(text)[1:-1]


@attrs.frozen
class TurnUrl:
    text: str
    host: str
    port: int
    transport: str  # "udp", "tcp" or "tls"

    @classmethod
    def parse(cls, text: str) -> "TurnUrl":
        scheme, sep, rest = text.partition(":")
        if scheme not in ("turn", "turns", "stun") or not sep:
            raise ValueError(f"{text!r}: expected turn:HOST[:PORT][?transport=udp|tcp], turns:... "
                             "or stun:HOST[:PORT]")
        hostport, _, query = rest.partition("?")
        params = urllib.parse.parse_qs(query)
        transport = params.get("transport", ["tcp" if scheme == "turns" else "udp"])[0]
        if transport not in ("udp", "tcp") or (scheme == "turns" and transport != "tcp"):
            raise ValueError(f"{text!r}: transport must be udp or tcp (turns: tcp only)")
        if hostport.startswith("["):
            host, _, port = hostport[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = hostport.partition(":")
        default = 5349 if scheme == "turns" else 3478
        try:
            number = int(port) if port else default
        except ValueError:
            raise ValueError(f"{text!r}: bad port {port!r}") from None
        if scheme == "stun":
            return cls(text, host, number, "stun")
        return cls(text, host, number, "tls" if scheme == "turns" else transport)


class Link:
    """One connection to the server: send a message, read the next one."""

    @classmethod
    async def open(cls, url: TurnUrl, insecure: bool) -> "Link":
        try:
            infos = await trio.socket.getaddrinfo(url.host, url.port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise Failed(f"resolve {url.host}: {exc}") from None
        family, _, _, _, addr = infos[0]
        link = cls()
        link.server = addr[:2]
        if url.transport in ("udp", "stun"):
            link.sock = trio.socket.socket(family, socket.SOCK_DGRAM)
            await link.sock.connect(addr)
            link.stream = None
            return link
        try:
            with trio.fail_after(TIMEOUT):
                stream = await trio.open_tcp_stream(url.host, url.port)
        except OSError as exc:
            cause = exc.__cause__
            causes = cause.exceptions if isinstance(cause, BaseExceptionGroup) else [exc]
            refused = all(isinstance(e, ConnectionRefusedError) for e in causes)
            why = (f"connection refused: nothing listens on TCP port {url.port}" if refused
                   else exc.strerror or str(exc))
            raise Failed(f"connect over TCP: {why} (check the host, the port, and the "
                         "firewall)") from None
        except trio.TooSlowError:
            raise Failed(f"connect over TCP: no answer (check that the server listens on TCP "
                         f"port {url.port} and the firewall lets it through)") from None
        if url.transport == "tls":
            ctx = ssl.create_default_context()
            if insecure:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            stream = trio.SSLStream(stream, ctx, server_hostname=url.host)
            try:
                with trio.fail_after(TIMEOUT):
                    await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                cause = exc.__cause__
                why = getattr(cause, "verify_message", None) or str(cause or exc)
                hint = " (--insecure accepts a self-signed certificate)" \
                    if "certificate" in why else ""
                raise Failed(f"TLS handshake: {why}{hint}") from None
            except trio.TooSlowError:
                raise Failed("TLS handshake: no answer (is it a TLS port?)") from None
        link.stream, link.sock = stream, None
        link.framer = StreamFramer(0x80)
        return link

    async def send(self, data: bytes) -> None:
        try:
            if self.stream is None:
                await self.sock.send(data)
            else:
                await self.stream.send_all(data + bytes(-len(data) % 4))
        except ConnectionRefusedError:
            raise Failed("no answer: nothing listens on that UDP port (ICMP port unreachable): "
                         "check the host and port") from None
        except (trio.BrokenResourceError, OSError) as exc:
            raise Failed(f"send: {getattr(exc, 'strerror', None) or 'connection lost'}") from None

    async def receive(self) -> bytes:
        if self.stream is None:
            try:
                return await self.sock.recv(65536)
            except ConnectionRefusedError:
                raise Failed("no answer: nothing listens on that UDP port (ICMP port "
                             "unreachable): check the host and port") from None
            except OSError as exc:
                raise Failed(f"UDP: {exc.strerror or exc}") from None
        while True:
            frame = self.framer.next_frame_untrusted()
            if frame is not None:
                return frame
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, OSError):
                raise Failed("the server reset the connection") from None
            if not data:
                raise Failed("the server closed the connection")
            self.framer.feed(data)

    async def close(self) -> None:
        if self.stream is not None:
            await trio.aclose_forcefully(self.stream)
        else:
            self.sock.close()


class Client:
    """A TURN client on one link: long-term credentials, realm and nonce learned from 401."""

    def __init__(self, link: Link, url: TurnUrl, user: str, password: str):
        self.link, self.url, self.user, self.password = link, url, user, password
        self.realm = self.nonce = None

    async def request(self, method: int, attrs_: list, step: str) -> Message:
        for _ in range(3):
            attributes = list(attrs_)
            key = None
            if self.nonce is not None:
                attributes += [(c.USERNAME, self.user), (c.REALM, self.realm), (c.NONCE, self.nonce)]
                key = long_term_key(self.user, self.realm, self.password)
            tid = os.urandom(12)
            data = encode(Message(method, c.REQUEST, tid, attributes), key=key, fingerprint=True)
            resp = await self._exchange(data, tid, step)
            err = resp.get(c.ERROR_CODE)
            if err is not None and err.code in (401, 438) and (self.nonce is None or err.code == 438):
                self.realm = resp.get(c.REALM) or self.realm
                self.nonce = resp.get(c.NONCE)
                continue
            if err is not None:
                hint = HINTS.get(err.code, "")
                if err.code == 300 and resp.get(c.ALTERNATE_SERVER):
                    hint += f": {resp.get(c.ALTERNATE_SERVER)}"
                raise Failed(f"{step}: {err.code} {safe(err.reason)}" + (f" ({hint})" if hint else ""))
            return resp
        raise Failed(f"{step}: the server keeps asking for credentials")

    async def _exchange(self, data: bytes, tid: bytes, step: str) -> Message:
        tries = 4 if self.link.stream is None else 1  # UDP: retransmit (RFC 8489 §6.2.1)
        for attempt in range(tries):
            await self.link.send(data)
            with trio.move_on_after(TIMEOUT / tries * (attempt + 1) / 2 + 0.3):
                while True:
                    msg = _decode(await self.link.receive())
                    if msg is not None and msg.transaction_id == tid:
                        return msg
        why = ("no answer (check the firewall, the port, and whether UDP is blocked on the "
               "way: try ?transport=tcp)" if self.link.stream is None else "no answer")
        raise Failed(f"{step}: {why}")

    async def expect(self, payload: bytes, failure: str) -> tuple | None:
        """Wait for ``payload`` to be relayed to this client; the peer it came from (None
        over a channel).  ``Failed(failure)`` after TIMEOUT."""
        with trio.move_on_after(TIMEOUT):
            while True:
                data, peer = await self.next_data()
                if data == payload:
                    return peer
        raise Failed(failure)

    async def next_data(self) -> tuple[bytes, tuple | None]:
        """The next relayed payload: (data, peer) from a Data indication or (data, None)
        from ChannelData."""
        while True:
            raw = await self.link.receive()
            if raw and 0x40 <= raw[0] < 0x80 and len(raw) >= 4:
                n = int.from_bytes(raw[2:4], "big")
                return raw[4:4 + n], None
            msg = _decode(raw)
            if msg is not None and msg.method == c.DATA and msg.cls == c.INDICATION:
                return msg.get(c.DATA_ATTR), msg.get(c.XOR_PEER_ADDRESS)


def _decode(raw: bytes) -> Message | None:
    try:
        return decode_untrusted(raw)
    except StunDecodeError:
        return None


async def check_stun(url: TurnUrl) -> str:
    """stun:H:P: a Binding request over UDP; the address the server saw."""
    link = await Link.open(url, False)
    try:
        client = Client(link, url, "", "")
        tid = os.urandom(12)
        start = time.monotonic()
        resp = await client._exchange(encode(Message(c.BINDING, c.REQUEST, tid, []),
                                             fingerprint=True), tid, "binding")
        seen = resp.get(c.XOR_MAPPED_ADDRESS) or resp.get(c.MAPPED_ADDRESS)
        if seen is None:
            raise Failed("binding: the answer has no mapped address")
        return f"sees this client as {address_text(seen)}, round trip {(time.monotonic() - start) * 1000:.1f} ms"
    finally:
        await link.close()


async def check(url: TurnUrl, user: str, password: str, insecure: bool) -> str:
    """One URL: the OK line, or raises Failed with the failing step."""
    if url.transport == "stun":
        return await check_stun(url)
    links = []
    try:
        a_link = await Link.open(url, insecure)
        links.append(a_link)
        a = Client(a_link, url, user, password)
        t0 = time.monotonic()
        resp = await a.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, c.TRANSPORT_UDP)], "allocate")
        took = time.monotonic() - t0
        relayed_a = resp.get(c.XOR_RELAYED_ADDRESS)
        if relayed_a is None:
            raise Failed("allocate: the success response has no XOR-RELAYED-ADDRESS")
        b_link = await Link.open(url, insecure)
        links.append(b_link)
        b = Client(b_link, url, user, password)
        relayed_b = (await b.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, c.TRANSPORT_UDP)],
                                     "second allocate")).get(c.XOR_RELAYED_ADDRESS)
        if relayed_b is None:
            raise Failed("second allocate: the success response has no XOR-RELAYED-ADDRESS")
        await a.request(c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, relayed_b)], "create permission")
        await b.request(c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, relayed_a)],
                        "create permission (second)")
        await a.request(c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, CHANNEL), (c.XOR_PEER_ADDRESS, relayed_b)],
                        "channel bind")
        payload = b"turnd selftest " + os.urandom(8).hex().encode()
        start = time.monotonic()
        await a.link.send(CHANNEL.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload)
        peer = await b.expect(payload, "relay: the packet sent through the channel did not arrive "
                              "at the second allocation (the server's relay ports may be blocked, "
                              "or it refuses relaying to its own addresses)")
        reply = b"back " + payload
        await b.link.send(encode(Message(c.SEND, c.INDICATION, os.urandom(12),
                                         [(c.XOR_PEER_ADDRESS, peer or relayed_a),
                                          (c.DATA_ATTR, reply)])))
        await a.expect(reply, "relay back: the answer did not arrive")
        rtt = (time.monotonic() - start) * 1000
        for client in (a, b):
            try:
                await client.request(c.REFRESH, [(c.LIFETIME, 0)], "deallocate")
            except Failed:
                pass
        return f"relayed {address_text(relayed_a)} in {took * 1000:.0f} ms, round trip {rtt:.1f} ms"
    finally:
        for link in links:
            await link.close()


async def run(urls: list[str], user: str, password: str, insecure: bool, echo) -> bool:
    ok = True
    for text in urls:
        try:
            url = TurnUrl.parse(text)
            line = await check(url, user, password, insecure)
            echo(f"OK    {safe(text)}  {line}")
        except (Failed, ValueError) as exc:
            ok = False
            echo(f"FAIL  {safe(text)}  {exc}")
        except Exception as exc:  # a server that answers what no server should
            ok = False
            echo(f"FAIL  {safe(text)}  unexpected answer ({type(exc).__name__}: {safe(exc)})")
    return ok
