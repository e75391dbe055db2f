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
import gc
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
from .config import Config, ConfigError
from .sockets import (SOCKET_BUFFER, StartupError, host_addresses, local_address,
                      open_relay_socket, open_socket, set_buffers)
from .fdstore import name_of
from .logs import address_text, client_text
from .streams import StreamServer
from .turn.policy import PeerPolicy
from .turn.registry import LiveRelays
from .turn.protocol import (AllocationCreated, AllocationDeleted, AllocationRefreshed,
                            BindFailed, FiveTuple,
                            PortBusy, ProtocolConfig, Refused, Reply, SendToPeer, TurnServer,
                            client_key, user_for_logs)

log = logging.getLogger("turnd")

SWEEP_INTERVAL = 1.0  # frees ports and sockets; the hot path checks expiry itself
FILES_RESERVED = 128  # file descriptors kept for listen sockets, logs, the event loop
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
    tls: list[tuple[str, int]] = attrs.Factory(list)
    metrics: tuple[str, int] | None = None
    shared: object = None  # a worker's shared memory with its master


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
    tls: tuple[int, ...] = ()  # its tls_listen sockets

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "WorkerSpec":
        d = json.loads(text)
        return cls(d["index"], d["count"], tuple(d["udp"]), tuple(d["tcp"]), d["shared"],
                   tuple(d.get("tls", ())))


SECRET_SIZE = 32


def shared_size(config: Config) -> int:
    """The workers' shared memory: the nonce secret, the live-relay bitmap, and a metrics
    slot per worker."""
    return flags_offset(config) + 8


def flags_offset(config: Config) -> int:
    """A byte after the metrics slots: 1 while the master drains (a worker that starts, or
    missed the signal while starting, reads it)."""
    from .metrics import SLOT_SIZE
    return metrics_offset(config) + config.server.workers * SLOT_SIZE


def metrics_offset(config: Config) -> int:
    return SECRET_SIZE + LiveRelays.size(len(config.relay_addresses()))


def worker_ports(ports: tuple[int, int], index: int, count: int) -> tuple[int, int]:
    """Worker ``index`` of ``count`` relays on its own slice of the relay port range."""
    low, high = ports
    per = (high - low + 1) // count
    first = low + index * per
    return first, high if index == count - 1 else first + per - 1


def core_settings(config: Config, listen: tuple = (), port_range=None) -> tuple:
    """(ProtocolConfig, credentials, PeerPolicy) for ``config``: what ``make_core`` builds
    the core from and what a reload hands it (``TurnServer.reconfigure``)."""
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
    return pconfig, credentials, PeerPolicy(config.peers.allow, config.peers.deny)


def make_core(config: Config, listen: tuple = (), binder=None, *, port_range=None,
              nonce_secret: bytes | None = None, live_buffer=None) -> TurnServer:
    """The sans-I/O core for ``config``; ``listen``: the bound (ip, port) endpoints; a
    worker passes its slice of the port range, the shared secret and the shared bitmap."""
    pconfig, credentials, policy = core_settings(config, listen, port_range)
    live = LiveRelays(pconfig.relay_addresses, dict(pconfig.external), live_buffer)
    if live_buffer is not None:  # a (re)started worker: its slice holds no live relay yet
        live.clear(*pconfig.port_range)
    core = TurnServer(pconfig, credentials=credentials, policy=policy, binder=binder,
                      nonce_secret=nonce_secret or secrets.token_bytes(SECRET_SIZE), live=live)
    return core


def draining_answer(config: Config) -> tuple:
    """What a draining core answers new Allocates with: ALTERNATE-SERVER's (ip, port) for a
    300, or () for a 403."""
    alt = config.server.alternate
    return (alt.host, alt.port) if alt else ()


class UdpOrigin:
    """Where a UDP request came from: replies go back there, and an allocation made there
    is the engine's to relay for (``execute``)."""

    __slots__ = ("shell", "sock", "addr")

    def __init__(self, shell: "Shell", sock: socket.socket, addr: tuple):
        self.shell, self.sock, self.addr = shell, sock, addr

    def reply(self, data: bytes) -> None:
        relay.send_or_drop(self.sock, data, self.addr, self.shell.stats)

    def attach(self, alloc) -> relay.UdpClient:
        return self.shell.engine.add_client(self.sock, self.addr, alloc)


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
        self.streams = StreamServer(self)
        self.streams.cap = tcp_cap(config)
        self.tcp_stats = self.streams.stats
        self.internal_errors = 0
        # packets and bytes (to peers, to clients) of allocations that have ended: the metrics
        # add the live ones' to these
        self.closed_traffic = [0, 0, 0, 0]
        self.first_run_secrets: tuple = ()  # make run's REST secret, kept across reloads
        self.handed_over: set = set()  # ids of the allocations a successor took (handover.py)
        self.successor: int | None = None  # its pid
        self.fdstore = None  # under systemd: turnd/fdstore.py
        self.listen_sockets: dict = {}
        self.metrics_socket = None
        if now_fn is None:
            self._wall_offset = time.time() - trio.current_time()

    def now(self) -> float:
        return trio.current_time() + self._wall_offset

    async def io_tasks(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Everything that reads the sockets: the relay engine, the accept loops, the sweep.
        ``pause`` stops them (a hand-over), ``resume`` starts them again."""
        self.io_stopped = trio.Event()
        try:
            with trio.CancelScope() as self.io_scope:
                async with trio.open_nursery() as io:
                    io.start_soon(self.engine.run)
                    for socks, tls in self.io_sockets:
                        for sock in socks:
                            io.start_soon(self.streams.accept_loop, sock, tls, self.nursery)
                    io.start_soon(self.sweeper)
                    task_status.started()
        finally:
            self.io_stopped.set()

    async def pause(self) -> None:
        """Stop reading every socket; returns once nothing reads (a task already woken
        finishes its batch first, so nothing changes the state after this)."""
        self.io_scope.cancel()
        await self.io_stopped.wait()

    def resume(self) -> None:
        self.nursery.start_soon(self.io_tasks)

    def reconfigure(self, config: Config) -> None:
        """A reload: the limits and proxies of TCP/TLS connections from now on."""
        self.config = config
        self.streams.reconfigure(config)

    def internal_error(self) -> None:
        """Call inside ``except``: a bug hit one packet or connection; count and log it."""
        self.internal_errors += 1
        self.log_limited("internal", logging.ERROR,
                         "internal error (%d so far); that packet or connection was dropped",
                         self.internal_errors, exc_info=True)

    # --- carrying out the core's actions ---------------------------------------------

    def execute(self, actions: list, origin) -> None:
        """Carry out the core's actions, for every transport.  ``origin``: where the
        request came from (a ``UdpOrigin`` or a ``relay.StreamClient``): it takes the
        replies, and the client of an allocation made there; None for the sweeper."""
        for action in actions:
            if isinstance(action, Reply):
                origin.reply(action.data)
            elif isinstance(action, SendToPeer):
                alloc = action.relay.alloc
                alloc.up_packets += 1
                alloc.up_bytes += len(action.data)
                self.forwarder.to_peer(action.relay, action.peer, action.data, self.now())
            elif isinstance(action, AllocationCreated):
                action.alloc.client_handle = origin.attach(action.alloc)
                for r in action.alloc.relays.values():
                    self.engine.add_relay(r)
                if self.fdstore is not None:
                    for r in action.alloc.relays.values():
                        self.fdstore.store(name_of("relay", r.address), r.handle.fileno())
                self.log_allocation("created", action.alloc,
                                    lifetime=round(action.alloc.expires - action.alloc.created))
            elif isinstance(action, AllocationRefreshed):
                self.log_allocation("refreshed", action.alloc, lifetime=action.lifetime)
            elif isinstance(action, AllocationDeleted):
                a = action.alloc
                if self.fdstore is not None:
                    for r in a.relays.values():
                        self.fdstore.remove(name_of("relay", r.address))
                    self.fdstore.changed()
                t = self.closed_traffic
                t[0] += a.up_packets
                t[1] += a.up_bytes
                t[2] += a.down_packets
                t[3] += a.down_bytes
                self.log_allocation(action.reason, a, seconds=round(self.now() - a.created),
                                    to_peers_packets=a.up_packets, to_peers_bytes=a.up_bytes,
                                    to_client_packets=a.down_packets, to_client_bytes=a.down_bytes)
                # The core has removed and closed the relay sockets already (binder.unbind).
                client = action.alloc.client_handle
                if isinstance(client, relay.UdpClient):
                    self.engine.remove_client(client)
                elif client is not None and client.alloc is action.alloc:
                    client.alloc = None
            elif isinstance(action, Refused):
                self.log_limited(f"refused {action.kind}", logging.WARNING, "refused with %d: %s",
                                 action.code, action.note)

    def log_allocation(self, event: str, alloc, **more) -> None:
        """One line per allocation event (never per packet): user, client (as much of it as
        ``[log] client_addresses`` allows), transport, relayed addresses, and ``more``."""
        self.log_allocation_of(event, alloc.username, alloc.five_tuple,
                               [r.advertised for r in alloc.relays.values()], **more)

    def log_allocation_of(self, event: str, username: str, ft, relays: list, **more) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        fields = {"user": user_for_logs(username),
                  "client": client_text(ft.client, self.config.log.client_addresses),
                  "transport": ft.transport, "relay": ",".join(map(address_text, relays)),
                  **more}
        log.info("allocation %s", event, extra={"fields": fields})

    # --- the slow path and the other tasks -----------------------------------------------

    def udp_slow_path(self, server: tuple, data: bytes, addr, sock: socket.socket) -> None:
        ft = FiveTuple("udp", addr, server)
        try:
            actions = self.core.handle_untrusted(data, ft, self.now())
            self.execute(actions, UdpOrigin(self, sock, addr))
            if self.fdstore is not None:
                self.fdstore.changed()  # (per request, not per relayed packet: a flag)
        except Exception:  # a bug, not bad input: never let it stop the other clients
            self.internal_error()

    async def sweeper(self) -> None:
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            while True:
                try:
                    self.execute(self.core.expire(self.now()), None)
                except Exception:
                    self.internal_error()
                    break
                if not self.core.sweep_pending:
                    break
                await trio.lowlevel.checkpoint()  # bounded work, then let the relay run


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


def open_stream_group(host: str, port: int, count: int = 1) -> list:
    """``count`` TCP listen sockets of a tls_listen endpoint (SO_REUSEPORT when more than
    one).  Port 0 (tests): the first picks a free port and the others take it."""
    socks = [open_socket("tcp", host, port, count > 1)]
    try:
        chosen = port or local_address(socks[0])[1]
        socks += [open_socket("tcp", host, chosen, True) for _ in range(count - 1)]
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


async def serve(config: Config, *, worker: WorkerSpec | None = None, adopted=None,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled.  Started with ``nursery.start``, it returns a ``Running``.
    A worker serves the sockets its master opened, on its slice of the relay ports; a
    successor (``adopted``, turnd/handover.py) those and the allocations its predecessor
    handed over."""
    udp_socks: list[socket.socket] = []
    tcp_socks: list[socket.socket] = []
    tls_socks: list[socket.socket] = []
    core_args: dict = {}
    tls_context = load_tls(config)
    metrics_listener = None
    shared = None
    handed = None
    if adopted is not None:
        from .handover import listen_sockets
        handed = listen_sockets(adopted)
        core_args = dict(nonce_secret=bytes.fromhex(adopted.state["nonce_secret"]))
    if worker is None:
        try:
            for ep in config.server.listen:
                udps, tcps = _take(handed, "udp", ep), _take(handed, "tcp", ep)
                if not udps or not tcps:
                    for s in udps + tcps:
                        s.close()
                    udps, tcps = open_group(ep.host, ep.port)
                udp_socks += udps
                tcp_socks += tcps
            for ep in config.server.tls_listen:
                tls_socks += _take(handed, "tls", ep) or open_stream_group(ep.host, ep.port)
        except BaseException:
            for s in udp_socks + tcp_socks + tls_socks:
                s.close()
            raise
        finally:
            for kind in ("udp", "tcp", "tls"):  # handed over, but no longer in the config
                for s in (handed or {}).get(kind, ()):
                    s.close()
    else:
        for fds, socks in ((worker.udp, udp_socks), (worker.tcp, tcp_socks), (worker.tls, tls_socks)):
            for fd in fds:
                sock = socket.socket(fileno=fd)
                sock.setblocking(False)
                socks.append(sock)
        shared = mmap.mmap(worker.shared, shared_size(config))
        core_args = dict(port_range=worker_ports(config.relay.ports, worker.index, worker.count),
                         nonce_secret=bytes(shared[:SECRET_SIZE]),
                         live_buffer=memoryview(shared)[SECRET_SIZE:metrics_offset(config)])
    for s in udp_socks:  # (adopted ones too: a raised net.core.rmem_max takes effect)
        set_buffers(s, SOCKET_BUFFER)
    udp_addrs = [local_address(s) for s in udp_socks]
    tcp_addrs = [local_address(s) for s in tcp_socks]
    tls_addrs = [local_address(s) for s in tls_socks]
    shell = Shell(config, tuple(udp_addrs + tcp_addrs + tls_addrs), **core_args)
    shell.streams.tls_context = tls_context
    shell.streams.page_ports = {"udp": udp_addrs[0][1] if udp_addrs else None,
                                "tcp": tcp_addrs[0][1] if tcp_addrs else None,
                                "tls": tls_addrs[0][1] if tls_addrs else None}
    if config.metrics.listen and worker is None:
        from .metrics import open_listener
        try:
            m = handed.pop("metrics", None) if handed else None
            if m is not None and _same(local_address(m), config.metrics.listen):
                metrics_listener = trio.SocketListener(trio.socket.from_stdlib_socket(m))
            else:
                if m is not None:
                    m.close()
                metrics_listener = open_listener(config.metrics.listen)
        except BaseException:
            shell.engine.close()
            for s in udp_socks + tcp_socks + tls_socks:
                s.close()
            raise
    shell.listen_sockets = {"udp": udp_socks, "tcp": tcp_socks, "tls": tls_socks}
    shell.metrics_socket = metrics_listener.socket if metrics_listener is not None else None
    try:
        async with trio.open_nursery() as nursery:
            for sock, server in zip(udp_socks, udp_addrs):
                shell.engine.add_listener(sock, functools.partial(shell.udp_slow_path, server),
                                          (shell.core.config.channel_max >> 8) + 1)
            shell.nursery = shell.streams.nursery = nursery
            if adopted is not None:
                adopt_allocations(shell, adopted, dict(zip(udp_addrs, udp_socks)))
            if worker is None:
                replay_early(shell, udp_socks)
            shell.io_sockets = ((tcp_socks, False), (tls_socks, True))
            nursery.start_soon(trio.sleep_forever)  # serving lasts while paused too
            await nursery.start(shell.io_tasks)
            running = Running(udp=udp_addrs, tcp=tcp_addrs, core=shell.core, stats=shell.stats,
                              tcp_stats=shell.tcp_stats, shell=shell, tls=tls_addrs, shared=shared)
            if metrics_listener is not None:
                from .metrics import Admin, registry_for, serve_http, snapshot
                running.metrics = local_address(metrics_listener.socket)
                registry = registry_for(lambda: {"": snapshot(running)}, time.time())
                nursery.start_soon(serve_http, metrics_listener, registry,
                                   Admin(running, config.metrics.admin_token_file))
            elif shared is not None and config.metrics.listen:
                from .metrics import SLOT_SIZE, publish
                view = memoryview(shared)[metrics_offset(config):]
                nursery.start_soon(publish, running, view[:config.server.workers * SLOT_SIZE],
                                   worker.index)
            task_status.started(running)
    finally:
        for alloc in list(shell.core.allocations.values()):  # each call's totals, logged once
            if alloc.id in shell.handed_over:
                continue  # the successor has it
            shell.log_allocation("stopped", alloc, seconds=round(shell.now() - alloc.created),
                                 to_peers_packets=alloc.up_packets, to_peers_bytes=alloc.up_bytes,
                                 to_client_packets=alloc.down_packets,
                                 to_client_bytes=alloc.down_bytes)
        shell.engine.close()
        for s in udp_socks + tcp_socks + tls_socks:
            s.close()
        if metrics_listener is not None:
            metrics_listener.socket.close()
        for alloc in list(shell.core.allocations.values()):
            for r in alloc.relays.values():
                r.handle.close()


def _same(addr: tuple, ep) -> bool:
    """Is the socket bound at ``addr`` the config's endpoint ``ep`` (port 0: any)?"""
    return addr[0] == ep.host and (ep.port == 0 or addr[1] == ep.port)


def _take(handed: dict | None, kind: str, ep) -> list:
    """The handed-over listen sockets of ``kind`` bound at ``ep`` (taken out of ``handed``)."""
    if not handed:
        return []
    found = [s for s in handed[kind] if _same(local_address(s), ep)]
    handed[kind] = [s for s in handed[kind] if s not in found]
    return found


def adopt_allocations(shell: "Shell", adopted, listeners: dict) -> None:
    """A successor takes over its predecessor's allocations with their relay sockets; those
    that no longer fit this config are ended (their sockets closed) and logged."""
    from .handover import connection_sockets, relay_sockets
    from .turn.protocol import FiveTuple
    from .turn.state import import_allocation
    socks = relay_sockets(adopted)
    now = shell.now()
    ended = 0
    pos = 0
    adopted_allocs = []
    for entry in adopted.state["allocations"]:
        n = len(entry["relays"])
        mine, pos = socks[pos:pos + n], pos + n
        server = tuple(entry["server"])
        listener = listeners.get(server)
        ft = FiveTuple(entry["transport"], tuple(entry["client"]), server)
        alloc = None
        if listener is not None or entry["transport"] == "tcp":
            alloc = import_allocation(shell.core, entry, mine, now, ft)
        adopted_allocs.append(alloc)
        if alloc is None:
            ended += 1
            for s in mine:
                s.close()
            up_packets, up_bytes, down_packets, down_bytes = entry["counters"]
            shell.log_allocation_of(
                "ended", entry["user"], ft, [tuple(r) for r in entry["relays"]],
                reason="no longer fits this config (listen address or relay.ports)",
                seconds=round(float(entry["age"])), to_peers_packets=up_packets,
                to_peers_bytes=up_bytes, to_client_packets=down_packets,
                to_client_bytes=down_bytes)
            continue
        if entry["transport"] == "udp":
            alloc.client_handle = UdpOrigin(shell, listener, ft.client).attach(alloc)
            for r in alloc.relays.values():
                shell.engine.add_relay(r)
    # plain TCP connections, where the predecessor left them (their relays: when they start)
    for conn, entry in zip(connection_sockets(adopted), adopted.state.get("connections", [])):
        index = entry["alloc"]
        shell.streams.adopt(conn, entry, adopted_allocs[index] if index is not None else None)
    stats = shell.core.stats
    for key, n in (("allocations_adopted", sum(a is not None for a in adopted_allocs)),
                   ("allocations_not_adopted", ended)):
        if n:
            stats[key] = stats.get(key, 0) + n
    log.info("restart: adopted %d allocations%s", len(shell.core.allocations),
             f"; {ended} no longer fit this config (listen address or relay.ports) and ended"
             if ended else "")


REPLAY_SECONDS = 2.0  # catching up on what turnd/early.py read, at most: the rest is dropped
REPLAY_CHUNK = 1024   # datagrams between looks at the clock


def replay_early(shell: "Shell", udp_socks: list) -> None:
    """What turnd/early.py read from systemd's listen sockets while this turnd started,
    served now through the engine, before it reads the sockets itself.  The reader goes on
    while the engine catches up (so the kernel's buffers never fill), and stops when little
    is left, or when REPLAY_SECONDS are up (a flood: what is left is dropped)."""
    from . import early
    reader = early.reader()
    if reader is None:
        return
    socks = {s.fileno(): s for s in udp_socks}
    served = rounds = late = 0
    deadline = time.monotonic() + REPLAY_SECONDS
    try:
        while True:
            got = reader.take_some()
            last = sum(map(len, got.values())) < 64 or time.monotonic() > deadline
            if last:
                rest = reader.stop()
                got = {fd: got.get(fd, []) + rest.get(fd, []) for fd in rest}
            for fd, datagrams in got.items():
                if not datagrams or fd not in socks:  # (a listen address the config dropped)
                    continue
                for i in range(0, len(datagrams), REPLAY_CHUNK):
                    if time.monotonic() > deadline:
                        late += len(datagrams) - i
                        break
                    chunk = datagrams[i:i + REPLAY_CHUNK]
                    shell.engine.replay(socks[fd], chunk, shell.now())
                    served += len(chunk)
            rounds += 1
            if last:
                break
    except Exception:  # a bug: those datagrams are lost, the daemon serves
        shell.internal_error()
        reader.stop()
    log.info("restart: %d datagrams that arrived while this turnd started were read early and "
             "served now (%d rounds)%s%s", served, rounds,
             f"; reading stopped at {early.LIMIT_BYTES >> 20} MiB held (a flood?)"
             if reader.full else "",
             f"; {late} dropped, later than {REPLAY_SECONDS:.0f} s (a flood?)" if late else "")


def load_tls(config: Config):
    """The TLS server context, when [tls] has a certificate (else None)."""
    if not config.tls.cert:
        return None
    from .tls import load_context
    try:
        context = load_context(config.tls)
    except ConfigError as exc:
        raise StartupError(f"config error: {exc}") from None
    from .tls import key_readable_by_others
    if key_readable_by_others(config.tls.key):
        log.warning("%s: the TLS key is readable by every user on this host (chmod o-r)",
                    config.tls.key)
    return context


# Keys a reload can't change (they shape sockets, processes and keys): named in the log line.
RESTART_KEYS = {
    "server.listen": lambda c: c.server.listen,
    "server.tls_listen": lambda c: c.server.tls_listen,
    "server.workers": lambda c: c.server.workers,
    "server.realm": lambda c: c.server.realm,
    "relay.ports": lambda c: c.relay.ports,
    "relay.addresses": lambda c: c.relay.addresses,
    "relay.external": lambda c: c.relay.external,
    "relay.legacy_channel_numbers": lambda c: c.relay.legacy_channel_numbers,
    "metrics.listen": lambda c: c.metrics.listen,
}


def reload_config(running: "Running", path: str) -> bool:
    """SIGHUP: read ``path`` again.  Users, users file, secrets, peer policy, limits, the TLS
    certificate and key, the log level and the drain alternate apply to what comes next;
    live allocations go on.  A file that does not validate (or a certificate that does not
    load) is refused with one line and the running configuration stays."""
    from .config import load_config
    shell = running.shell
    old = shell.config
    try:
        new = load_config(path)
        tls_context = load_tls(new)
    except ConfigError as exc:
        log.error("reload refused, the running configuration stays: config error: %s", exc)
        return False
    except StartupError as exc:
        log.error("reload refused, the running configuration stays: %s", exc)
        return False
    if shell.first_run_secrets and not new.auth.users and not new.auth.secrets:
        new = attrs.evolve(new, auth=attrs.evolve(new.auth, secrets=shell.first_run_secrets))
    changed = [key for key, get in RESTART_KEYS.items() if get(old) != get(new)]
    new = attrs.evolve(new, server=attrs.evolve(new.server, listen=old.server.listen,
                                                 tls_listen=old.server.tls_listen,
                                                 workers=old.server.workers, realm=old.server.realm),
                       relay=old.relay, metrics=old.metrics)
    core = shell.core
    pconfig, credentials, policy = core_settings(new, core.config.listen, core.config.port_range)
    core.reconfigure(pconfig, credentials, policy)
    if core.draining is not None:
        core.draining = draining_answer(new)
    shell.reconfigure(new)
    if tls_context is not None:
        shell.streams.tls_context = tls_context
        log.info("TLS certificate and key reloaded from %s and %s", new.tls.cert, new.tls.key)
    if new.log.format != old.log.format:
        from .logs import set_format
        set_format(new.log.format)
    logging.getLogger("turnd").setLevel(new.log.level.upper())
    if changed:
        log.warning("configuration reloaded from %s; changed keys that need a restart and were "
                    "not applied: %s", path, ", ".join(changed))
    else:
        log.info("configuration reloaded from %s", path)
    return True


def drain(running: "Running") -> None:
    """SIGUSR1: refuse new allocations (300 to server.alternate, else 403); the live ones
    run out."""
    if running.core.draining is None:
        running.core.draining = draining_answer(running.shell.config)
        alt = running.shell.config.server.alternate
        log.info("draining: new allocations are refused (%s); %d allocations run out",
                 f"300, alternate {alt}" if alt else "403", len(running.core.allocations))


def status_line(running: "Running", pps: float) -> str:
    text = (f"{len(running.core.allocations)} allocations, {pps:.0f} relayed packets/s")
    return text + (", draining" if running.core.draining is not None else "")


def log_listening(config: Config, udp: list, tcp: list, tls: list = ()) -> None:
    for transport, addrs in (("udp", udp), ("tcp", tcp), ("tls", tls)):
        for host, port in addrs:
            log.info("listening on %s %s", transport,
                     f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if not config.auth.users and not config.auth.secrets:
        log.info("no [auth] users or secrets: serving STUN only, TURN requests get 401")


def counters_line(running: Running) -> str:
    """Every non-zero counter, one line (what was relayed, refused, dropped)."""
    relay = running.stats.as_dict()
    relay["relayed_internally"] = relay.pop("internal")  # between turnd's own allocations
    parts = {**relay, **running.core.stats,
             **{f"tcp_{k}": v for k, v in running.tcp_stats.items()}}
    return " ".join(f"{k}={v}" for k, v in sorted(parts.items()) if v) or "none"


STATUS_INTERVAL = 5.0  # seconds between STATUS= updates to systemd


async def service(running: "Running", notifier) -> None:
    """systemd: WATCHDOG=1 from the event loop (a stuck loop misses it and is restarted) and
    STATUS= with allocations and relayed packets/s."""
    interval = min(notifier.watchdog_interval or STATUS_INTERVAL, STATUS_INTERVAL)
    last_status = trio.current_time()
    last_packets = running.stats.to_peer + running.stats.to_client
    while True:
        await trio.sleep(interval)
        notifier.watchdog()
        now = trio.current_time()
        if now - last_status >= STATUS_INTERVAL - 1e-3:
            packets = running.stats.to_peer + running.stats.to_client
            notifier.status(status_line(running, (packets - last_packets) / (now - last_status)))
            last_status, last_packets = now, packets


# What a running turnd may import later (a reload, a restart, its first HTTP request, a
# scrape).  Imported once it serves, so that after `pip install -U` on disk a later import
# can't load the new version's code into this old process: the successor runs it.
PRELOAD = ("config", "early", "fdstore", "handover", "logs", "metrics", "notify", "tls",
           "turn.state", "webpage")


def preload() -> None:
    import importlib
    for name in PRELOAD:
        importlib.import_module(f"turnd.{name}")


async def keep_in_store(running: "Running", store) -> None:
    """Stopping under systemd with its file descriptor store: the state as it stands now
    (not up to a second old), so that ``systemctl restart`` carries every UDP call on."""
    await running.shell.pause()  # from here the state can't change; datagrams wait
    try:
        store.write(running)
    except Exception:
        running.shell.internal_error()
        return
    kept = {a.id for a in running.core.allocations.values() if a.five_tuple.transport == "udp"}
    running.shell.handed_over = kept  # their end lines: by the next turnd, or none on a stop
    log.info("%d UDP allocations kept in systemd's file descriptor store: a restart carries "
             "them on, a stop ends them", len(kept))


async def run(config: Config, worker: WorkerSpec | None = None, config_path: str | None = None,
              notifier=None, first_run_secrets: tuple = (), adopted=None,
              stored: set = frozenset()) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly.  SIGHUP reloads ``config_path``,
    SIGUSR1 drains, SIGUSR2 hands over to a successor (turnd/handover.py; ``adopted``: what
    this turnd was handed).  ``notifier``: systemd's (turnd/notify.py), or None."""
    from .notify import Notifier
    notifier = notifier or Notifier({})
    files = raise_file_limit()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                                   signal.SIGUSR1, signal.SIGUSR2) as signals:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(functools.partial(serve, config, worker=worker,
                                                            adopted=adopted))
            if adopted is not None:
                from .handover import done
                done(adopted)  # serving: the predecessor may go
            gc.enable()  # (off while a successor adopts: turnd/cli.py)
            if worker is None and config.server.workers == 1 and notifier.enabled:
                from .fdstore import FdStore
                running.shell.fdstore = store = FdStore(notifier)
                store.start(running, set(stored))
                nursery.start_soon(store.keeper, running)
            running.shell.first_run_secrets = first_run_secrets
            if adopted is not None and adopted.state.get("draining"):
                log.info("restart: the predecessor was draining; so is this turnd")
                drain(running)
            # (signals are listened for already: the master sets the flag, then signals)
            if running.shared is not None and running.shared[flags_offset(config)]:
                drain(running)
            relays = relay_sockets_needed(config)
            if files < relays + FILES_RESERVED:
                log.warning("only %d open files allowed (RLIMIT_NOFILE): fewer than the %d relay "
                            "ports and %d for listen sockets, connections and files need; "
                            "allocations past that get 508. Raise LimitNOFILE or ulimit -n.",
                            files, relays, FILES_RESERVED)
            udp = running.shell.listen_sockets["udp"]
            got = udp[0].getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2 if udp else None
            if got is not None and got < SOCKET_BUFFER:  # (Linux reports twice what it grants)
                log.warning("UDP listen sockets got a %d KiB receive buffer, not the %d KiB asked: "
                            "net.core.rmem_max caps it, and a burst or a restart under load can "
                            "overflow it. Raise it: sysctl -w net.core.rmem_max=%d (and in "
                            "/etc/sysctl.d/; docs/operations.md)", got >> 10, SOCKET_BUFFER >> 10,
                            SOCKET_BUFFER)
            if running.shell.streams.cap < config.limits.tcp_connections:
                log.info("TCP connections capped at %d, below limits.tcp_connections (%d): "
                            "of the %d open files allowed, %d are kept for relay sockets",
                            running.shell.streams.cap, config.limits.tcp_connections, files, relays)
            if worker is None:  # (a master says it for its workers)
                log_listening(config, running.udp, running.tcp, running.tls)
                if running.metrics:
                    log.info("metrics on http://%s/metrics", address_text(running.metrics))
            notifier.ready(status_line(running, 0))
            nursery.start_soon(trio.to_thread.run_sync, preload)  # (the relay runs meanwhile)
            nursery.start_soon(service, running, notifier)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    notifier.reloading()
                    if config_path:
                        try:
                            reload_config(running, config_path)
                        except Exception:  # a bug: the running configuration stays
                            log.exception("reload failed, the running configuration stays")
                    notifier.ready(status_line(running, 0))
                    continue
                if signum == signal.SIGUSR1:
                    drain(running)
                    notifier.status(status_line(running, 0))
                    continue
                if signum == signal.SIGUSR2:
                    if worker is not None or config.server.workers > 1:
                        log.error("restart: not with server.workers > 1 yet; still serving")
                        continue
                    from .handover import hand_over
                    if not await hand_over(running, notifier):
                        continue
                    break
                log.info("received %s, stopping", signal.Signals(signum).name)
                running.core.draining = ()  # no new allocations while stopping
                store = running.shell.fdstore
                if store is not None and store.enabled:
                    await keep_in_store(running, store)
                notifier.stopping(f"stopping; {len(running.core.allocations)} allocations end")
                break
            nursery.cancel_scope.cancel()
    successor = running.shell.successor
    log.info("%s; counters: %s", f"handed over to pid {successor}" if successor else "stopped",
             counters_line(running))
