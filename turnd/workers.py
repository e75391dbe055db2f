"""``[server] workers`` > 1: a master process and its workers.

The master binds, for every listen endpoint, one UDP and one TCP socket per worker with
SO_REUSEPORT (the kernel spreads clients over them by their address, so a client's packets
always reach the same worker, the one holding its allocation), writes a fresh nonce secret
into a shared memory file (so a nonce from one worker is good in every other), and starts
the workers: each is ``turnd serve --worker SPEC`` with its own sockets, its own slice of
the relay port range, and the shared memory, whose bitmap says which relay ports are live
in any worker (relay-to-relay calls between workers go through the kernel, and nothing on
turnd's own addresses but a live relay port is ever reached).

The master keeps its copy of every socket: a worker that dies is restarted on the same
sockets (datagrams wait in the kernel meanwhile; its allocations are gone, and their
clients allocate again).  SIGINT and SIGTERM stop every worker, within STOP_TIMEOUT.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
import signal
import sys

import trio

from .config import Config
from .server import (SECRET_SIZE, WorkerSpec, flags_offset, log_listening, open_group,
                     open_stream_group,
                     raise_file_limit, shared_size, worker_ports)
from .sockets import StartupError, local_address

log = logging.getLogger("turnd")

STOP_TIMEOUT = 10.0
# systemd talks to the master only
NOT_FOR_WORKERS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                   "LISTEN_FDNAMES")
RESTART_DELAY = (1.0, 30.0)  # after a crash; doubled while a worker keeps crashing


async def run_master(config: Config, config_path: str, log_level: str, notifier=None,
                     first_run: str | None = None) -> None:
    from .notify import Notifier
    notifier = notifier or Notifier({})
    count = config.server.workers
    low, high = config.relay.ports
    if high - low + 1 < count:
        raise StartupError(f"relay.ports has {high - low + 1} ports: too few for {count} workers")
    raise_file_limit()  # the workers inherit it
    groups = [open_group(ep.host, ep.port, count) for ep in config.server.listen]
    tls_groups = [open_stream_group(ep.host, ep.port, count) for ep in config.server.tls_listen]
    shared_fd = os.memfd_create("turnd-shared", 0)
    os.ftruncate(shared_fd, shared_size(config))
    with mmap.mmap(shared_fd, shared_size(config)) as shared:
        shared[:SECRET_SIZE] = secrets.token_bytes(SECRET_SIZE)
    specs = [WorkerSpec(i, count, tuple(g[0][i].fileno() for g in groups),
                        tuple(g[1][i].fileno() for g in groups), shared_fd,
                        tuple(g[i].fileno() for g in tls_groups)) for i in range(count)]
    metrics_listener = None
    if config.metrics.listen:
        from .metrics import open_listener
        metrics_listener = open_listener(config.metrics.listen)
    log_listening(config, [local_address(g[0][0]) for g in groups],
                  [local_address(g[1][0]) for g in groups],
                  [local_address(g[0]) for g in tls_groups])
    stopping = trio.Event()
    flags = mmap.mmap(shared_fd, shared_size(config))
    procs: dict[int, trio.Process] = {}

    async def supervise(spec: WorkerSpec) -> None:
        delay = RESTART_DELAY[0]
        while not stopping.is_set():
            cmd = [sys.executable, "-m", "turnd", "serve", "--config", config_path,
                   "--log-level", log_level, "--worker", spec.to_json(),
                   *(("--first-run-secret", first_run) if first_run else ())]
            started = trio.current_time()
            env = {k: v for k, v in os.environ.items() if k not in NOT_FOR_WORKERS}
            proc = await trio.lowlevel.open_process(
                cmd, pass_fds=(*spec.udp, *spec.tcp, *spec.tls, spec.shared), env=env,
                preexec_fn=_ignore_reload_signals)
            procs[spec.index] = proc
            log.info("worker %d started (pid %d), relay ports %d-%d", spec.index, proc.pid,
                     *worker_ports(config.relay.ports, spec.index, count))
            code = await proc.wait()
            if stopping.is_set():
                return
            log.warning("worker %d (pid %d) exited with %s; restarting it in %.0f s", spec.index,
                        proc.pid, code, delay)
            await trio.sleep(delay)
            # a worker that ran a while starts again at once next time; one that keeps
            # crashing waits longer each time
            delay = RESTART_DELAY[0] if trio.current_time() - started > 60 else min(
                2 * delay, RESTART_DELAY[1])

    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                                       signal.SIGUSR1) as signals:
            async with trio.open_nursery() as nursery:
                for spec in specs:
                    nursery.start_soon(supervise, spec)
                if metrics_listener is not None:
                    nursery.start_soon(_serve_metrics, metrics_listener, config, shared_fd, count)
                status = f"{count} workers"
                notifier.ready(status)
                from .server import preload
                nursery.start_soon(trio.to_thread.run_sync, preload)
                nursery.start_soon(_watchdog, notifier)
                async for signum in signals:
                    if signum in (signal.SIGHUP, signal.SIGUSR1):  # each worker does it itself
                        if signum == signal.SIGHUP:
                            notifier.reloading()
                        else:
                            status = f"{count} workers, draining"
                            flags[flags_offset(config)] = 1  # first: a worker starting reads it
                        for proc in procs.values():
                            if proc.returncode is None:
                                proc.send_signal(signum)
                        notifier.ready(status)
                        continue
                    notifier.stopping()
                    log.info("received %s, stopping %d workers", signal.Signals(signum).name, count)
                    break
                stopping.set()
                for proc in procs.values():
                    if proc.returncode is None:
                        proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(STOP_TIMEOUT):
                    for proc in procs.values():
                        await proc.wait()
                for proc in procs.values():
                    if proc.returncode is None:
                        log.warning("worker pid %d did not stop in %.0f s: killed", proc.pid, STOP_TIMEOUT)
                        proc.kill()
                nursery.cancel_scope.cancel()
    finally:
        for udps, tcps in groups:
            for s in udps + tcps:
                s.close()
        for socks in tls_groups:
            for s in socks:
                s.close()
        os.close(shared_fd)
        if metrics_listener is not None:
            metrics_listener.socket.close()
    log.info("stopped")


async def _serve_metrics(listener, config: Config, shared_fd: int, count: int) -> None:
    """The master serves every worker's snapshot (from its slot), labelled worker="N"."""
    import time
    from .metrics import SLOT_SIZE, read_slot, registry_for, serve_http
    from .server import metrics_offset
    from .logs import address_text
    log.info("metrics on http://%s/metrics", address_text(local_address(listener.socket)))
    shared = mmap.mmap(shared_fd, shared_size(config))
    view = memoryview(shared)[metrics_offset(config):metrics_offset(config) + count * SLOT_SIZE]

    def snapshots() -> dict:
        out = {}
        for i in range(count):
            snap = read_slot(view, i)
            if snap is not None:
                out[str(i)] = snap
        return out

    await serve_http(listener, registry_for(snapshots, time.time()))


def _ignore_reload_signals() -> None:
    """In a new worker, before it runs: SIGHUP and SIGUSR1 are ignored (an ignored signal
    stays ignored across exec) until the worker listens for them, so one that comes while it
    starts is not fatal."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


async def _watchdog(notifier) -> None:
    while notifier.watchdog_interval:
        await trio.sleep(notifier.watchdog_interval)
        notifier.watchdog()
