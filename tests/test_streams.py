"""TURN over TCP and TLS against a running daemon: relaying both ways, the allocation
living and dying with its connection, TLS on both kinds of port, the PROXY protocol, and
what abusive connections can and cannot do to everyone else."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess

import pytest
import trio

from turnd.config import Endpoint, LimitsConfig, TlsConfig
from turnd.server import serve
from turnd.stun import decode_untrusted
from turnd.stun import constants as c
from turnd.tls import generate

from .helpers import (StreamTurn, UdpTurn, binding_request, turn_config, udp_client)
from .turn_client import channel_data, send_indication


@pytest.fixture
def cert(tmp_path):
    """A self-signed certificate for "localhost" and its key (turnd gen-cert's)."""
    return generate("localhost", str(tmp_path / "tls"))


def tls_config(cert, **kw):
    kw.setdefault("tls_listen", (Endpoint("127.0.0.1", 0),))
    config = turn_config(**kw)
    import attrs
    return attrs.evolve(config, tls=TlsConfig(cert=cert[0], key=cert[1]))


async def udp_call_works(running, peer) -> None:
    """An independent UDP client's allocation relays a packet to a peer and back."""
    turn = await UdpTurn.connect(running.udp[0], "bob", "bobpw")
    relayed = await turn.allocate()
    await turn.permit(peer.getsockname())
    await turn.sock.sendto(send_indication(turn.client, peer.getsockname(), b"udp ok"), turn.server)
    data, _ = await peer.recvfrom(2048)
    assert data == b"udp ok"
    await peer.sendto(b"back", relayed)
    assert decode_untrusted(await turn.recv()).get(c.DATA_ATTR) == b"back"
    turn.sock.close()


async def relay_both_ways(turn: StreamTurn, peer) -> tuple:
    """Allocate over the stream, bind a channel to ``peer`` and relay both ways, with
    ChannelData and with Send/Data indications.  Returns the relayed address."""
    relayed = await turn.allocate()
    paddr = peer.getsockname()
    await turn.bind(0x4001, paddr)
    await turn.send(channel_data(0x4001, b"abcde") + b"\0\0\0")   # padded (RFC 8656 §12.5)
    await turn.send(channel_data(0x4001, b"xyz"))                  # not padded: accepted too
    await turn.send(send_indication(turn.client, paddr, b"by send"))
    got = [(await peer.recvfrom(2048))[0] for _ in range(3)]
    assert got == [b"abcde", b"xyz", b"by send"]
    await peer.sendto(b"12345", relayed)
    frame = await turn.frame()
    assert frame == channel_data(0x4001, b"12345")  # the framer took the padding
    return relayed


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_turn_over_tcp_relays_both_ways(nursery, host):
    running = await nursery.start(serve, turn_config())
    server = running.tcp[0] if host == "127.0.0.1" else running.tcp[1]
    with trio.fail_after(10):
        peer = await udp_client("127.0.0.1")
        turn = await StreamTurn.connect(server)
        relayed = await relay_both_ways(turn, peer)
        assert relayed[0] == "127.0.0.1"  # relay.default_family
        assert running.core.allocations  # on the stream's 5-tuple
        assert {ft.transport for ft in running.core.allocations} == {"tcp"}
    assert running.stats.to_peer >= 3 and running.stats.to_client >= 1
    assert running.stats.packets_slow_path < running.stats.packets_in  # the fast path relayed


async def test_turn_over_tls_relays_both_ways(nursery, cert):
    running = await nursery.start(serve, tls_config(cert))
    with trio.fail_after(10):
        peer = await udp_client("127.0.0.1")
        turn = await StreamTurn.connect(running.tls[0], tls_ca=cert[0])
        assert turn.stream.version() in ("TLSv1.2", "TLSv1.3")
        await relay_both_ways(turn, peer)
    assert running.tcp_stats["tls_connections"] == 1


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_tls_1_2_and_1_3_are_served_and_nothing_older(nursery, cert, version):
    running = await nursery.start(serve, tls_config(cert))
    ctx = ssl.create_default_context(cafile=cert[0])
    ctx.check_hostname = False
    ctx.maximum_version = version
    with trio.fail_after(10):
        stream = trio.SSLStream(await trio.open_tcp_stream(*running.tls[0]), ctx)
        await stream.do_handshake()
        assert stream.version() == version.name.replace("v1_", "v1.")
    assert running.shell.streams.tls_context.minimum_version == ssl.TLSVersion.TLSv1_2


async def test_a_tls_client_hello_on_the_plain_tcp_port_is_served_when_a_cert_is_set(nursery, cert):
    running = await nursery.start(serve, tls_config(cert, tls_listen=()))
    with trio.fail_after(10):
        peer = await udp_client("127.0.0.1")
        turn = await StreamTurn.connect(running.tcp[0], tls_ca=cert[0])  # TLS on the TCP port
        await relay_both_ways(turn, peer)
        plain = await StreamTurn.connect(running.tcp[0])  # and plain TCP beside it
        assert (await plain.call(c.BINDING)).cls == c.SUCCESS
    assert running.tcp_stats["tls_connections"] == 1


async def test_a_tls_client_hello_without_a_cert_is_closed_and_counted(nursery):
    running = await nursery.start(serve, turn_config())
    ctx = ssl.create_default_context()
    with trio.fail_after(10):
        stream = trio.SSLStream(await trio.open_tcp_stream(*running.tcp[0]), ctx,
                                server_hostname="localhost")
        with pytest.raises(trio.BrokenResourceError):
            await stream.do_handshake()
        await trio.sleep(0.1)
        plain = await StreamTurn.connect(running.tcp[0])
        assert (await plain.call(c.BINDING)).cls == c.SUCCESS
    assert running.tcp_stats["closed_tls_no_cert"] == 1


@pytest.mark.parametrize("how", ["close", "reset", "mid-frame"])
async def test_the_allocation_ends_with_its_connection_and_its_port_is_free(nursery, cert, how):
    running = await nursery.start(serve, tls_config(cert))
    with trio.fail_after(10):
        for server, ca in ((running.tcp[0], None), (running.tls[0], cert[0])):
            turn = await StreamTurn.connect(server, tls_ca=ca)
            relayed = await turn.allocate()
            assert len(running.core.allocations) == 1
            if how == "mid-frame":  # half a request, then the client vanishes
                _, data = turn.client.request(c.REFRESH)
                await turn.send(data[:10])
                await trio.sleep(0.05)
            raw = turn.stream if ca is None else turn.stream.transport_stream
            if how == "reset":
                raw.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.socket.close()
            while running.core.allocations:
                await trio.sleep(0.01)
            # its relay port is free for anyone: it was returned to the pool and closed
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            probe.bind(relayed)
            probe.close()
            while running.tcp_stats["open"]:
                await trio.sleep(0.01)
    assert running.core.stats["allocations_closed"] == 2


async def test_oversized_or_garbage_frames_close_the_connection(nursery):
    running = await nursery.start(serve, turn_config())
    with trio.fail_after(10):
        for junk in (b"\x00\x01\xff\xff" + c.MAGIC_COOKIE_BYTES + os.urandom(12),  # length 65535
                     b"\x00\x01\x00\x06" + c.MAGIC_COOKIE_BYTES + os.urandom(12),  # not a multiple of 4
                     b"\xff" * 40):
            turn = await StreamTurn.connect(running.tcp[0])
            assert (await turn.call(c.BINDING)).cls == c.SUCCESS
            await turn.send(junk)
            assert await turn.frame() is None  # closed
    assert running.tcp_stats["closed_not_stun"] == 3


# --- the PROXY protocol ---------------------------------------------------------------

def proxy_v1(ip: str, port: int) -> bytes:
    fam = "TCP6" if ":" in ip else "TCP4"
    dst = "::1" if ":" in ip else "127.0.0.1"
    return f"PROXY {fam} {ip} {dst} {port} 3478\r\n".encode()


def proxy_v2(ip: str, port: int, command: int = 0x21) -> bytes:
    if ":" in ip:
        body = socket.inet_pton(socket.AF_INET6, ip) + bytes(16) + struct.pack("!HH", port, 3478)
        fam = 0x21
    else:
        body = socket.inet_aton(ip) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", port, 3478)
        fam = 0x11
    tlv = b"\x04\x00\x01\x00"  # a NOOP TLV: ignored
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes((command, fam)) + struct.pack("!H", len(body + tlv)) + body + tlv


@pytest.mark.parametrize("header, seen", [
    (proxy_v1("198.51.100.7", 40001), ("198.51.100.7", 40001)),
    (proxy_v1("2001:db8::7", 40002), ("2001:db8::7", 40002)),
    (proxy_v2("198.51.100.8", 40003), ("198.51.100.8", 40003)),
    (proxy_v2("2001:db8::8", 40004), ("2001:db8::8", 40004)),
    (proxy_v2("198.51.100.9", 1, command=0x20), None),  # LOCAL: the proxy's own connection
])
async def test_a_trusted_proxy_names_the_client_turnd_sees(nursery, cert, header, seen):
    running = await nursery.start(serve, tls_config(cert, proxy_protocol=("127.0.0.0/8",)))
    with trio.fail_after(10):
        for server, ca in ((running.tcp[0], None), (running.tls[0], cert[0])):
            turn = await StreamTurn.connect(server, tls_ca=ca, prefix=header)
            resp = await turn.call(c.BINDING)
            mapped = resp.get(c.XOR_MAPPED_ADDRESS)
            if seen is None:
                assert mapped[0] == "127.0.0.1"
            else:
                assert mapped == seen
            # and TURN works through it: the allocation is the proxied client's
            peer = await udp_client("127.0.0.1")
            await relay_both_ways(turn, peer)
            await turn.aclose()
    assert running.tcp_stats["closed_bad_proxy"] == 0


async def test_proxied_clients_are_capped_by_their_own_address(nursery):
    limits = LimitsConfig(tcp_connections_per_ip=2, tcp_connections=50)
    running = await nursery.start(serve, turn_config(limits=limits, proxy_protocol=("127.0.0.1/32",)))
    with trio.fail_after(10):
        held = []
        for i in range(3):  # the third from 198.51.100.1 is over its cap
            held.append(await StreamTurn.connect(running.tcp[0], prefix=proxy_v1("198.51.100.1", 1000 + i)))
        for i in range(3):  # another browser behind the same proxy is not
            turn = await StreamTurn.connect(running.tcp[0], prefix=proxy_v1(f"198.51.100.{2 + i}", 1000))
            assert (await turn.call(c.BINDING)).cls == c.SUCCESS
            held.append(turn)
        assert await held[2].frame(timeout=1) is None
    assert running.tcp_stats["refused_per_ip"] == 1


@pytest.mark.parametrize("first, counter", [
    (proxy_v1("198.51.100.7", 1), "closed_untrusted_proxy"),  # not from a trusted proxy
    (proxy_v2("198.51.100.7", 1), "closed_untrusted_proxy"),
])
async def test_a_proxy_header_from_an_untrusted_source_is_closed(nursery, first, counter):
    running = await nursery.start(serve, turn_config(proxy_protocol=("10.0.0.0/8",)))
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*running.tcp[0])
        await stream.send_all(first + binding_request()[1])
        assert await stream.receive_some(100) == b""
        turn = await StreamTurn.connect(running.tcp[0])  # no header: served as it is
        assert (await turn.call(c.BINDING)).get(c.XOR_MAPPED_ADDRESS)[0] == "127.0.0.1"
    assert running.tcp_stats[counter] == 1


@pytest.mark.parametrize("first", [
    b"PROXY TCP4 198.51.100.7 127.0.0.1 99999 3478\r\n",    # a bad port
    b"PROXY TCP4 nonsense\r\n",
    b"PROXY TCP4 198.51.100.7 127.0.0.1 1 3478" + b" " * 80,  # no CRLF within 107 bytes
    b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + bytes(12),    # version 3
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x04" + bytes(4),     # too short for TCP4
    binding_request()[1],                                       # a trusted proxy must send one
])
async def test_a_malformed_or_missing_header_from_a_trusted_proxy_is_closed(nursery, first):
    running = await nursery.start(serve, turn_config(proxy_protocol=("127.0.0.1/32",)))
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*running.tcp[0])
        await stream.send_all(first)
        assert await stream.receive_some(100) == b""
    assert running.tcp_stats["closed_bad_proxy"] == 1


# --- abuse: nobody else notices ---------------------------------------------------------

async def test_tls_handshake_slowloris_is_cut_at_the_handshake_timeout(nursery, cert):
    limits = LimitsConfig(tls_handshake_timeout=1, tcp_first_message_timeout=30)
    running = await nursery.start(serve, tls_config(cert, limits=limits))
    with trio.fail_after(15):
        peer = await udp_client("127.0.0.1")
        slow = []
        for _ in range(5):
            s = await trio.open_tcp_stream(*running.tls[0])
            await s.send_all(b"\x16\x03\x01\x02\x00")  # a ClientHello record header, then a byte at a time
            slow.append(s)
        start = trio.current_time()
        closed = 0
        while closed < len(slow):
            for s in slow:
                try:
                    await s.send_all(b"\x01")
                except trio.BrokenResourceError:
                    pass
            await udp_call_works(running, peer)  # UDP calls go on meanwhile
            await trio.sleep(0.2)
            closed = running.tcp_stats["tls_handshake_failed"]
        assert trio.current_time() - start < 4
    assert running.tcp_stats["open"] == 0


async def test_a_client_that_does_not_read_loses_datagrams_not_memory_and_nobody_waits(nursery):
    running = await nursery.start(serve, turn_config())
    with trio.fail_after(30):
        turn = await StreamTurn.connect(running.tcp[0])
        turn.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        relayed = await turn.allocate()
        peer = await udp_client("127.0.0.1")
        await turn.bind(0x4001, peer.getsockname())
        other_peer = await udp_client("127.0.0.1")
        payload = b"p" * 1000
        biggest = 0
        for burst in range(40):  # 20,000 datagrams the client never reads
            for _ in range(500):
                await peer.sendto(payload, relayed)
            await trio.sleep(0)
            biggest = max([biggest, *(len(sc.buffer) + sc.writing
                                      for sc in running.shell.streams.connections)])
            if burst % 10 == 0:
                await udp_call_works(running, other_peer)  # meanwhile others are served
        await trio.sleep(0.2)
    assert running.stats.send_dropped > 1000  # counted
    assert biggest <= 64 * 1024  # relay.STREAM_BUFFER: memory stays bounded
    # and the slow client itself is still served once it reads again
    with trio.fail_after(10):
        while (frame := await turn.frame(timeout=0.5)) is not None and frame[0] != 0x01:
            pass
        assert (await turn.call(c.REFRESH)).cls == c.SUCCESS


async def test_a_flood_of_connections_is_capped_and_udp_calls_go_on(nursery, cert):
    limits = LimitsConfig(tcp_connections=60, tcp_connections_per_ip=40, tcp_first_message_timeout=5)
    running = await nursery.start(serve, tls_config(cert, limits=limits))
    with trio.fail_after(30):
        peer = await udp_client("127.0.0.1")
        held = []
        for i in range(200):
            server = running.tls[0] if i % 2 else running.tcp[0]
            try:
                held.append(await trio.open_tcp_stream(*server))
            except OSError:
                pass
            if i % 50 == 0:
                await udp_call_works(running, peer)
        await trio.sleep(0.3)
        assert running.tcp_stats["open"] <= 40
        assert running.tcp_stats["refused_per_ip"] >= 150
        await udp_call_works(running, peer)
        while running.tcp_stats["open"]:  # the idle ones are cut at the first-message deadline
            await trio.sleep(0.1)
        for s in held:
            await s.aclose()
        turn = await StreamTurn.connect(running.tcp[0])  # and TCP serves again
        assert (await turn.call(c.BINDING)).cls == c.SUCCESS
    assert running.tcp_stats["closed_idle"] >= 40


# --- certificates: check-config, and reload on SIGHUP -----------------------------------

def _der(path: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(open(path).read())


def _expired_pair(out) -> tuple[str, str]:
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=30))
            .not_valid_after(now - datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    out.mkdir()
    (out / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return str(out / "c.pem"), str(out / "k.pem")


def test_check_config_names_what_is_wrong_with_the_certificate(tmp_path):
    from click.testing import CliRunner
    from turnd.cli import main
    good = generate("localhost", str(tmp_path / "a"))
    other = generate("localhost", str(tmp_path / "b"))
    expired = _expired_pair(tmp_path / "old")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    cases = [
        ((str(tmp_path / "none.pem"), good[1]), f"tls.cert: {tmp_path / 'none.pem'}: No such file or directory"),
        ((str(tmp_path / "junk.pem"), good[1]), f"tls.cert: {tmp_path / 'junk.pem'}: not a PEM certificate"),
        (expired, f"tls.cert: {expired[0]}: expired on "),
        ((good[0], other[1]), f"tls.key: {other[1]}: the key does not match the certificate"),
        ((good[0], good[1]), None),
    ]
    for (crt, key), message in cases:
        path = tmp_path / "t.toml"
        path.write_text(f'[server]\nlisten = ["127.0.0.1:3478"]\ntls_listen = ["127.0.0.1:5349"]\n'
                        f'[tls]\ncert = "{crt}"\nkey = "{key}"\n')
        result = CliRunner().invoke(main, ["check-config", str(path)])
        if message is None:
            assert result.exit_code == 0, result.output
        else:
            assert result.exit_code == 2
            assert result.stderr.startswith("config error: " + message), result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
    path.write_text('[server]\ntls_listen = ["127.0.0.1:5349"]\n')
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.stderr.startswith("config error: tls.cert: needed by server.tls_listen")


def _free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_sighup_reloads_the_certificate_for_new_connections_and_keeps_sessions(tmp_path):
    import shutil
    import signal
    import sys
    first = generate("localhost", str(tmp_path / "first"))
    second = generate("localhost", str(tmp_path / "second"))
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(first[0], live / "turnd.crt")
    shutil.copy(first[1], live / "turnd.key")
    port, tls_port = _free_port(socket.SOCK_DGRAM), _free_port()
    conf = tmp_path / "turnd.toml"
    conf.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\ntls_listen = ["127.0.0.1:{tls_port}"]\n'
                    f'realm = "turnd.test"\n[auth]\nusers = {{ alice = "alicepw" }}\n'
                    f'[relay]\nports = "44000-44099"\n[peers]\nallow = ["127.0.0.1/32"]\n'
                    f'[tls]\ncert = "{live / "turnd.crt"}"\nkey = "{live / "turnd.key"}"\n'
                    '[metrics]\nlisten = ""\n')
    proc = await trio.lowlevel.open_process([sys.executable, "-m", "turnd", "serve", "--config", str(conf)],
                                            stderr=subprocess.PIPE)
    log = b""
    try:
        with trio.fail_after(30):
            while b"listening on tls" not in log:
                log += await proc.stderr.receive_some(4096)
            peer = await udp_client("127.0.0.1")
            old = await StreamTurn.connect(("127.0.0.1", tls_port), tls_ca=first[0])
            assert old.stream.getpeercert(binary_form=True) == _der(first[0])
            await relay_both_ways(old, peer)
            # a renewed certificate in place, then SIGHUP (what certbot's deploy hook does)
            shutil.copy(second[0], live / "turnd.crt")
            shutil.copy(second[1], live / "turnd.key")
            proc.send_signal(signal.SIGHUP)
            while b"TLS certificate and key reloaded" not in log:
                log += await proc.stderr.receive_some(4096)
            new = await StreamTurn.connect(("127.0.0.1", tls_port), tls_ca=second[0])
            assert new.stream.getpeercert(binary_form=True) == _der(second[0])
            # the session from before the reload goes on relaying
            assert (await old.call(c.REFRESH)).cls == c.SUCCESS
            await old.send(channel_data(0x4001, b"still here"))
            assert (await peer.recvfrom(2048))[0] == b"still here"
            # a broken pair is refused with one line, and the current one stays
            (live / "turnd.key").write_text("garbage\n")
            proc.send_signal(signal.SIGHUP)
            while b"reload refused" not in log:
                log += await proc.stderr.receive_some(4096)
            again = await StreamTurn.connect(("127.0.0.1", tls_port), tls_ca=second[0])
            assert (await again.call(c.BINDING)).cls == c.SUCCESS
    finally:
        proc.terminate()
        with trio.fail_after(10):
            await proc.wait()
    assert b"Traceback" not in log, log.decode()



# --- found by a hostile review of TCP/TLS ---------------------------------------------------

async def echo_call_loss(running, peer, count: int = 200, timeout: float = 1.0) -> int:
    """A UDP call through turnd to an echo peer: how many of ``count`` round trips did not
    come back within ``timeout`` each."""
    turn = await UdpTurn.connect(running.udp[0], "bob", "bobpw")
    relayed = await turn.allocate()
    await turn.bind(0x4001, peer.getsockname())
    lost = 0
    for i in range(count):
        await turn.sock.sendto(channel_data(0x4001, b"%05d" % i), turn.server)
        with trio.move_on_after(timeout):
            data, addr = await peer.recvfrom(2048)
            await peer.sendto(data, relayed)
            while (frame := await turn.recv(timeout)) is not None and frame[4:9] != b"%05d" % i:
                pass
            if frame is not None:
                await trio.sleep(0.002)
                continue
        lost += 1
    turn.sock.close()
    return lost


async def test_hundreds_of_connections_of_tiny_frames_do_not_stall_udp_calls(nursery):
    """255 connections from one address, each full of 20-byte Binding indications (no
    authentication, no answer): before, the UDP engine got one turn in 255 x 64 frames and a
    call lost 39 %; now all connections together get ROUND_BUDGET frames per turn."""
    running = await nursery.start(serve, turn_config())
    peer = await udp_client("127.0.0.1")
    indication = binding_request()[1]
    indication = bytes([0x00, 0x11]) + indication[2:]  # a Binding indication
    burst = indication * 5000  # 100 KB per connection
    flooders = []
    with trio.fail_after(60):
        for _ in range(255):
            flooders.append(await trio.open_tcp_stream(*running.tcp[0]))

        async def flood(stream):
            with trio.move_on_after(20):
                for _ in range(4):
                    await stream.send_all(burst)
        async with trio.open_nursery() as attack:
            for stream in flooders:
                attack.start_soon(flood, stream)
            await trio.sleep(0.5)  # the flood is on
            lost = await echo_call_loss(running, peer)
            attack.cancel_scope.cancel()
    assert lost == 0
    assert running.tcp_stats["refused_per_ip"] == 0  # all 255 were let in: the cap did not help


@pytest.mark.parametrize("frame, what", [
    (channel_data(0x4001, b"x"), "ChannelData"),
    (None, "a Send indication"),
])
async def test_relay_frames_before_any_allocation_close_the_connection(nursery, frame, what):
    running = await nursery.start(serve, turn_config())
    if frame is None:
        from .turn_client import TurnClient
        frame = send_indication(TurnClient("x", "y"), ("127.0.0.1", 9), b"x")
    with trio.fail_after(10):
        turn = await StreamTurn.connect(running.tcp[0])
        await turn.send(frame)
        assert await turn.frame() is None  # closed
    assert running.tcp_stats["closed_misuse"] == 1


async def test_indications_alone_do_not_keep_a_connection_open(nursery):
    limits = LimitsConfig(tcp_first_message_timeout=1, tcp_idle_timeout=10)
    running = await nursery.start(serve, turn_config(limits=limits))
    indication = bytes([0x00, 0x11]) + binding_request()[1][2:]
    with trio.fail_after(10):
        turn = await StreamTurn.connect(running.tcp[0])
        start = trio.current_time()
        while await turn.frame(timeout=0.2) is None and running.tcp_stats["closed_idle"] == 0:
            try:
                await turn.send(indication)
            except trio.BrokenResourceError:
                break
        assert trio.current_time() - start < 5
    assert running.tcp_stats["closed_idle"] == 1


async def test_a_tcp_client_on_a_port_number_that_is_a_live_udp_relay_is_served(nursery):
    running = await nursery.start(serve, turn_config())
    with trio.fail_after(10):
        udp = await UdpTurn.connect(running.udp[0])
        relayed = await udp.allocate()
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind(("127.0.0.1", relayed[1]))  # TCP: the UDP relay port number is free
        await sock.connect(running.tcp[0])
        turn = StreamTurn(trio.SocketStream(sock), udp.client.__class__("alice", "alicepw"))
        assert (await turn.call(c.BINDING)).get(c.XOR_MAPPED_ADDRESS) == ("127.0.0.1", relayed[1])


async def test_connections_faster_than_the_rate_are_refused(nursery):
    limits = LimitsConfig(tcp_connection_rate=10)
    running = await nursery.start(serve, turn_config(limits=limits))
    with trio.fail_after(10):
        answered = 0
        for _ in range(40):
            turn = await StreamTurn.connect(running.tcp[0])
            await turn.send(binding_request()[1])
            answered += await turn.frame(timeout=1) is not None
            await turn.aclose()
    assert 20 <= answered < 40  # a burst of twice the rate, then the rate
    assert running.tcp_stats["refused_rate"] == 40 - answered
