#!/usr/bin/env python3
"""A TURN load generator that works against any RFC 8656 server (turnd, coturn, ...).

    python bench/turnbench.py WORKLOAD --port P --user U --password W [--pid PID] [options]

Workloads:
  calls   N allocations (--allocations), each relaying to one UDP echo peer through a
          channel (or, with --send, Send/Data indications carrying FINGERPRINT, as Firefox
          sends them), at a fixed offered rate (--rate, client->peer packets per second in
          all); every packet comes back through the server: loss, round-trip p50/p99, and,
          with --pid, the server's CPU per relayed packet
  hot     one allocation, one channel, packets as fast as the server echoes them (a window
          of --window in flight)
  setup   allocations made one after another (Allocate, its 401 round trip, then Refresh 0),
          from many source addresses (127.0.0.0/8) or, with --one-source, from one; with
          --parallel N, N clients at a time
  idle    N idle allocations (--allocations, one ChannelBind each); with --pid, the server's
          RSS before and after, per allocation

With --pid, CPU and RSS are read from /proc for that process and all its descendants (a
server with workers).  Output: one JSON object on stdout.  Everything is bounded (counts,
--seconds, timeouts) and stops by itself; clients bind to 127.0.0.0/8 source addresses.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from turnd import mmsg  # noqa: E402
from turnd.stun import Message, decode_untrusted, encode, long_term_key  # noqa: E402
from turnd.stun import constants as c  # noqa: E402

# --- /proc ---------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return out


def server_pids(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    total = 0.0
    for p in server_pids(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total


def rss_kib(pid: int | None) -> int:
    if pid is None:
        return 0
    total = 0
    for p in server_pids(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


# --- a TURN client ----------------------------------------------------------------------

def source_address(i: int) -> str:
    """127.1.x.y: many source addresses, none of them the server's own 127.0.0.1."""
    return f"127.1.{(i // 250) % 250}.{i % 250 + 1}"


class Client:
    """One allocation's client socket: synchronous requests during set-up."""

    def __init__(self, server: tuple, user: str, password: str, source: str, rcvbuf: int = 0,
                 port: int = 0):
        self.server, self.user, self.password = server, user, password
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((source, port))
        self.sock.settimeout(2.0)
        self.realm = self.nonce = None
        self.key = b""

    def request(self, method: int, attrs: list, tries: int = 4) -> Message:
        data = b""
        for _ in range(tries):
            if not data:  # a new transaction (a retransmission sends the same bytes again)
                extra = []
                if self.nonce:
                    extra = [(c.USERNAME, self.user), (c.REALM, self.realm), (c.NONCE, self.nonce)]
                msg = Message(method, c.REQUEST, os.urandom(12), attrs + extra)
                data = encode(msg, key=self.key if self.nonce else None)
            self.sock.sendto(data, self.server)
            try:
                while True:
                    reply = self.sock.recv(65536)
                    if reply[0] < 0x40:
                        resp = decode_untrusted(reply)
                        if resp.transaction_id == msg.transaction_id:
                            break
            except socket.timeout:
                continue  # lost (or rate-limited): retransmit
            data = b""
            err = resp.get(c.ERROR_CODE)
            if err is not None and err.code in (401, 438):
                self.realm, self.nonce = resp.get(c.REALM), resp.get(c.NONCE)
                self.key = long_term_key(self.user, self.realm, self.password)
                continue
            if err is not None:
                raise RuntimeError(f"{c.METHOD_NAMES.get(method, method)}: {err.code} {err.reason}")
            return resp
        raise RuntimeError(f"{c.METHOD_NAMES.get(method, method)}: no answer")

    def allocate(self) -> tuple:
        return self.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)]).get(c.XOR_RELAYED_ADDRESS)


def make_clients(args, n: int, rcvbuf: int = 0) -> list[Client]:
    server = (args.host, args.port)
    clients = []
    for i in range(n):
        one = getattr(args, "one_source", False)
        source = "127.0.0.1" if one else source_address(i)
        # --first-port: 5-tuples no earlier run used (coturn remembers a deleted allocation on
        # its 5-tuple for a while and answers 437 there): each client of this run on that port
        # of its own address, or from one address, on ports from there up.
        port = (args.first_port + i if one else args.first_port) if args.first_port else 0
        cl = Client(server, args.user, args.password, source, rcvbuf, port)
        clients.append(cl)
    return clients


# --- an echo peer ---------------------------------------------------------------------------

PEER_HOST = "127.0.0.2"  # not the server's own address: relayed as to any peer


def start_echo_peer(host: str = PEER_HOST) -> tuple[int, tuple]:
    """A UDP echo peer in a child process: (pid, address)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    addr = sock.getsockname()
    pid = os.fork()
    if pid == 0:  # the child: echo until killed, up to 64 datagrams per system call each way
        try:
            echo_forever(sock)
        finally:
            os._exit(0)
    sock.close()
    return pid, addr


def echo_forever(sock: socket.socket, size: int = 64) -> None:
    """Send every datagram back to where it came from: recvmmsg, then sendmmsg from the
    same slots to the same addresses (the names the kernel wrote are reused as is)."""
    stride = 2048
    sock.setblocking(False)  # recvmmsg on a blocking socket would wait for all `size`
    arena = bytearray(size * stride)
    rx = mmsg.RecvBatch(sock, arena, size, stride, 0, stride)
    tx = mmsg.SendBatch(sock, size)
    base, names_base = mmsg.address_of(arena), mmsg.address_of(rx.names)
    for k in range(size):
        mmsg.NAME.pack_into(tx.names, k * mmsg.MMSG_SIZE, names_base + k * rx.namelen, rx.namelen)
    select_in = select.poll()
    select_in.register(sock.fileno(), select.POLLIN)
    while True:
        n = rx.receive(size)
        if n <= 0:
            select_in.poll()
            continue
        for k in range(n):
            length = mmsg.LEN.unpack_from(rx.lens, k * mmsg.MMSG_SIZE + mmsg.LEN_OFFSET)[0]
            mmsg.IOV.pack_into(tx.iovs_mv, k * mmsg.IOV_SIZE, base + k * stride, length)
        tx.count = n
        tx.flush()


def stop(pid: int) -> None:
    try:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    except OSError:
        pass


# --- workloads -------------------------------------------------------------------------

_SEQ = struct.Struct("!IQ")  # client index, send time (ns)


def channel_frame(number: int, payload: bytes) -> bytes:
    return struct.pack("!HH", number, len(payload)) + payload + b"\0" * (-len(payload) % 4)


def send_indication(peer: tuple, payload: bytes) -> bytes:
    msg = Message(c.SEND, c.INDICATION, os.urandom(12),
                  [(c.XOR_PEER_ADDRESS, peer), (c.DATA_ATTR, payload)])
    return encode(msg, fingerprint=True)


def setup_calls(args, clients: list[Client], peer: tuple) -> None:
    for cl in clients:
        cl.allocate()
        if args.send:
            cl.request(c.CREATE_PERMISSION, [(c.XOR_PEER_ADDRESS, peer)])
        else:
            cl.request(c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4000), (c.XOR_PEER_ADDRESS, peer)])


def release(clients: list[Client]) -> None:
    """Delete the allocations (Refresh 0) so the next run starts clean."""
    for cl in clients:
        cl.sock.settimeout(0.5)
        if cl.nonce:
            try:
                cl.request(c.REFRESH, [(c.LIFETIME, 0)], tries=2)
            except (RuntimeError, OSError):
                pass
        cl.sock.close()


def payload_of(data: bytes, send_mode: bool) -> bytes | None:
    """The echoed payload in a ChannelData or Data indication from the server."""
    if not send_mode:
        if data[0] < 0x40:
            return None
        n = (data[2] << 8) | data[3]
        return data[4:4 + n]
    if data[:2] != b"\x00\x17":
        return None
    try:
        return decode_untrusted(data).get(c.DATA_ATTR)
    except ValueError:
        return None


def run_calls(args, midway=None) -> dict:
    """``midway``: called (in a thread of its own, the traffic going on) once half the
    packets are sent: bench/handover.py restarts the server there."""
    peer_pid, peer = start_echo_peer()
    clients: list[Client] = []
    try:
        clients += make_clients(args, args.allocations, rcvbuf=1 << 20)
        t0 = time.monotonic()
        setup_calls(args, clients, peer)
        setup_s = time.monotonic() - t0
        pad = b"x" * max(0, args.size - _SEQ.size)
        ep = select.epoll()
        by_fd = {}
        for i, cl in enumerate(clients):
            cl.sock.setblocking(False)
            ep.register(cl.sock.fileno(), select.EPOLLIN)
            by_fd[cl.sock.fileno()] = i
        n = len(clients)
        interval = 1.0 / args.rate
        total = int(args.rate * args.seconds)
        rtts: list[int] = []
        sent = received = 0
        cpu0 = cpu_seconds(args.pid)
        start = time.monotonic()
        deadline = start + args.seconds + 2.0
        last = start
        gap = 0.0  # the longest time nothing came back
        while time.monotonic() < deadline and received < total:
            now = time.monotonic()
            due = min(total, int((now - start) / interval) + 1)
            if midway is not None and sent >= total // 2:
                threading.Thread(target=midway, daemon=True).start()
                midway = None
            while sent < due:
                i = sent % n
                cl = clients[i]
                body = _SEQ.pack(i, time.perf_counter_ns()) + pad
                data = send_indication(peer, body) if args.send else channel_frame(0x4000, body)
                try:
                    cl.sock.sendto(data, cl.server)
                except OSError:
                    pass
                sent += 1
            for fd, _ in ep.poll(0.0005 if sent < total else 0.05):
                sock = clients[by_fd[fd]].sock
                while True:
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        break
                    body = payload_of(data, args.send)
                    if body is None or len(body) < _SEQ.size:
                        continue
                    _, stamp = _SEQ.unpack_from(body)
                    rtts.append(time.perf_counter_ns() - stamp)
                    received += 1
                    now = time.monotonic()
                    gap, last = max(gap, now - last), now
        elapsed = time.monotonic() - start
        cpu = cpu_seconds(args.pid) - cpu0
        relayed = 2 * received
        rtts.sort()
        pick = lambda q: rtts[min(len(rtts) - 1, int(q * len(rtts)))] / 1e6 if rtts else None
        return {"workload": "calls-send" if args.send else "calls", "allocations": n,
                "offered_pps": args.rate, "sent": sent, "received": received,
                "loss_pct": 100.0 * (sent - received) / max(sent, 1),
                "cpu_us_per_relayed": 1e6 * cpu / relayed if relayed and args.pid else None,
                "server_cpu_pct": 100.0 * cpu / elapsed if args.pid else None,
                "rtt_p50_ms": pick(0.5), "rtt_p99_ms": pick(0.99), "rtt_max_ms": pick(1.0),
                "longest_gap_ms": 1000 * gap, "setup_s": setup_s,
                "rss_kib": rss_kib(args.pid)}
    finally:
        stop(peer_pid)
        release(clients)


def run_hot(args) -> dict:
    """--allocations flows (1: one hot flow), one channel each: keep --window datagrams in
    flight per flow, sent and received 64 at a time (sendmmsg/recvmmsg), so the generator
    costs far less than the server and the server's saturation is what is measured."""
    peer_pid, peer = start_echo_peer()
    clients: list[Client] = []
    try:
        n = max(1, args.allocations if args.allocations != 1000 else 1)
        clients += make_clients(args, n, rcvbuf=8 << 20)
        for cl in clients:
            cl.allocate()
            cl.request(c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4000), (c.XOR_PEER_ADDRESS, peer)])
        flows = [Flow(cl, channel_frame(0x4000, b"x" * args.size), args.window) for cl in clients]
        ep = select.epoll()
        by_fd = {f.sock.fileno(): f for f in flows}
        for fd in by_fd:
            ep.register(fd, select.EPOLLIN)
        cpu0 = cpu_seconds(args.pid)
        start = time.monotonic()
        deadline = start + args.seconds
        for f in flows:
            f.top_up()
        checked = start
        while time.monotonic() < deadline:
            for fd, _ in ep.poll(0.01):
                f = by_fd[fd]
                f.receive()
                f.top_up()
            now = time.monotonic()
            if now - checked > 0.05:
                checked = now
                for f in flows:
                    if now - f.last > 0.2:  # lost packets: refill the window
                        f.sent, f.last = f.received, now
                        f.top_up()
        elapsed = time.monotonic() - start
        cpu = cpu_seconds(args.pid) - cpu0
        received = sum(f.received for f in flows)
        return {"workload": "hot" if n == 1 else f"hot-{n}", "received": received,
                "relayed_pps": 2 * received / elapsed,
                "cpu_us_per_relayed": 1e6 * cpu / (2 * received) if received and args.pid else None,
                "server_cpu_pct": 100.0 * cpu / elapsed if args.pid else None}
    finally:
        stop(peer_pid)
        release(clients)


class Flow:
    """One client socket keeping ``window`` ChannelData datagrams in flight, 64 per call."""

    SIZE = 64

    def __init__(self, cl: Client, frame: bytes, window: int):
        self.sock, self.window = cl.sock, window
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        self.out = bytearray(frame)
        self.name = bytearray(mmsg.sockaddr(cl.server))
        self.tx = mmsg.SendBatch(self.sock, self.SIZE)
        for k in range(self.SIZE):
            mmsg.NAME.pack_into(self.tx.names, k * mmsg.MMSG_SIZE, mmsg.address_of(self.name), len(self.name))
            mmsg.IOV.pack_into(self.tx.iovs_mv, k * mmsg.IOV_SIZE, mmsg.address_of(self.out), len(frame))
        self.rx = mmsg.RecvBatch(self.sock, bytearray(self.SIZE * 2048), self.SIZE, 2048, 0, 2048)
        self.sent = self.received = 0
        self.last = time.monotonic()

    def top_up(self) -> None:
        room = self.window - (self.sent - self.received)
        while room > 0:
            self.tx.count = min(room, self.SIZE)
            done, _ = self.tx.flush()
            if not done:
                return
            self.sent += done
            room -= done

    def receive(self) -> None:
        while True:
            n = self.rx.receive(self.SIZE)
            if n <= 0:
                return
            self.received += n
            self.last = time.monotonic()


def run_setup(args) -> dict:
    """Allocations set up (401 round trip, Allocate, Refresh 0), one client after another,
    or with --parallel N, N clients at a time (a meeting that everyone joins at once)."""
    clients = make_clients(args, args.allocations)
    cpu0 = cpu_seconds(args.pid)
    start = time.monotonic()
    if args.parallel <= 1:
        for cl in clients:
            cl.allocate()
            cl.request(c.REFRESH, [(c.LIFETIME, 0)])
    else:
        setup_in_parallel(clients, args.parallel)
    done = len(clients)
    elapsed = time.monotonic() - start
    for cl in clients:  # closed only now: a port used again at once would meet a server that
        cl.sock.close()  # still remembers the allocation deleted on it (coturn answers 437)
    name = "setup" + ("-parallel" if args.parallel > 1 else "") + ("-one-source" if args.one_source else "")
    return {"workload": name, "allocations": done, "per_s": done / elapsed,
            "cpu_ms_per_allocation": 1e3 * (cpu_seconds(args.pid) - cpu0) / done if args.pid else None}


def setup_in_parallel(clients: list[Client], width: int) -> None:
    """Each client: Allocate (401), Allocate, Refresh 0; ``width`` of them at a time, driven
    by one epoll; a request unanswered for 0.5 s is sent again."""
    ep = select.epoll()
    waiting = list(reversed(clients))
    active: dict[int, list] = {}  # fd -> [client, step, message bytes, transaction id, sent at]

    def send(entry, method, attrs):
        cl = entry[0]
        extra = [(c.USERNAME, cl.user), (c.REALM, cl.realm), (c.NONCE, cl.nonce)] if cl.nonce else []
        msg = Message(method, c.REQUEST, os.urandom(12), attrs + extra)
        entry[2] = encode(msg, key=cl.key if cl.nonce else None)
        entry[3], entry[4] = msg.transaction_id, time.monotonic()
        cl.sock.sendto(entry[2], cl.server)

    def start_next():
        cl = waiting.pop()
        cl.sock.setblocking(False)
        entry = [cl, 0, b"", b"", 0.0]
        active[cl.sock.fileno()] = entry
        ep.register(cl.sock.fileno(), select.EPOLLIN)
        send(entry, c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])

    while waiting and len(active) < width:
        start_next()
    while active:
        for fd, _ in ep.poll(0.05):
            entry = active[fd]
            cl = entry[0]
            try:
                data = cl.sock.recv(65536)
            except BlockingIOError:
                continue
            resp = decode_untrusted(data)
            if resp.transaction_id != entry[3]:
                continue
            err = resp.get(c.ERROR_CODE)
            if err is not None and err.code in (401, 438):
                cl.realm, cl.nonce = resp.get(c.REALM), resp.get(c.NONCE)
                cl.key = long_term_key(cl.user, cl.realm, cl.password)
                send(entry, c.ALLOCATE if entry[1] == 0 else c.REFRESH,
                     [(c.REQUESTED_TRANSPORT, 17)] if entry[1] == 0 else [(c.LIFETIME, 0)])
            elif err is not None:
                raise RuntimeError(f"{err.code} {err.reason}")
            elif entry[1] == 0:
                entry[1] = 1
                send(entry, c.REFRESH, [(c.LIFETIME, 0)])
            else:
                ep.unregister(fd)
                del active[fd]
                if waiting:
                    start_next()
        now = time.monotonic()
        for entry in active.values():
            if now - entry[4] > 0.5:
                entry[4] = now
                entry[0].sock.sendto(entry[2], entry[0].server)


def run_idle(args) -> dict:
    peer_pid, peer = start_echo_peer()
    try:
        clients = make_clients(args, args.allocations + 1)
        for i, cl in enumerate(clients):
            cl.allocate()
            cl.request(c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4000), (c.XOR_PEER_ADDRESS, peer)])
            if i == 0:  # one first, and a moment: what a server sets up once is not counted
                time.sleep(1.0)
                before = rss_kib(args.pid)
        time.sleep(1.0)
        after = rss_kib(args.pid)
        release(clients)
        return {"workload": "idle", "allocations": args.allocations, "rss_before_kib": before,
                "rss_after_kib": after,
                "kib_per_allocation": (after - before) / args.allocations if args.pid else None}
    finally:
        stop(peer_pid)


WORKLOADS = {"calls": run_calls, "hot": run_hot, "setup": run_setup, "idle": run_idle}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--pid", type=int, help="the server's PID: CPU and RSS from /proc")
    parser.add_argument("--allocations", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20000.0, help="offered client->peer packets/s")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--send", action="store_true", help="Send/Data indications, not channels")
    parser.add_argument("--one-source", action="store_true", help="every client from 127.0.0.1")
    parser.add_argument("--parallel", type=int, default=1, help="setup: clients at a time")
    parser.add_argument("--first-port", type=int, default=0,
                        help="bind clients to this port (--one-source: this port and up)")
    args = parser.parse_args(argv)
    print(json.dumps(WORKLOADS[args.workload](args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
