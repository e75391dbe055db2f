"""systemd's file descriptor store (``FileDescriptorStoreMax=``): turnd keeps its listen
sockets, its relay sockets and a memory file with its state (turnd/turn/state.py) in systemd,
so that after ``systemctl restart``, a crash or a watchdog kill the next turnd adopts them
from ``LISTEN_FDS``/``LISTEN_FDNAMES`` and the calls go on.

Names (``name_of``; FDNAME can't hold ":"): ``udp-IP-PORT``, ``tcp-IP-PORT``,
``tls-IP-PORT``, ``metrics``, ``relay-IP-PORT`` and ``state``, with an IPv6 address's colons
as dashes.  A relay socket is stored when its allocation is made and removed
(``FDSTOREREMOVE=1``) when it ends; the state is rewritten in place (systemd holds the same
memory file) at most once a second while allocations change, never per packet, so after a
crash it is at most a second old (allocations younger than that are lost, their sockets
closed).  TCP connections are not stored.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import trio

from .turn.state import check_version, export_state

log = logging.getLogger("turnd")

SD_LISTEN_FDS_START = 3
WRITE_INTERVAL = 1.0


def name_of(kind: str, addr: tuple) -> str:
    """An FDNAME (no ":" allowed: it separates LISTEN_FDNAMES): "udp-127.0.0.1-3478",
    "relay--1-50000" for [::1]:50000."""
    return f"{kind}-{addr[0].replace(':', '-')}-{addr[1]}"


class FdStore:
    """Keeps a running turnd's descriptors in systemd's store (a no-op without systemd)."""

    def __init__(self, notifier):
        self.notifier = notifier
        self.enabled = notifier is not None and notifier.enabled
        self.memfd: int | None = None
        self.dirty = trio.Event() if self.enabled else None

    def store(self, name: str, fd: int) -> None:
        if self.enabled:
            self.notifier.send("FDSTORE=1", f"FDNAME={name}", fds=(fd,))

    def remove(self, name: str) -> None:
        if self.enabled:
            self.notifier.send("FDSTOREREMOVE=1", f"FDNAME={name}")

    def changed(self) -> None:
        """Allocations changed: the state is written soon (not now: never per request)."""
        if self.enabled:
            self.dirty.set()

    def start(self, running, adopted_names: set) -> None:
        """Store what is not stored yet: the listen sockets, the metrics socket, the relays,
        and a fresh state file."""
        if not self.enabled:
            return
        shell = running.shell
        for kind, socks in shell.listen_sockets.items():
            for s in socks:
                name = name_of(kind, s.getsockname()[:2])
                if name not in adopted_names:
                    self.store(name, s.fileno())
        if shell.metrics_socket is not None and "metrics" not in adopted_names:
            self.store("metrics", shell.metrics_socket.fileno())
        for alloc in running.core.allocations.values():
            for r in alloc.relays.values():
                name = name_of("relay", r.address)
                if name not in adopted_names:
                    self.store(name, r.handle.fileno())
        self.remove("state")  # a predecessor's (same name): ours replaces it
        self.memfd = os.memfd_create("turnd-state", os.MFD_CLOEXEC)
        self.write(running)
        self.store("state", self.memfd)

    def write(self, running) -> None:
        state, _ = export_state(running.core, running.shell.now(),
                                keep=lambda a: a.five_tuple.transport == "udp")
        state["written_at"] = time.time()
        data = json.dumps(state).encode()
        os.ftruncate(self.memfd, 0)
        os.pwrite(self.memfd, data, 0)

    async def keeper(self, running) -> None:
        """Rewrite the state at most once a WRITE_INTERVAL while allocations change."""
        while True:
            await self.dirty.wait()
            self.dirty = trio.Event()
            try:
                self.write(running)
            except Exception:
                running.shell.internal_error()
            await trio.sleep(WRITE_INTERVAL)


def from_listen_fds(environ=None):
    """What systemd handed this turnd (``LISTEN_FDS`` for our pid), as a hand-over
    (turnd/handover.py's Adopted, without a predecessor to answer), or None."""
    from .handover import Adopted
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()) or not env.get("LISTEN_FDS", "").isdigit():
        return None, set()
    count = int(env["LISTEN_FDS"])
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    by_name: dict[str, int] = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError:  # not open after all
            continue
        name = names[i] if i < len(names) else ""
        if name in by_name or not name:
            os.close(fd)  # a duplicate or an unnamed descriptor: not ours to keep
            continue
        by_name[name] = fd
    state = {"version": None}
    memfd = by_name.pop("state", None)
    if memfd is not None:
        try:
            state = json.loads(os.pread(memfd, os.fstat(memfd).st_size, 0) or b"{}")
        except (ValueError, OSError):
            state = {}
        os.close(memfd)
    try:
        check_version(state)
    except Exception as exc:
        log.warning("systemd's file descriptor store: no state this turnd can read (%s); its "
                    "sockets are adopted, allocations are not", exc)
        state = {"version": None, "allocations": [], "nonce_secret": os.urandom(32).hex()}
    _age(state, time.time() - float(state.get("written_at", time.time())))
    fds, index = [], {}
    for kind in ("udp", "tcp", "tls"):
        mine = sorted(n for n in by_name if n.startswith(kind + "-"))
        index[kind] = list(range(len(fds), len(fds) + len(mine)))
        fds += [by_name.pop(n) for n in mine]
    index["metrics"] = None
    if "metrics" in by_name:
        index["metrics"] = len(fds)
        fds.append(by_name.pop("metrics"))
    index["relays"] = len(fds)
    kept = []
    for entry in state.get("allocations", []):
        names_ = [name_of("relay", r) for r in entry["relays"]]
        if all(n in by_name for n in names_):
            fds += [by_name.pop(n) for n in names_]
            kept.append(entry)
    state["allocations"] = kept
    index["connections"] = len(fds)
    for fd in by_name.values():  # relays of allocations the state did not know: closed
        os.close(fd)
    state["fds"] = index
    state["connections"] = []
    return Adopted(None, state, fds), set(names)


def _age(state: dict, elapsed: float) -> None:
    """The state was written ``elapsed`` seconds ago: take that off every time left."""
    alive = []
    for entry in state.get("allocations", []):
        entry["left"] = float(entry["left"]) - elapsed
        entry["age"] = float(entry["age"]) + elapsed
        entry["permissions"] = {ip: t - elapsed for ip, t in entry["permissions"].items()
                                if t - elapsed > 0}
        entry["channels"] = [[n, ip, port, t - elapsed] for n, ip, port, t in entry["channels"]
                             if t - elapsed > 0]
        if entry["left"] > 0:
            alive.append(entry)
    state["allocations"] = alive
