"""The trio shell: opens sockets, starts the loops, carries out the core's
actions, sweeps expiries, and stops everything on cancellation.  One place
starts things (``serve``), one stops them (its nursery's cancel scope).

No client can stop or stall the daemon: every per-client task and loop is
guarded (a bug drops that packet or connection, is counted and logged at
most once a minute), and everything a client can make turnd hold is capped
(``[limits]``; see README).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import mmap
import resource
import secrets
import signal
import socket
import time

import attrs
import trio

from . import relay
from .auth import AnyOf, RestSecrets, StaticUsers
from .config import Config
from .sockets import (StartupError, host_addresses, local_address, open_relay_socket,
                      open_socket)
from .stun.errors import StunDecodeError
from .stun.framing import StreamFramer
from .turn.policy import PeerPolicy
from .turn.registry import LiveRelays
from .turn.protocol import (AllocationCreated, AllocationDeleted, BindFailed, FiveTuple,
                            PortBusy, ProtocolConfig, Refused, Reply, SendToPeer, TurnServer,
                            client_key)

log = logging.getLogger("turnd")

SWEEP_INTERVAL = 1.0  # frees ports and sockets; the hot path checks expiry itself
ACCEPT_BATCH = 64
FILES_RESERVED = 128  # file descriptors kept for listen sockets, logs, the event loop
# accept() errors that mean "out of resources for now": wait a little, don't spin.
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# bind() errors that mean the port is someone else's: try another port, retry this later.
_PORT_BUSY_ERRNOS = {errno.EADDRINUSE, errno.EACCES}


class RateLimitedLog:
    """At most one line per kind of event per ``interval`` seconds, saying how many
    were not logged meanwhile: a flood of bad input can't flood the log."""

    def __init__(self, interval: float = 60.0):
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, kind: str, level: int, message: str, *args, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, float("-inf")) < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        more = self._suppressed.pop(kind, 0)
        if more:
            message += f" ({more} more since the last such line)"
        log.log(level, message, *args, exc_info=exc_info)


@attrs.define
class Running:
    """What ``serve`` hands to ``task_status.started``: bound addresses and the state."""
    udp: list[tuple[str, int]]
    tcp: list[tuple[str, int]]
    core: TurnServer
    stats: relay.RelayStats
    tcp_stats: dict[str, int]
    shell: "Shell"


class SocketBinder:
    """The core's RelayBinder seam: real non-blocking UDP sockets, served by the engine."""

    def __init__(self, log_limited: RateLimitedLog):
        self.log_limited = log_limited
        self.engine: relay.RelayEngine | None = None  # set once the engine exists

    def bind(self, ip: str, port: int, dont_fragment: bool):
        try:
            return open_relay_socket(ip, port, dont_fragment)
        except OSError as exc:
            if exc.errno in _PORT_BUSY_ERRNOS:
                raise PortBusy() from None
            self.log_limited("bind", logging.WARNING, "cannot bind relay %s port %d: %s; "
                             "the Allocate gets 508", ip, port, exc.strerror or exc)
            raise BindFailed() from None

    def unbind(self, sock: socket.socket) -> None:
        if self.engine is not None:
            self.engine.remove(sock)
        sock.close()


@attrs.frozen
class WorkerSpec:
    """What a worker process is handed by its master (``turnd serve --worker JSON``)."""
    index: int
    count: int
    udp: tuple[int, ...]   # file descriptors of its listen sockets (SO_REUSEPORT)
    tcp: tuple[int, ...]
    shared: int            # a memfd: the nonce secret, then the live-relay bitmap

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "WorkerSpec":
        d = json.loads(text)
        return cls(d["index"], d["count"], tuple(d["udp"]), tuple(d["tcp"]), d["shared"])


SECRET_SIZE = 32


def shared_size(config: Config) -> int:
    return SECRET_SIZE + LiveRelays.size(len(config.relay_addresses()))


def worker_ports(ports: tuple[int, int], index: int, count: int) -> tuple[int, int]:
    """Worker ``index`` of ``count`` relays on its own slice of the relay port range."""
    low, high = ports
    per = (high - low + 1) // count
    first = low + index * per
    return first, high if index == count - 1 else first + per - 1


def make_core(config: Config, listen: tuple = (), binder=None, *, port_range=None,
              nonce_secret: bytes | None = None, live_buffer=None) -> TurnServer:
    """The sans-I/O core for ``config``; ``listen``: the bound (ip, port) endpoints; a
    worker passes its slice of the port range, the shared secret and the shared bitmap."""
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
        port_range=port_range or config.relay.ports, default_family=config.relay.default_family,
        max_lifetime=limits.max_lifetime, nonce_lifetime=config.auth.nonce_lifetime,
        user_quota=limits.user_quota, total_quota=limits.total_quota,
        channel_max=0x7FFF if config.relay.legacy_channel_numbers else 0x4FFF,
        max_attributes=limits.max_attributes, ip_quota=limits.ip_quota,
        permissions_per_allocation=limits.permissions_per_allocation,
        channels_per_allocation=limits.channels_per_allocation,
        unauth_rate=limits.unauthenticated_rate, host_addresses=host_addresses())
    live = LiveRelays(pconfig.relay_addresses, dict(pconfig.external), live_buffer)
    if live_buffer is not None:  # a (re)started worker: its slice holds no live relay yet
        live.clear(*pconfig.port_range)
    return TurnServer(pconfig, credentials=credentials,
                      policy=PeerPolicy(config.peers.allow, config.peers.deny), binder=binder,
                      nonce_secret=nonce_secret or secrets.token_bytes(SECRET_SIZE), live=live)


class Shell:
    def __init__(self, config: Config, listen: tuple, now_fn=None, **core_args):
        """``now_fn``: wall-clock seconds; by default trio's clock (so autojump_clock
        drives expiry too) plus the wall time at start."""
        self.config = config
        if now_fn is not None:
            self.now = now_fn
        self.log_limited = RateLimitedLog()
        binder = SocketBinder(self.log_limited)
        self.core = make_core(config, listen, binder, **core_args)
        self.stats = relay.RelayStats()
        self.forwarder = relay.Forwarder(self.core, self.stats)
        self.engine = binder.engine = relay.RelayEngine(self.forwarder, self.now,
                                                        self.internal_error)
        self.tcp_stats = {"connections": 0, "open": 0, "closed_not_stun": 0, "closed_idle": 0,
                          "closed_reset": 0, "refused_per_ip": 0, "refused_total": 0,
                          "accept_errors": 0}
        self.tcp_per_ip: dict[str, int] = {}  # by client_key: IPv4 address, IPv6 /64
        self.tcp_cap = tcp_cap(config)
        self.internal_errors = 0
        if now_fn is None:
            self._wall_offset = time.time() - trio.current_time()

    def now(self) -> float:
        return trio.current_time() + self._wall_offset

    def internal_error(self) -> None:
        """Call inside ``except``: a bug hit one packet or connection; count and log it."""
        self.internal_errors += 1
        self.log_limited("internal", logging.ERROR,
                         "internal error (%d so far); that packet or connection was dropped",
                         self.internal_errors, exc_info=True)

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
            elif isinstance(action, Refused):
                self.log_limited(f"refused {action.kind}", logging.WARNING, "refused with %d: %s",
                                 action.code, action.note)

    def _start_relaying(self, alloc, sock, addr) -> None:
        alloc.client_handle = self.engine.add_client(sock, addr, alloc)
        for r in alloc.relays.values():
            self.engine.add_relay(r)

    def _stop_relaying(self, alloc) -> None:
        # The core has removed and closed the relay sockets already (binder.unbind).
        if alloc.client_handle is not None:
            self.engine.remove_client(alloc.client_handle)

    # --- the slow path and the other tasks -----------------------------------------------

    def udp_slow_path(self, server: tuple, data: bytes, addr, sock: socket.socket) -> None:
        ft = FiveTuple("udp", addr, server)
        try:
            actions = self.core.handle_untrusted(data, ft, self.now())
            self.execute(actions, sock, addr)
        except Exception:  # a bug, not bad input: never let it stop the other clients
            self.internal_error()

    async def sweeper(self) -> None:
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            while True:
                try:
                    self.execute(self.core.expire(self.now()), None, None)
                except Exception:
                    self.internal_error()
                    break
                if not self.core.sweep_pending:
                    break
                await trio.lowlevel.checkpoint()  # bounded work, then let the relay run

    # --- TCP -----------------------------------------------------------------------------

    async def accept_loop(self, lsock: socket.socket, nursery: trio.Nursery) -> None:
        """Accept connections on a listening TCP socket, within the connection caps."""
        while True:
            await trio.lowlevel.wait_readable(lsock)
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, addr = lsock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                        self.tcp_stats["accept_errors"] += 1
                        self.log_limited("accept", logging.WARNING,
                                         "cannot accept TCP connections: %s", exc.strerror)
                        await trio.sleep(0.1)
                        break
                    continue  # ECONNABORTED and the like: that connection is gone already
                self._admit(conn, addr, nursery)
            else:
                await trio.lowlevel.checkpoint()

    def _admit(self, conn: socket.socket, addr, nursery: trio.Nursery) -> None:
        limits = self.config.limits
        key = client_key(addr[0])
        refused = None
        if self.tcp_stats["open"] >= self.tcp_cap:
            refused = "refused_total", (f"{self.tcp_cap} are open (limits.tcp_connections, or "
                                        "what the open-files limit leaves)")
        elif self.tcp_per_ip.get(key, 0) >= limits.tcp_connections_per_ip:
            refused = "refused_per_ip", (f"a client address has limits.tcp_connections_per_ip "
                                         f"({limits.tcp_connections_per_ip}) open")
        if refused is not None:
            self.tcp_stats[refused[0]] += 1
            self.log_limited(refused[0], logging.WARNING, "TCP connection refused: %s", refused[1])
            conn.close()
            return
        self.tcp_stats["connections"] += 1
        self.tcp_stats["open"] += 1
        self.tcp_per_ip[key] = self.tcp_per_ip.get(key, 0) + 1
        conn.setblocking(False)
        nursery.start_soon(self.tcp_connection, conn, (addr[0], addr[1]), key)

    async def tcp_connection(self, conn: socket.socket, client: tuple, key: str) -> None:
        try:
            await self._serve_stream(conn, client)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            self.tcp_stats["closed_reset"] += 1  # the client went away: nothing to report
        except Exception:
            self.internal_error()
        finally:
            conn.close()
            self.tcp_stats["open"] -= 1
            n = self.tcp_per_ip[key] - 1
            if n:
                self.tcp_per_ip[key] = n
            else:
                del self.tcp_per_ip[key]

    async def _serve_stream(self, conn: socket.socket, client: tuple) -> None:
        """One TCP connection: framed STUN in, replies out.  It must complete its first
        message within ``tcp_first_message_timeout`` and then a message at least every
        ``tcp_idle_timeout`` seconds (bytes alone don't count: no slowloris); replies are
        written under the same deadline; at most one largest frame is buffered, and every
        frame is followed by a checkpoint, so a client that sends thousands of tiny frames in
        one write takes its turn like everyone else."""
        limits = self.config.limits
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
        ft = FiveTuple("tcp", client, local_address(conn))
        framer = StreamFramer()
        with trio.CancelScope(deadline=trio.current_time() + limits.tcp_first_message_timeout) as idle:
            while True:
                data = await stream.receive_some(framer.room)
                if not data:
                    return
                try:
                    framer.feed(data)
                    del data  # the framer holds the bytes now: keep one copy, not two
                    while (frame := framer.next_frame_untrusted()) is not None:
                        idle.deadline = trio.current_time() + limits.tcp_idle_timeout
                        for action in self.core.handle_untrusted(frame, ft, self.now()):
                            if isinstance(action, Reply):
                                await stream.send_all(action.data)
                            else:
                                self.execute([action], None, None)
                        await trio.lowlevel.checkpoint()
                except StunDecodeError:
                    self.tcp_stats["closed_not_stun"] += 1
                    return
        if idle.cancelled_caught:
            self.tcp_stats["closed_idle"] += 1


def relay_sockets_needed(config: Config) -> int:
    low, high = config.relay.ports
    return (high - low + 1) * len(config.relay_addresses())


def tcp_cap(config: Config) -> int:
    """limits.tcp_connections, or fewer when the open-files limit would otherwise let TCP
    connections take the descriptors that relay sockets need (those come first)."""
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if files == resource.RLIM_INFINITY:
        return config.limits.tcp_connections
    return max(16, min(config.limits.tcp_connections,
                       files - relay_sockets_needed(config) - FILES_RESERVED))


def raise_file_limit() -> int:
    """Raise the soft limit on open files to the hard one; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def open_group(host: str, port: int, count: int = 1) -> tuple[list, list]:
    """``count`` UDP and ``count`` TCP listen sockets of one endpoint (SO_REUSEPORT when
    more than one: one of each per worker).  Port 0 (tests): the first UDP socket picks the
    port and the others take it; if that TCP port is taken, try another."""
    reuse = count > 1
    for attempt in range(20):
        udps, tcps = [open_socket("udp", host, port, reuse)], []
        chosen = port or local_address(udps[0])[1]
        try:
            udps += [open_socket("udp", host, chosen, reuse) for _ in range(count - 1)]
            tcps += [open_socket("tcp", host, chosen, reuse) for _ in range(count)]
            return udps, tcps
        except StartupError:
            for s in udps + tcps:
                s.close()
            if port or attempt == 19:
                raise
    raise AssertionError("unreachable")


async def serve(config: Config, *, worker: WorkerSpec | None = None,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled.  Started with ``nursery.start``, it returns a ``Running``.
    A worker serves the sockets its master opened, on its slice of the relay ports."""
    udp_socks: list[socket.socket] = []
    tcp_socks: list[socket.socket] = []
    core_args: dict = {}
    if worker is None:
        try:
            for ep in config.server.listen:
                udps, tcps = open_group(ep.host, ep.port)
                udp_socks += udps
                tcp_socks += tcps
        except BaseException:
            for s in udp_socks + tcp_socks:
                s.close()
            raise
    else:
        for fd in worker.udp + worker.tcp:
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            (udp_socks if sock.type == socket.SOCK_DGRAM else tcp_socks).append(sock)
        shared = mmap.mmap(worker.shared, shared_size(config))
        core_args = dict(port_range=worker_ports(config.relay.ports, worker.index, worker.count),
                         nonce_secret=bytes(shared[:SECRET_SIZE]),
                         live_buffer=memoryview(shared)[SECRET_SIZE:])
    udp_addrs = [local_address(s) for s in udp_socks]
    tcp_addrs = [local_address(s) for s in tcp_socks]
    shell = Shell(config, tuple(udp_addrs + tcp_addrs), **core_args)
    try:
        async with trio.open_nursery() as nursery:
            for sock, server in zip(udp_socks, udp_addrs):
                shell.engine.add_listener(sock, functools.partial(shell.udp_slow_path, server),
                                          (shell.core.config.channel_max >> 8) + 1)
            nursery.start_soon(shell.engine.run)
            for sock in tcp_socks:
                nursery.start_soon(shell.accept_loop, sock, nursery)
            nursery.start_soon(shell.sweeper)
            running = Running(udp=udp_addrs, tcp=tcp_addrs, core=shell.core, stats=shell.stats,
                              tcp_stats=shell.tcp_stats, shell=shell)
            task_status.started(running)
    finally:
        shell.engine.close()
        for s in udp_socks + tcp_socks:
            s.close()
        for alloc in list(shell.core.allocations.values()):
            for r in alloc.relays.values():
                r.handle.close()


def log_listening(config: Config, udp: list, tcp: list) -> None:
    for transport, addrs in (("udp", udp), ("tcp", tcp)):
        for host, port in addrs:
            log.info("listening on %s %s", transport,
                     f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if not config.auth.users and not config.auth.secrets:
        log.info("no [auth] users or secrets: serving STUN only, TURN requests get 401")


def counters_line(running: Running) -> str:
    """Every non-zero counter, one line (what was relayed, refused, dropped)."""
    parts = {**running.stats.as_dict(), **running.core.stats,
             **{f"tcp_{k}": v for k, v in running.tcp_stats.items()}}
    return " ".join(f"{k}={v}" for k, v in sorted(parts.items()) if v) or "none"


async def run(config: Config, worker: WorkerSpec | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly."""
    files = raise_file_limit()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(functools.partial(serve, config, worker=worker))
            relays = relay_sockets_needed(config)
            if files < relays + FILES_RESERVED:
                log.warning("only %d open files allowed (RLIMIT_NOFILE): fewer than the %d relay "
                            "ports need; allocations past that get 508. Raise LimitNOFILE or "
                            "ulimit -n.", files, relays)
            if running.shell.tcp_cap < config.limits.tcp_connections:
                log.info("TCP connections capped at %d, below limits.tcp_connections (%d): "
                            "of the %d open files allowed, %d are kept for relay sockets",
                            running.shell.tcp_cap, config.limits.tcp_connections, files, relays)
            if worker is None:  # (a master says it for its workers)
                log_listening(config, running.udp, running.tcp)
            async for signum in signals:
                log.info("received %s, stopping", signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()
    log.info("stopped; counters: %s", counters_line(running))
