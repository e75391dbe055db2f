"""Restarts that should drop no call (turnd/handover.py), measured.

  load  --allocations calls relaying --rate datagrams/s in all (as `make bench`'s many calls:
        each client -> turnd -> echo peer -> turnd -> client) while turnd restarts half-way:
        by SIGUSR2 (what `turnd restart` sends), and the way systemd restarts it (SIGTERM,
        then the next turnd started with the descriptors a fake systemd kept in its store,
        bench/fakesystemd.py).  Prints what was lost, the longest time nothing came back,
        the p99 and worst round trip.
  time  --idle allocations, and one call at 1,000 datagrams/s, through a SIGUSR2 hand-over:
        how long the sockets went unread, and what that call lost.

    python bench/handover.py                       # everything, as in the README
    python bench/handover.py --only time --idle 10000
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from fakesystemd import FdStoringSystemd  # noqa: E402
from turnbench import Client, channel_frame, run_calls, source_address  # noqa: E402

from turnd.stun import constants as c  # noqa: E402

USER = PASSWORD = "bench"


class Server:
    """turnd in a scratch directory; every process it became is stopped at the end."""

    def __init__(self, systemd: bool = False):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.work = tempfile.mkdtemp(prefix="turnd-handover-")
        self.conf = os.path.join(self.work, "turnd.toml")
        with open(self.conf, "w") as f:
            f.write(f'[server]\nlisten = ["127.0.0.1:{self.port}"]\nrealm = "bench"\n'
                    f'[auth]\nusers = {{ {USER} = "{PASSWORD}" }}\n[relay]\nports = "20000-39999"\n'
                    '[peers]\nallow = ["127.0.0.0/8"]\n'
                    '[limits]\nunauthenticated_rate = 0\nip_quota = 0\n[metrics]\nlisten = ""\n')
        self.log_path = os.path.join(self.work, "turnd.log")
        self.systemd = FdStoringSystemd(os.path.join(self.work, "notify.sock")) if systemd else None
        env = dict(os.environ)
        if self.systemd is not None:
            self.systemd.keep_draining()
            env["NOTIFY_SOCKET"] = self.systemd.path
        # (stdout not ours: a successor inherits it and would hold a caller's pipe open)
        self.proc = subprocess.Popen([sys.executable, "-m", "turnd", "serve", "--config", self.conf],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log_path, "a"),
                                     cwd=ROOT, env=env)
        self.pids = [self.proc.pid]
        self.wait_for("listening on udp")

    def text(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_for(self, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while what not in self.text():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what!r} from turnd:\n{self.text()[-2000:]}")
            time.sleep(0.05)

    def usr2(self) -> None:
        self.proc.send_signal(signal.SIGUSR2)

    def systemd_restart(self) -> None:
        """systemctl restart: SIGTERM, wait for the exit, start the next with the store."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait()
        self.systemd.drain()  # (its last messages)
        self.proc = self.systemd.start_with_store(self.conf, open(self.log_path, "a"), cwd=ROOT)
        self.pids.append(self.proc.pid)

    def close(self) -> None:
        started = re.findall(r"successor started \(pid (\d+)\)", self.text())
        for pid in (*self.pids, *map(int, started)):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in (*self.pids, *map(int, started)):
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                if pid == self.proc.pid and self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        if self.systemd is not None:
            self.systemd.close()


def load(args, via: str) -> dict:
    server = Server(systemd=via == "systemd")
    try:
        calls = types.SimpleNamespace(
            host="127.0.0.1", port=server.port, user=USER, password=PASSWORD, pid=None,
            allocations=args.allocations, rate=args.rate, seconds=args.seconds, size=200,
            send=False, one_source=False, first_port=0)
        restart = server.usr2 if via == "usr2" else server.systemd_restart
        result = run_calls(calls, midway=restart)
        text = server.text()
        adopted = re.findall(r"restart: adopted (\d+) allocations", text)
        if not adopted:
            raise RuntimeError(f"turnd did not restart:\n{text[-2000:]}")
        result["adopted"] = int(adopted[-1])
        unread = re.search(r"sockets unread for (\d+) ms", text)
        result["unread_ms"] = int(unread.group(1)) if unread else None
        return result
    finally:
        server.close()


def handover_time(args) -> dict:
    """--idle allocations and one call at 1,000 datagrams/s through SIGUSR2."""
    server = Server()
    try:
        addr = ("127.0.0.1", server.port)
        t0 = time.monotonic()
        clients = []
        for i in range(args.idle):
            cl = Client(addr, USER, PASSWORD, source_address(i))
            cl.allocate()
            clients.append(cl)
        setup_s = time.monotonic() - t0
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.2", 0))
        call = Client(addr, USER, PASSWORD, "127.0.0.3", rcvbuf=4 << 20)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        call.allocate()
        call.request(c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4001),
                                      (c.XOR_PEER_ADDRESS, peer.getsockname())])
        stop = threading.Event()

        def echo():
            peer.settimeout(0.2)
            while not stop.is_set():
                try:
                    data, source = peer.recvfrom(2048)
                    peer.sendto(data, source)
                except socket.timeout:
                    pass
        got = set()

        def receive():
            call.sock.settimeout(0.2)
            while not stop.is_set():
                try:
                    data = call.sock.recv(2048)
                    if data[:2] == b"\x40\x01":
                        got.add(int(data[4:10]))
                except socket.timeout:
                    pass
        threads = [threading.Thread(target=f, daemon=True) for f in (echo, receive)]
        for t in threads:
            t.start()
        start = time.monotonic()
        for i in range(args.packets):
            if i == args.packets // 4:
                server.usr2()
            call.sock.sendto(channel_frame(0x4001, b"%06d" % i), addr)
            time.sleep(max(0.0, start + (i + 1) / 1000 - time.monotonic()))
        time.sleep(1)
        stop.set()
        for t in threads:
            t.join()
        server.wait_for("restart: handed over")
        m = re.search(r"handed over to pid \d+ \((\d+) allocations, \d+ TCP connections; "
                      r"sockets unread for (\d+) ms\)", server.text())
        return {"allocations": int(m.group(1)), "unread_ms": int(m.group(2)),
                "setup_s": setup_s, "call_sent": args.packets,
                "call_lost": args.packets - len(got)}
    finally:
        server.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("load", "time"))
    ap.add_argument("--via", choices=("usr2", "systemd"), help="load: one way to restart only")
    ap.add_argument("--allocations", type=int, default=1000, help="load: calls")
    ap.add_argument("--rate", type=float, default=20000.0, help="load: client->peer datagrams/s")
    ap.add_argument("--seconds", type=float, default=10.0, help="load: how long")
    ap.add_argument("--idle", type=int, default=10000, help="time: idle allocations")
    ap.add_argument("--packets", type=int, default=2000, help="time: of the call, 1 per ms")
    args = ap.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # clients, and the store's copies
    if args.only in (None, "load"):
        for via in ([args.via] if args.via else ["usr2", "systemd"]):
            r = load(args, via)
            how = {"usr2": "SIGUSR2 hand-over", "systemd": "systemd-style restart"}[via]
            print(f"{how}: {r['allocations']} calls at {r['offered_pps']:.0f} datagrams/s, "
                  f"{r['adopted']} allocations adopted: lost {r['sent'] - r['received']} of "
                  f"{r['sent']} ({r['loss_pct']:.3f} %); longest gap {r['longest_gap_ms']:.0f} ms"
                  + (f" (sockets unread {r['unread_ms']} ms)" if r["unread_ms"] is not None else "")
                  + f"; round trip p50 {r['rtt_p50_ms']:.2f} ms, p99 {r['rtt_p99_ms']:.2f} ms, "
                  f"max {r['rtt_max_ms']:.0f} ms", flush=True)
    if args.only in (None, "time"):
        r = handover_time(args)
        print(f"hand-over of {r['allocations']} allocations (made in {r['setup_s']:.1f} s): "
              f"sockets unread for {r['unread_ms']} ms; a call at 1,000 datagrams/s lost "
              f"{r['call_lost']} of {r['call_sent']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
