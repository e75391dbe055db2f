"""The self-test page (``[selftest] enabled``): a browser that opens turnd's TCP or TLS port
(``http://turn.example.com:3478/`` or ``https://turn.example.com:443/``) gets one static,
self-contained page that tests this server from where the browser sits, through the
browser's own WebRTC stack (turnd/selftest.html).  HTTP is read with h11 (sans-I/O), within
the caps of any unauthenticated input (MAX_REQUEST bytes, the first-message deadline); one
answer, then the connection is closed.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import re

import h11

MAX_REQUEST = 8 * 1024
_PAGE_PATH = os.path.join(os.path.dirname(__file__), "selftest.html")
_HOST_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}\.?)*$")


def _load_page() -> tuple[str, str]:
    """The page and its Content-Security-Policy: nothing from anywhere, but its own inline
    script and style (by hash), fetch() to any report URL, and no framing."""
    with open(_PAGE_PATH, encoding="utf-8") as f:
        page = f.read()
    hashes = {}
    for tag in ("script", "style"):
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        hashes[tag] = " ".join("'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest())
                               .decode() + "'" for b in found)
    csp = (f"default-src 'none'; script-src {hashes['script']}; style-src {hashes['style']}; "
           "connect-src *; img-src 'none'; base-uri 'none'; form-action 'none'; "
           "frame-ancestors 'none'")
    return page, csp


PAGE, CSP = _load_page()


def host_in_header(value: bytes) -> str:
    """The host of a Host header ("name", "name:port", "[v6]:port"), without the port."""
    text = value.decode("ascii", errors="replace")
    if text.startswith("["):
        return text[1:].partition("]")[0]
    return text.rpartition(":")[0] if text.count(":") == 1 else text


def _host_of(value: bytes, local_ip: str) -> str:
    """The name the browser used (the Host header), if it is a plain host name or IP;
    else the address it reached."""
    host = host_in_header(value)
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if host and len(host) <= 253 and _HOST_NAME.match(host):
        return host
    return local_ip


def urls_for(host: str, ports: dict) -> dict:
    shown = f"[{host}]" if ":" in host else host
    out = {}
    if ports.get("udp"):
        out["udp"] = f"turn:{shown}:{ports['udp']}?transport=udp"
    if ports.get("tcp"):
        out["tcp"] = f"turn:{shown}:{ports['tcp']}?transport=tcp"
    if ports.get("tls"):
        out["tls"] = f"turns:{shown}:{ports['tls']}?transport=tcp"
    return out


def render(host: str, ports: dict) -> bytes:
    shown = f"[{host}]" if ":" in host else host
    stun = f"stun:{shown}:{ports['udp']}" if ports.get("udp") else ""
    data = json.dumps({"urls": urls_for(host, ports), "stun": stun})
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return PAGE.replace("__TURND_CONFIG__", data).encode()


async def answer_http_untrusted(stream, first: bytes, local: tuple, tls: bool, server) -> None:
    """Read one request (``first`` holds its first bytes) and answer it: GET or HEAD / the
    page, other paths 404, other methods 405."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
    conn.receive_data(first)
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            if not data:
                return
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            break
        return
    headers = dict(event.headers)
    path = event.target.split(b"?")[0]
    base = [("Content-Security-Policy", CSP), ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"), ("Cache-Control", "no-store"),
            ("Connection", "close")]
    if event.method not in (b"GET", b"HEAD"):
        status, body, ctype = 405, b"method not allowed\n", "text/plain; charset=utf-8"
        base.append(("Allow", "GET, HEAD"))
    elif path != b"/":
        status, body, ctype = 404, b"not found: the self-test page is at /\n", "text/plain; charset=utf-8"
    else:
        host = _host_of(headers.get(b"host", b""), local[0])
        status, body, ctype = 200, render(host, server.page_ports), "text/html; charset=utf-8"
    out = conn.send(h11.Response(status_code=status, headers=[
        ("Content-Type", ctype), ("Content-Length", str(len(body))), *base]))
    if event.method != b"HEAD":
        out += conn.send(h11.Data(data=body))
    out += conn.send(h11.EndOfMessage())
    await stream.send_all(out)
