"""Restart without dropping a call (SIGUSR2, ``turnd restart``): hand the listen sockets,
the relay sockets and the allocations to the next turnd.

The kernel keeps a socket's queued datagrams as long as any process holds the descriptor, so
a successor that holds them loses nothing.  The steps (over a unix socket pair):

1. The predecessor starts its successor: the same ``turnd serve`` command line (so a new
   version on disk and a new config take effect), with ``TURND_HANDOVER_FD`` naming its end
   of the pair.
2. The successor loads its config (a broken one: it exits, and the predecessor, which has
   not paused, logs that and goes on) and says ``R``.
3. The predecessor stops reading its sockets (``Shell.pause``), writes its state
   (turnd/turn/state.py, versioned) into a memory file and sends it with every descriptor
   (SCM_RIGHTS, in batches).
4. The successor adopts them: the listen sockets its config names, the allocations that
   still fit its config (the rest are ended and logged), the nonce secret; it starts serving
   and says ``K``.  Only then the predecessor exits.  Without ``K`` in time (a crash, a state
   it can't read), the predecessor kills it if need be, serves its frozen TCP connections
   again from where they stood, reads its sockets again, and logs why.

Under systemd the predecessor sends ``MAINPID=`` with the successor's pid before it exits.
Plain TCP connections with an allocation are handed over where they stand (the bytes read
but not yet framed, the bytes not yet written; streams.HANDOVER_BYTES in all).  TLS
connections can't move (their session lives in OpenSSL): they are closed, which ends their
allocations (logged with how many).  Not yet: workers.  (systemd's own restarts:
turnd/fdstore.py and turnd/early.py.)
"""

from __future__ import annotations

import array
import gc
import json
import logging
import os
import socket
import sys

import attrs
import trio

from .turn.state import STATE_VERSION, StateError, check_version, export_state

log = logging.getLogger("turnd")

ENV = "TURND_HANDOVER_FD"
BATCH = 200            # descriptors per message (the kernel allows 253)
READY_TIMEOUT = 30.0   # seconds for the successor to load its config
ADOPT_TIMEOUT = 30.0   # seconds for it to adopt and serve


@attrs.define
class Adopted:
    """What a successor received."""
    sock: socket.socket
    state: dict
    fds: list  # every descriptor, in the order the state's "fds" indexes


# --- the predecessor --------------------------------------------------------------------

async def hand_over(running, notifier=None) -> bool:
    """Start the successor and hand everything over; True when it took over (exit now).
    Under systemd (``notifier``) the successor becomes the unit's main process."""
    shell = running.shell
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    cmd = [sys.executable, "-m", "turnd", *sys.argv[1:]]
    env = dict(os.environ, **{ENV: str(theirs.fileno())})
    env.pop("WATCHDOG_PID", None)  # the successor pings the watchdog once it is the main pid
    try:
        proc = await trio.lowlevel.open_process(cmd, pass_fds=(theirs.fileno(),), env=env)
    except OSError as exc:
        log.error("restart: cannot start the successor (%s); still serving", exc)
        ours.close()
        theirs.close()
        return False
    theirs.close()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    log.info("restart: successor started (pid %d)", proc.pid)
    paused = False
    frozen: list = []  # plain TCP connections frozen for the hand-over: (StreamClient, dup'd fd)
    try:
        with trio.move_on_after(READY_TIMEOUT):
            said = await stream.receive_some(1)
        if said != b"R":
            raise _Failed("the successor did not start (see its lines above)")
        # (the collector would walk every allocation's objects, tens of ms a pass at 10,000,
        # while the sockets wait: the successor pauses its own too)
        gc.disable()
        await shell.pause()
        paused = True
        paused_at = trio.current_time()
        frozen = await shell.streams.freeze()
        state, fds = export(running, frozen)
        await _send(stream.socket, state, fds)
        with trio.move_on_after(ADOPT_TIMEOUT):
            said = await stream.receive_some(1)
        if said != b"K":
            raise _Failed("the successor did not take over (see its lines above)")
    except (_Failed, OSError, trio.BrokenResourceError) as exc:
        gc.enable()
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        if paused:
            for sc, fd in frozen:  # served again from where they stood
                shell.streams.adopt(socket.socket(fileno=fd), connection_entry(sc), sc.alloc)
            shell.resume()
        log.error("restart failed: %s (exit %s); still serving", exc, proc.returncode)
        await stream.aclose()
        return False
    for _, fd in frozen:  # (the successor has its own)
        os.close(fd)
    await stream.aclose()
    if notifier is not None:
        notifier.send(f"MAINPID={proc.pid}", "STATUS=handed over to the successor")
    staying = shell.streams.connections
    log.info("restart: handed over to pid %d (%d allocations, %d TCP connections; sockets unread "
             "for %.0f ms); %d allocations end with their connections (TLS, or TCP beyond the "
             "hand-over limit); %d connections without an allocation close", proc.pid,
             len(state["allocations"]), len(state["connections"]),
             (trio.current_time() - paused_at) * 1000,
             sum(c.alloc is not None for c in staying), sum(c.alloc is None for c in staying))
    shell.handed_over = {a["id"] for a in state["allocations"]}
    shell.successor = proc.pid
    return True


class _Failed(Exception):
    pass


def export(running, frozen: list) -> tuple[dict, list]:
    """The state and the descriptors to hand over (the state says which is which): UDP
    allocations, and the ``frozen`` plain TCP connections (StreamClient, dup'd fd) with
    theirs."""
    shell = running.shell
    moving = {id(sc.alloc) for sc, _ in frozen if sc.alloc is not None}
    state, handles = export_state(
        running.core, shell.now(),
        keep=lambda a: a.five_tuple.transport == "udp" or id(a) in moving)
    socks = shell.listen_sockets
    fds, index = [], {}
    for kind in ("udp", "tcp", "tls"):
        index[kind] = list(range(len(fds), len(fds) + len(socks[kind])))
        fds += [s.fileno() for s in socks[kind]]
    index["metrics"] = None
    if shell.metrics_socket is not None:
        index["metrics"] = len(fds)
        fds.append(shell.metrics_socket.fileno())
    index["relays"] = len(fds)
    fds += [h.fileno() for h in handles]
    position = {a["id"]: i for i, a in enumerate(state["allocations"])}
    state["connections"] = []
    index["connections"] = len(fds)
    for sc, fd in frozen:
        alloc = sc.alloc
        state["connections"].append(dict(
            connection_entry(sc), alloc=position.get(alloc.id) if alloc is not None else None))
        fds.append(fd)
    state["fds"] = index
    state["draining"] = running.core.draining is not None  # (SIGUSR1 goes on in the successor)
    state["listen"] = {kind: [list(s.getsockname()[:2]) for s in socks[kind]]
                       for kind in ("udp", "tcp", "tls")}
    return state, fds


def connection_entry(sc) -> dict:
    """A frozen plain TCP connection where it stands: what was read and not yet framed, what
    waits to be written."""
    read, pad = sc.framer.state()
    return {"client": list(sc.ft.client), "server": list(sc.ft.server), "read": read.hex(),
            "pad": pad, "write": bytes(sc.buffer).hex()}


async def _send(sock, state: dict, fds: list) -> None:
    """The state in a memory file, then the descriptors in batches (``sock``: trio's, so a
    full buffer waits for the successor to read)."""
    data = json.dumps(state).encode()
    memfd = os.memfd_create("turnd-state", os.MFD_CLOEXEC)
    try:
        os.write(memfd, data)
        header = len(fds).to_bytes(4, "big") + len(data).to_bytes(4, "big")
        await _send_fds(sock, header, [memfd])
        for i in range(0, len(fds), BATCH):
            await _send_fds(sock, b"F", fds[i:i + BATCH])
    finally:
        os.close(memfd)


async def _send_fds(sock, data: bytes, fds: list) -> None:
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    if await sock.sendmsg([data], rights) != len(data):
        raise OSError("short write to the successor")


# --- the successor ------------------------------------------------------------------------

def receive(fd: int) -> Adopted:
    """(Blocking, before the event loop starts.)  Say ready, take the state and the
    descriptors.  Raises StateError for a state this turnd can't read."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    sock.sendall(b"R")
    header, fds_, _, _ = socket.recv_fds(sock, 8, 1)
    if len(header) != 8 or len(fds_) != 1:
        raise StateError("no state from the predecessor")
    count, size = int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")
    memfd = fds_[0]
    try:
        data = os.pread(memfd, size, 0)
    finally:
        os.close(memfd)
    fds: list[int] = []
    while len(fds) < count:
        _, got, _, _ = socket.recv_fds(sock, 1, min(BATCH, count - len(fds)))
        if not got:
            raise StateError("the predecessor stopped sending descriptors")
        fds += got
    try:
        state = json.loads(data)
    except ValueError:
        raise StateError("the state is not JSON") from None
    check_version(state)
    return Adopted(sock, state, fds)


def listen_sockets(adopted: Adopted) -> dict:
    """kind -> [socket] of the handed-over listen sockets, and "metrics"."""
    idx = adopted.state["fds"]
    out = {}
    for kind in ("udp", "tcp", "tls"):
        out[kind] = []
        for i in idx[kind]:
            s = socket.socket(fileno=adopted.fds[i])
            s.setblocking(False)
            out[kind].append(s)
    m = idx.get("metrics")
    out["metrics"] = socket.socket(fileno=adopted.fds[m]) if m is not None else None
    return out


def relay_sockets(adopted: Adopted) -> list:
    """The relay sockets, in the order of the allocations' relays."""
    idx = adopted.state["fds"]
    fds = adopted.fds[idx["relays"]:idx.get("connections", len(adopted.fds))]
    ips = [ip for entry in adopted.state["allocations"] for ip, _ in entry["relays"]]
    out = []
    for fd, ip in zip(fds, ips):
        # (family and type given: socket() asks the kernel for none of them)
        s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM,
                          0, fd)
        s.setblocking(False)
        out.append(s)
    for fd in fds[len(out):]:  # (a state that names fewer relays than it sent)
        os.close(fd)
    return out


def connection_sockets(adopted: Adopted) -> list:
    start = adopted.state["fds"].get("connections", len(adopted.fds))
    return [socket.socket(fileno=fd) for fd in adopted.fds[start:]]


def done(adopted: Adopted) -> None:
    """Tell the predecessor this turnd serves now (it exits)."""
    if adopted.sock is None:  # from systemd's store: nobody waits
        return
    try:
        adopted.sock.sendall(b"K")
    finally:
        adopted.sock.close()


__all__ = ["Adopted", "STATE_VERSION", "StateError", "done", "hand_over", "listen_sockets",
           "receive", "relay_sockets"]
