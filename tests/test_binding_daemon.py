"""The Binding service over real loopback sockets, UDP and TCP, IPv4 and IPv6."""

import struct

import pytest
import trio

from turnd.server import serve
from turnd.stun import ErrorCode, verify_fingerprint
from turnd.stun import constants as c

from .helpers import binding_request, family_of, parse, server_config, udp_client, udp_exchange


@pytest.fixture
async def running(nursery):
    return await nursery.start(serve, server_config())


@pytest.mark.parametrize("index", [0, 1], ids=["ipv4", "ipv6"])
async def test_udp_binding_returns_the_clients_address(running, index):
    server = running.udp[index]
    with trio.fail_after(5):
        sock = await udp_client(server[0])
        req, data = binding_request()
        resp = parse(await udp_exchange(sock, data, server))
    assert (resp.method, resp.cls) == (c.BINDING, c.SUCCESS)
    assert resp.transaction_id == req.transaction_id
    assert resp.get(c.XOR_MAPPED_ADDRESS) == sock.getsockname()[:2]
    assert c.SOFTWARE not in resp and c.FINGERPRINT not in resp


async def test_fingerprint_echoed_and_software_when_configured(nursery):
    running = await nursery.start(serve, server_config(software="turnd-test"))
    with trio.fail_after(5):
        sock = await udp_client("127.0.0.1")
        _, data = binding_request(fingerprint=True)
        resp = parse(await udp_exchange(sock, data, running.udp[0]))
    assert resp.get(c.SOFTWARE) == "turnd-test"
    assert verify_fingerprint(resp)


async def test_malformed_request_gets_400(running):
    tid = b"m" * 12
    body = struct.pack("!HH", c.XOR_MAPPED_ADDRESS, 0)
    data = struct.pack("!HHI", 0x0001, len(body), c.MAGIC_COOKIE) + tid + body
    with trio.fail_after(5):
        sock = await udp_client("127.0.0.1")
        resp = parse(await udp_exchange(sock, data, running.udp[0]))
    assert resp.cls == c.ERROR and resp.transaction_id == tid
    assert resp.get(c.ERROR_CODE).code == 400


async def test_unknown_required_attribute_gets_420(running):
    _, data = binding_request([(0x7ABC, b"x"), (0xC0DE, b"optional")])
    with trio.fail_after(5):
        sock = await udp_client("::1")
        resp = parse(await udp_exchange(sock, data, running.udp[1]))
    assert resp.get(c.ERROR_CODE) == ErrorCode(420, "Unknown Attribute")
    assert resp.get(c.UNKNOWN_ATTRIBUTES) == (0x7ABC,)


async def test_not_stun_is_dropped_silently_and_counted(running):
    with trio.fail_after(5):
        sock = await udp_client("127.0.0.1")
        for junk in [b"", b"hello world, not stun", b"\x00" * 20, b"\xff" * 100]:
            assert await udp_exchange(sock, junk, running.udp[0], timeout=0.2) is None
        # The server still answers afterwards.
        _, data = binding_request()
        assert parse(await udp_exchange(sock, data, running.udp[0])).cls == c.SUCCESS
    assert running.core.stats["dropped_not_stun"] == 4


async def test_bad_fingerprint_is_dropped(running):
    _, data = binding_request(fingerprint=True)
    data = data[:-1] + bytes([data[-1] ^ 0xFF])
    with trio.fail_after(5):
        sock = await udp_client("127.0.0.1")
        assert await udp_exchange(sock, data, running.udp[0], timeout=0.2) is None
    assert running.core.stats["dropped_bad_fingerprint"] == 1


async def test_responses_and_indications_get_no_answer(running):
    from turnd.stun import Message, encode
    with trio.fail_after(5):
        sock = await udp_client("127.0.0.1")
        for cls in (c.INDICATION, c.SUCCESS, c.ERROR):
            data = encode(Message(c.BINDING, cls, b"r" * 12))
            assert await udp_exchange(sock, data, running.udp[0], timeout=0.2) is None


@pytest.mark.parametrize("index", [0, 1], ids=["ipv4", "ipv6"])
async def test_tcp_binding_with_split_and_coalesced_frames(running, index):
    from turnd.stun.framing import StreamFramer
    host, port = running.tcp[index]
    reqs = [binding_request(fingerprint=True) for _ in range(3)]
    blob = b"".join(d for _, d in reqs)
    first = len(reqs[0][1])
    framer = StreamFramer()
    responses = []
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            local = stream.socket.getsockname()[:2]
            # the first message in two pieces, then the other two in one write
            await stream.send_all(blob[:7])
            await trio.sleep(0.05)
            await stream.send_all(blob[7:first])
            await stream.send_all(blob[first:])
            while len(responses) < 3:
                framer.feed(await stream.receive_some(4096))
                while (frame := framer.next_frame_untrusted()) is not None:
                    responses.append(parse(frame))
    assert [r.transaction_id for r in responses] == [m.transaction_id for m, _ in reqs]
    for resp in responses:
        assert resp.get(c.XOR_MAPPED_ADDRESS) == local
        assert verify_fingerprint(resp)


async def test_tcp_garbage_closes_the_connection(running):
    host, port = running.tcp[0]
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(b"\x80 SSH-2.0-OpenSSH_9.2\r\n" + b"x" * 40)
            assert await stream.receive_some(100) == b""
    assert running.tcp_stats["closed_not_stun"] == 1


async def test_port_in_use_is_a_one_line_error(nursery):
    from turnd.config import Endpoint
    from turnd.sockets import StartupError
    taken = trio.socket.socket(family_of("127.0.0.1"), trio.socket.SOCK_DGRAM)
    await taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    with pytest.raises(StartupError) as info:
        await nursery.start(serve, server_config(listen=(Endpoint("127.0.0.1", port),)))
    assert str(info.value) == f"cannot listen on udp 127.0.0.1:{port}: address already in use"
    taken.close()
