"""A tiny HTTP server for browser tests: serves one page at / and hands every request's
path and query to a callback (the page reports its results by requesting /result?...)."""

from __future__ import annotations

import urllib.parse

import trio


async def serve_page(page: bytes, on_request, *, task_status=trio.TASK_STATUS_IGNORED):
    """Serve ``page`` on 127.0.0.1 (port 0, reported through ``task_status``); call
    ``on_request(path, query: dict)`` for every request."""

    async def handle(stream):
        async with stream:
            data = b""
            with trio.move_on_after(5):
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    data += chunk
            target = data.split(b" ", 2)[1].decode() if data.count(b" ") >= 2 else "/"
            path, _, query = target.partition("?")
            head, _, body = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            with trio.move_on_after(5):
                while len(body) < length:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    body += chunk
            if length:
                on_request(path, {"body": [body.decode(errors="replace")]})
            else:
                on_request(path, urllib.parse.parse_qs(query))
            page_body = page if path == "/" else b""
            head = (f"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {len(page_body)}\r\n"
                    "Access-Control-Allow-Origin: *\r\nConnection: close\r\n\r\n").encode()
            try:
                await stream.send_all(head + page_body)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)
