"""The trio shell: opens sockets, starts the loops, carries out the core's
actions, sweeps expiries, and stops everything on cancellation.  One place
starts things (``serve``), one stops them (its nursery's cancel scope)."""

from __future__ import annotations

import errno
import functools
import logging
import secrets
import signal
import socket
import time

import attrs
import trio

from . import relay
from .auth import AnyOf, RestSecrets, StaticUsers
from .config import Config
from .sockets import local_address, open_relay_socket, open_socket
from .stun.errors import StunDecodeError
from .stun.framing import StreamFramer
from .turn.policy import PeerPolicy
from .turn.protocol import (AllocationCreated, AllocationDeleted, FiveTuple, ProtocolConfig,
                            Reply, SendToPeer, TurnServer)

log = logging.getLogger("turnd")

TCP_IDLE_TIMEOUT = 300.0
SWEEP_INTERVAL = 5.0  # frees ports and sockets; the hot path checks expiry itself


@attrs.define
class Running:
    """What ``serve`` hands to ``task_status.started``: bound addresses and the state."""
    udp: list[tuple[str, int]]
    tcp: list[tuple[str, int]]
    core: TurnServer
    stats: relay.RelayStats
    tcp_stats: dict[str, int]


class SocketBinder:
    """The core's RelayBinder seam: real non-blocking UDP sockets."""

    def bind(self, ip: str, port: int, dont_fragment: bool):
        try:
            return open_relay_socket(ip, port, dont_fragment)
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                log.warning("cannot bind relay %s port %d: %s", ip, port, exc.strerror)
            return None


def make_core(config: Config, listen: tuple = ()) -> TurnServer:
    """The sans-I/O core for ``config``; ``listen``: the bound (ip, port) endpoints."""
    backends = []
    if config.auth.users:
        backends.append(StaticUsers(dict(config.auth.users), config.server.realm))
    if config.auth.secrets:
        backends.append(RestSecrets(config.auth.secrets))
    credentials = AnyOf(*backends) if backends else None
    limits = config.limits
    pconfig = ProtocolConfig(
        realm=config.server.realm, software=config.server.software,
        listen=listen or tuple((ep.host, ep.port) for ep in config.server.listen),
        relay_addresses=config.relay_addresses(), external=config.relay.external,
        port_range=config.relay.ports, default_family=config.relay.default_family,
        max_lifetime=limits.max_lifetime, nonce_lifetime=config.auth.nonce_lifetime,
        user_quota=limits.user_quota, total_quota=limits.total_quota,
        channel_max=0x7FFF if config.relay.legacy_channel_numbers else 0x4FFF)
    return TurnServer(pconfig, credentials=credentials,
                      policy=PeerPolicy(config.peers.allow, config.peers.deny),
                      binder=SocketBinder(), nonce_secret=secrets.token_bytes(32))


class Shell:
    def __init__(self, config: Config, core: TurnServer):
        self.config = config
        self.core = core
        self.stats = relay.RelayStats()
        self.forwarder = relay.Forwarder(core, self.stats)
        self.tcp_stats = {"connections": 0, "closed_not_stun": 0}
        # UDP listen socket address -> {client (ip, port): allocation}
        self.udp_clients: dict[tuple, dict] = {}
        self.relay_scopes: dict[int, list[trio.CancelScope]] = {}
        self.nursery: trio.Nursery | None = None
        self.internal_errors = 0
        self._last_error_log = float("-inf")
        # Wall-clock seconds, advanced by trio's clock (so autojump_clock drives expiry too).
        self._wall_offset = time.time() - trio.current_time()

    def now(self) -> float:
        return trio.current_time() + self._wall_offset

    # --- carrying out the core's actions ---------------------------------------------

    def execute(self, actions: list, sock: socket.socket | None, addr) -> None:
        for action in actions:
            if isinstance(action, Reply):
                relay.send_or_drop(sock, action.data, addr, self.stats)
            elif isinstance(action, SendToPeer):
                self.forwarder.to_peer(action.relay, action.peer, action.data, self.now())
            elif isinstance(action, AllocationCreated):
                self._start_relaying(action.alloc, sock, addr)
            elif isinstance(action, AllocationDeleted):
                self._stop_relaying(action.alloc)

    def _start_relaying(self, alloc, sock, addr) -> None:
        alloc.client_handle = (sock, addr)
        self.udp_clients[alloc.five_tuple.server][alloc.five_tuple.client] = alloc
        scopes = self.relay_scopes[id(alloc)] = []
        for r in alloc.relays.values():
            scope = trio.CancelScope()
            scopes.append(scope)
            self.nursery.start_soon(self._relay_task, r, scope)
        log.debug("allocation for %r: relays %s", alloc.username,
                  [r.address for r in alloc.relays.values()])

    def _stop_relaying(self, alloc) -> None:
        self.udp_clients.get(alloc.five_tuple.server, {}).pop(alloc.five_tuple.client, None)
        for scope in self.relay_scopes.pop(id(alloc), ()):
            scope.cancel()

    async def _relay_task(self, r, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await relay.relay_loop(r, self.forwarder, self.now)
        finally:
            r.handle.close()

    # --- the slow path and the other tasks -----------------------------------------------

    def udp_slow_path(self, server: tuple, data: bytes, addr, sock: socket.socket) -> None:
        ft = FiveTuple("udp", addr, server)
        try:
            actions = self.core.handle_untrusted(data, ft, self.now())
        except Exception:  # a bug, not bad input: never let it stop the other clients
            self._internal_error()
            return
        self.execute(actions, sock, addr)

    def _internal_error(self) -> None:
        self.internal_errors += 1
        now = trio.current_time()
        if now - self._last_error_log >= 60:
            self._last_error_log = now
            log.exception("internal error handling a request (%d so far); request dropped",
                          self.internal_errors)

    async def sweeper(self) -> None:
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            self.execute(self.core.expire(self.now()), None, None)

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
    udp_addrs = [local_address(s) for s in udp_socks]
    tcp_addrs = [local_address(s) for s in tcp_socks]
    shell = Shell(config, make_core(config, tuple(udp_addrs + tcp_addrs)))
    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in tcp_socks]
    try:
        async with trio.open_nursery() as nursery:
            shell.nursery = nursery
            for sock, server in zip(udp_socks, udp_addrs):
                clients = shell.udp_clients.setdefault(server, {})
                nursery.start_soon(relay.listener_loop, sock, clients, shell.forwarder,
                                   functools.partial(shell.udp_slow_path, server), shell.now,
                                   (shell.core.config.channel_max >> 8) + 1)
            nursery.start_soon(trio.serve_listeners, shell.tcp_connection, listeners)
            nursery.start_soon(shell.sweeper)
            running = Running(udp=udp_addrs, tcp=tcp_addrs,
                              core=shell.core, stats=shell.stats, tcp_stats=shell.tcp_stats)
            task_status.started(running)
    finally:
        for s in udp_socks:
            s.close()
        for listener in listeners:
            listener.socket.close()
        for alloc in list(shell.core.allocations.values()):
            for r in alloc.relays.values():
                r.handle.close()


async def run(config: Config) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(serve, config)
            for transport, addrs in (("udp", running.udp), ("tcp", running.tcp)):
                for host, port in addrs:
                    log.info("listening on %s %s", transport,
                             f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            if not config.auth.users and not config.auth.secrets:
                log.info("no [auth] users or secrets: serving STUN only, TURN requests get 401")
            async for signum in signals:
                log.info("received %s, stopping", signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()
    log.info("stopped")
