"""The trio shell: opens sockets, starts the loops, runs the core's actions,
and stops everything on cancellation.  One place starts things (``serve``),
one stops them (its nursery's cancel scope)."""

from __future__ import annotations

import logging
import signal
import socket
import time

import attrs
import trio

from . import relay
from .config import Config
from .sockets import local_address, open_socket
from .stun.framing import StreamFramer
from .stun.errors import StunDecodeError
from .turn.protocol import FiveTuple, ProtocolConfig, Reply, TurnServer

log = logging.getLogger("turnd")

TCP_IDLE_TIMEOUT = 300.0


@attrs.define
class Running:
    """What ``serve`` hands to ``task_status.started``: bound addresses and the state."""
    udp: list[tuple[str, int]]
    tcp: list[tuple[str, int]]
    core: TurnServer
    stats: relay.RelayStats
    tcp_stats: dict[str, int]


class Shell:
    def __init__(self, config: Config):
        self.config = config
        self.core = TurnServer(ProtocolConfig(realm=config.server.realm,
                                              software=config.server.software))
        self.stats = relay.RelayStats()
        self.tcp_stats = {"connections": 0, "closed_not_stun": 0}
        # Wall-clock seconds, advanced by trio's clock (so autojump_clock drives expiry too).
        self._wall_offset = time.time() - trio.current_time()

    def now(self) -> float:
        return trio.current_time() + self._wall_offset

    def udp_slow_path(self, data: bytes, addr, sock: socket.socket) -> None:
        client = (addr[0], addr[1])
        ft = FiveTuple("udp", client, local_address(sock))
        for action in self.core.handle_untrusted(data, ft, self.now()):
            if isinstance(action, Reply):
                relay.send_or_drop(sock, action.data, addr, self.stats)

    async def tcp_connection(self, stream: trio.SocketStream) -> None:
        self.tcp_stats["connections"] += 1
        peer = stream.socket.getpeername()
        ft = FiveTuple("tcp", (peer[0], peer[1]), local_address(stream.socket))
        framer = StreamFramer()
        try:
            async with stream:
                while True:
                    with trio.move_on_after(TCP_IDLE_TIMEOUT) as idle:
                        data = await stream.receive_some(65536)
                    if idle.cancelled_caught or not data:
                        return
                    framer.feed(data)
                    while (frame := framer.next_frame_untrusted()) is not None:
                        for action in self.core.handle_untrusted(frame, ft, self.now()):
                            if isinstance(action, Reply):
                                await stream.send_all(action.data)
        except StunDecodeError:
            self.tcp_stats["closed_not_stun"] += 1
        except trio.BrokenResourceError:
            pass


async def serve(config: Config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled.  Started with ``nursery.start``, it returns a ``Running``."""
    shell = Shell(config)
    udp_socks: list[socket.socket] = []
    tcp_socks: list[socket.socket] = []
    try:
        for ep in config.server.listen:
            udp_socks.append(open_socket("udp", ep.host, ep.port))
            # Port 0 (tests): take the TCP port the UDP socket got.
            tcp_socks.append(open_socket("tcp", ep.host, ep.port or local_address(udp_socks[-1])[1]))
    except BaseException:
        for s in udp_socks + tcp_socks:
            s.close()
        raise
    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in tcp_socks]
    try:
        async with trio.open_nursery() as nursery:
            for sock in udp_socks:
                nursery.start_soon(relay.listener_loop, sock, shell.udp_slow_path, shell.stats)
            nursery.start_soon(trio.serve_listeners, shell.tcp_connection, listeners)
            running = Running(udp=[local_address(s) for s in udp_socks],
                              tcp=[local_address(s) for s in tcp_socks],
                              core=shell.core, stats=shell.stats, tcp_stats=shell.tcp_stats)
            task_status.started(running)
    finally:
        for s in udp_socks:
            s.close()
        for listener in listeners:
            listener.socket.close()


async def run(config: Config) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(serve, config)
            for transport, addrs in (("udp", running.udp), ("tcp", running.tcp)):
                for host, port in addrs:
                    log.info("listening on %s %s", transport,
                             f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            async for signum in signals:
                log.info("received %s, stopping", signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()
    log.info("stopped")
