"""Hardening: each finding of the review, reproduced over real sockets against a running
daemon, and the daemon still serving everyone else afterwards."""

from __future__ import annotations

import os
import resource
import socket
import struct

import pytest
import trio

from turnd.config import LimitsConfig, RelayConfig
from turnd.server import serve
from turnd.stun import Message, decode_untrusted, encode
from turnd.stun import constants as c

from .helpers import UdpTurn, binding_request, recv_or_none, turn_config, udp_client, udp_exchange
from .turn_client import channel_data, send_indication


async def binding_still_answered(running) -> None:
    """The daemon still answers STUN on UDP (IPv4 and IPv6) and on TCP."""
    for server in running.udp:
        sock = await udp_client(server[0])
        msg, data = binding_request()
        await sock.sendto(data, server)
        reply, _ = await sock.recvfrom(2048)
        assert decode_untrusted(reply).transaction_id == msg.transaction_id
        sock.close()
    stream = await trio.open_tcp_stream(*running.tcp[0])
    msg, data = binding_request()
    await stream.send_all(data)
    reply = await stream.receive_some(2048)
    assert decode_untrusted(reply).transaction_id == msg.transaction_id
    await stream.aclose()


# --- 1: a TCP connection reset at once -----------------------------------------------

async def test_tcp_connections_reset_at_once_do_not_stop_the_daemon(nursery):
    running = await nursery.start(serve, turn_config())
    with trio.fail_after(10):
        for _ in range(50):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.connect(running.tcp[0])
            s.close()  # RST: the server's accept() returns a connection that is already gone
        await trio.sleep(0.2)
        await binding_still_answered(running)


# --- 2: one datagram too large for a Data indication ------------------------------------

async def test_peer_datagram_too_large_for_a_data_indication_is_dropped(nursery):
    running = await nursery.start(serve, turn_config())
    with trio.fail_after(10):
        peer = await udp_client("::1")
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        turn = await UdpTurn.connect(running.udp[1])  # an IPv6 client, IPv6 relay
        relayed = await turn.allocate([(c.REQUESTED_ADDRESS_FAMILY, 2)])
        await turn.permit(peer.getsockname()[:2])
        await peer.sendto(b"x" * 65527, relayed)  # the largest IPv6 datagram: no Data indication fits
        await peer.sendto(b"small", relayed)
        msg = decode_untrusted(await turn.recv())
        assert msg.get(c.DATA_ATTR) == b"small"
        await binding_still_answered(running)
    assert running.stats.dropped_too_big == 1


async def test_channel_data_too_large_for_the_other_allocation_is_dropped(nursery):
    """An IPv6 client sends 65,519 bytes of ChannelData to another allocation on this
    server that has no channel: the Data indication would not fit in 16 bits."""
    running = await nursery.start(serve, turn_config(allow=()))
    with trio.fail_after(10):
        a = await UdpTurn.connect(running.udp[1])
        a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        b = await UdpTurn.connect(running.udp[1], "bob", "bobpw")
        relay_a = await a.allocate([(c.REQUESTED_ADDRESS_FAMILY, 2)])
        relay_b = await b.allocate([(c.REQUESTED_ADDRESS_FAMILY, 2)])
        await b.permit(relay_a)
        await a.bind(0x4000, relay_b)
        await a.sock.sendto(channel_data(0x4000, b"y" * 65519), running.udp[1])
        await a.sock.sendto(channel_data(0x4000, b"fits"), running.udp[1])
        msg = decode_untrusted(await b.recv())
        assert msg.get(c.DATA_ATTR) == b"fits"
        await binding_still_answered(running)
    assert running.stats.dropped_too_big == 1


# --- 3: one unauthenticated request that costs seconds ---------------------------------

def many_unknown_attributes(n: int) -> bytes:
    body = b"".join(struct.pack("!HH", 0x0100 + i, 0) for i in range(n))
    return struct.pack("!HHI", 0x0001, len(body), c.MAGIC_COOKIE) + os.urandom(12) + body


async def test_request_with_thousands_of_attributes_gets_a_small_400(nursery):
    running = await nursery.start(serve, turn_config())
    with trio.fail_after(10):
        sock = await udp_client("127.0.0.1")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        request = many_unknown_attributes(16000)
        assert len(request) > 64000
        await sock.sendto(request, running.udp[0])
        reply, _ = await sock.recvfrom(65536)
        msg = decode_untrusted(reply)
        assert msg.get(c.ERROR_CODE).code == 400
        assert len(reply) < 200  # not a 32 KiB list of unknown attributes
        await binding_still_answered(running)


# --- 4: relay ports are never lost ---------------------------------------------------------

async def test_a_port_freed_and_taken_in_one_batch_is_not_lost(nursery):
    """A Refresh 0 and another client's Allocate arrive together: the port must be
    closed before it is handed out again, or the Allocate gets EADDRINUSE."""
    running = await nursery.start(serve, turn_config(relay=RelayConfig(ports=(41500, 41500))))
    server = running.udp[0]
    with trio.fail_after(10):
        a = await UdpTurn.connect(server)
        b = await UdpTurn.connect(server, "bob", "bobpw")
        assert await a.allocate() == ("127.0.0.1", 41500)
        resp = await b.call(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
        assert resp.get(c.ERROR_CODE).code == 508  # and bob has his nonce now
        _, release = a.client.request(c.REFRESH, [(c.LIFETIME, 0)])
        take_msg, take = b.client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
        # Both land in the listen socket before the server runs: one batch.
        raw_a = socket.fromfd(a.sock.fileno(), a.sock.family, a.sock.type)
        raw_b = socket.fromfd(b.sock.fileno(), b.sock.family, b.sock.type)
        raw_a.sendto(release, server)
        raw_b.sendto(take, server)
        raw_a.close()
        raw_b.close()
        while True:
            reply = decode_untrusted(await b.recv())
            if reply.transaction_id == take_msg.transaction_id:
                break
        assert reply.cls == c.SUCCESS, reply
        assert reply.get(c.XOR_RELAYED_ADDRESS) == ("127.0.0.1", 41500)


async def test_ports_come_back_after_file_descriptors_run_out(nursery):
    ports = (41600, 41611)  # 12 ports; three failing Allocates used to lose up to 48
    running = await nursery.start(serve, turn_config(relay=RelayConfig(ports=ports)))
    server = running.udp[0]
    size = ports[1] - ports[0] + 1
    clients = [await UdpTurn.connect(server) for _ in range(size + 3)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    filler = []
    with trio.fail_after(20):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 4096), hard))
            while True:
                try:
                    filler.append(os.open("/dev/null", os.O_RDONLY))
                except OSError:
                    break
            for turn in clients[:3]:  # every relay bind fails with EMFILE
                resp = await turn.call(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
                assert resp.get(c.ERROR_CODE).code == 508
        finally:
            for fd in filler:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert running.core.free_ports()["127.0.0.1"] == size
        relayed = {await turn.allocate() for turn in clients[3:]}
    assert len(relayed) == size  # every port of the range, after the pressure


# --- 5: TCP connections are capped ------------------------------------------------------------

async def test_tcp_connections_are_capped_per_ip_and_others_still_served(nursery):
    limits = LimitsConfig(tcp_connections_per_ip=5, tcp_connections=8)
    running = await nursery.start(serve, turn_config(limits=limits))
    host, port = running.tcp[0]
    with trio.fail_after(10):
        held = [await trio.open_tcp_stream(host, port) for _ in range(9)]
        closed = 0
        for stream in held:
            with trio.move_on_after(0.5):
                try:
                    if await stream.receive_some(10) == b"":
                        closed += 1
                except trio.BrokenResourceError:
                    closed += 1
        assert closed == 4  # the sixth to ninth from 127.0.0.1 were refused
        # another source address is still served while 127.0.0.1 holds its five
        other = trio.socket.socket()
        await other.bind(("127.0.0.2", 0))
        await other.connect((host, port))
        msg, data = binding_request()
        await other.send(data)
        assert decode_untrusted(await other.recv(2048)).transaction_id == msg.transaction_id
        other.close()
        for stream in held:
            await stream.aclose()
    assert running.tcp_stats["refused_per_ip"] == 4


async def test_tcp_slowloris_is_closed_at_the_first_message_deadline(nursery):
    limits = LimitsConfig(tcp_first_message_timeout=1)
    running = await nursery.start(serve, turn_config(limits=limits))
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*running.tcp[0])
        _, data = binding_request()
        start = trio.current_time()
        try:
            for byte in data[:-1]:  # one byte every 0.2 s never completes a message in time
                await stream.send_all(bytes([byte]))
                await trio.sleep(0.2)
            got = await stream.receive_some(100)
        except trio.BrokenResourceError:
            got = b""
        assert got == b""
        assert trio.current_time() - start < 5
        await binding_still_answered(running)
    assert running.tcp_stats["closed_idle"] == 1


# --- 6: permissions per allocation are capped --------------------------------------------------

async def test_permissions_per_allocation_are_capped(nursery):
    limits = LimitsConfig(permissions_per_allocation=10)
    running = await nursery.start(serve, turn_config(limits=limits))
    with trio.fail_after(10):
        turn = await UdpTurn.connect(running.udp[0])
        await turn.allocate()
        peers = [(f"8.8.{i // 250}.{i % 250}", 9) for i in range(12)]
        resp = await turn.call(c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, p) for p in peers[:10]])
        assert resp.cls == c.SUCCESS
        resp = await turn.call(c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, peers[10])])
        assert resp.get(c.ERROR_CODE).code == 508
        resp = await turn.call(c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4000), (c.XOR_PEER_ADDRESS, peers[11])])
        assert resp.get(c.ERROR_CODE).code == 508
        # refreshing one of the ten is fine
        assert (await turn.call(c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, peers[0])])).cls == c.SUCCESS
        await binding_still_answered(running)
    [alloc] = running.core.allocations.values()
    assert len(alloc.permissions) == 10


# --- 10: Data indications carry random transaction IDs --------------------------------------

async def test_every_data_indication_has_its_own_random_transaction_id(nursery):
    running = await nursery.start(serve, turn_config())
    with trio.fail_after(10):
        turn = await UdpTurn.connect(running.udp[0])
        await turn.allocate([(c.ADDITIONAL_ADDRESS_FAMILY, 2)])
        relays = {}
        for host in ("127.0.0.1", "::1"):
            peer = await udp_client(host)
            await turn.permit(peer.getsockname()[:2])
            relays[host] = peer
        [alloc] = running.core.allocations.values()
        seen = set()
        for host, peer in relays.items():
            relayed = alloc.relays[6 if ":" in host else 4].address
            for i in range(20):
                await peer.sendto(b"m%d" % i, relayed)
                msg = decode_untrusted(await turn.recv())
                # The XOR-PEER-ADDRESS of an IPv6 peer depends on the ID: still right.
                assert msg.get(c.XOR_PEER_ADDRESS) == peer.getsockname()[:2]
                assert msg.get(c.DATA_ATTR) == b"m%d" % i
                seen.add(msg.transaction_id)
    assert len(seen) == 40


# --- every transport: a failing core drops that packet or connection, nothing more ----------

async def test_a_failing_core_on_tcp_closes_that_connection_only(nursery):
    running = await nursery.start(serve, turn_config())
    real = running.core.handle_untrusted

    def broken(data, ft, now):
        if ft.transport == "tcp":
            raise RuntimeError("simulated bug")
        return real(data, ft, now)

    running.core.handle_untrusted = broken
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*running.tcp[0])
        await stream.send_all(binding_request()[1])
        assert await stream.receive_some(100) == b""  # that connection is closed
        running.core.handle_untrusted = real
        await binding_still_answered(running)
    assert running.shell.internal_errors == 1


async def test_a_failing_relay_path_drops_that_datagram_only(nursery, monkeypatch):
    import turnd.relay
    running = await nursery.start(serve, turn_config())
    with trio.fail_after(10):
        peer = await udp_client("127.0.0.1")
        turn = await UdpTurn.connect(running.udp[0])
        relayed = await turn.allocate()
        await turn.permit(peer.getsockname())
        real = turnd.relay.data_indication_header
        monkeypatch.setattr(turnd.relay, "data_indication_header",
                            lambda *a: (_ for _ in ()).throw(RuntimeError("simulated bug")))
        await peer.sendto(b"lost", relayed)  # peer -> client: the relay loop's bug
        await turn.sock.sendto(send_indication(turn.client, peer.getsockname(), b"to peer"),
                               running.udp[0])
        assert await peer.recvfrom(100) == (b"to peer", relayed)  # the listener still relays
        monkeypatch.setattr(turnd.relay, "data_indication_header", real)
        await peer.sendto(b"kept", relayed)
        assert decode_untrusted(await turn.recv()).get(c.DATA_ATTR) == b"kept"
        await binding_still_answered(running)
    assert running.stats.internal_errors == 1


async def test_a_failing_listener_path_drops_that_datagram_only(nursery, monkeypatch):
    import turnd.relay
    running = await nursery.start(serve, turn_config())
    with trio.fail_after(10):
        peer = await udp_client("127.0.0.1")
        turn = await UdpTurn.connect(running.udp[0])
        relayed = await turn.allocate()
        await turn.bind(0x4000, peer.getsockname())
        real = turnd.relay.send_indication_untrusted
        monkeypatch.setattr(turnd.relay, "send_indication_untrusted",
                            lambda *a: (_ for _ in ()).throw(RuntimeError("simulated bug")))
        await turn.sock.sendto(send_indication(turn.client, peer.getsockname(), b"lost"),
                               running.udp[0])
        await turn.sock.sendto(channel_data(0x4000, b"kept"), running.udp[0])
        assert await peer.recvfrom(100) == (b"kept", relayed)
        monkeypatch.setattr(turnd.relay, "send_indication_untrusted", real)
        await binding_still_answered(running)
    assert running.stats.internal_errors == 1


async def test_a_failing_sweep_is_counted_and_the_next_one_runs(nursery, autojump_clock):
    running = await nursery.start(serve, turn_config())
    calls = []
    real = running.core.expire

    def flaky(now, budget=1000):
        calls.append(now)
        if len(calls) == 1:
            raise RuntimeError("simulated bug")
        return real(now, budget)

    running.core.expire = flaky
    await trio.sleep(3.5)
    assert len(calls) >= 3
    assert running.shell.internal_errors == 1


# --- found in the hostile review ------------------------------------------------------------

async def test_thousands_of_tiny_tcp_frames_in_one_write_do_not_starve_udp(nursery):
    """One write of 4,000 Binding indications (no answer each) used to be handled without a
    pause: 20 ms and more during which nothing else ran.  Now each frame takes its turn."""
    running = await nursery.start(serve, turn_config())
    indication = encode(Message(c.BINDING, c.INDICATION, os.urandom(12)))
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*running.tcp[0])
        sock = await udp_client("127.0.0.1")
        await stream.send_all(indication * 3200)  # 64,000 bytes: one read for turnd
        while running.core.stats.get("indications_ignored", 0) == 0:
            await trio.sleep(0)  # turnd has begun on them
        msg, data = binding_request()
        await sock.sendto(data, running.udp[0])
        reply, _ = await sock.recvfrom(2048)
        handled = running.core.stats["indications_ignored"]
        assert decode_untrusted(reply).transaction_id == msg.transaction_id
        assert handled < 1000, handled  # answered long before the TCP batch was through
        await stream.aclose()


async def test_a_held_tcp_connection_buffers_one_frame_not_two(nursery):
    """Found in review: a connection mid-frame kept its last read besides the framer's
    copy (134 KiB each); one largest frame is the documented cap."""
    import gc
    import tracemalloc
    running = await nursery.start(serve, turn_config())
    frame = struct.pack("!HHI", 0x0001, 65532, c.MAGIC_COOKIE) + os.urandom(12) + b"\0" * 65532
    with trio.fail_after(20):
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            streams = []
            for _ in range(20):
                stream = await trio.open_tcp_stream(*running.tcp[0])
                await stream.send_all(frame[:-1])  # all but the last byte
                streams.append(stream)
            while running.tcp_stats["open"] < 20:
                await trio.sleep(0.01)
            await trio.sleep(0.3)  # turnd has read what there is
            per_connection = (tracemalloc.get_traced_memory()[0] - before) / 20
        finally:
            tracemalloc.stop()
        for stream in streams:
            await stream.aclose()
    assert per_connection < 80 * 1024, per_connection


async def test_tcp_connections_never_take_the_descriptors_relays_need(tmp_path):
    """Found in review: under a low open-files limit, idle TCP connections took every
    descriptor and Allocates got 508 with the port range free."""
    import subprocess
    import sys
    port = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    port.bind(("127.0.0.1", 0))
    udp_port = port.getsockname()[1]
    port.close()
    conf = tmp_path / "turnd.toml"
    conf.write_text(f'[server]\nlisten = ["127.0.0.1:{udp_port}"]\nrealm = "turnd.test"\n'
                    f'[auth]\nusers = {{ alice = "alicepw" }}\n[relay]\nports = "46000-46099"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "turnd", "serve", "--config", str(conf)],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400)),
        stderr=subprocess.PIPE, text=True)
    held = []
    try:
        with trio.fail_after(30):
            server = ("127.0.0.1", udp_port)
            sock = await udp_client("127.0.0.1")
            while not await udp_exchange(sock, binding_request()[1], server, 0.2):
                pass  # until it answers
            for i in range(500):  # more than 400 - 100 relay sockets - the reserve
                s = socket.socket()
                s.bind((f"127.0.0.{2 + i // 200}", 0))
                s.setblocking(False)
                try:
                    s.connect(("127.0.0.1", udp_port))
                except BlockingIOError:
                    pass
                held.append(s)
            await trio.sleep(0.5)
            relayed = set()
            for _ in range(20):
                turn = await UdpTurn.connect(server)
                relayed.add(await turn.allocate())
            assert len(relayed) == 20
    finally:
        for s in held:
            s.close()
        proc.terminate()
        err = proc.communicate(timeout=10)[1]
    assert "TCP connections capped at" in err, err
