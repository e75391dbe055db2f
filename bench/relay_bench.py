#!/usr/bin/env python3
"""Relay benchmark: CPU per relayed ChannelData packet, turnd and (optionally) coturn.

One client allocates on the server, binds a channel to a UDP echo peer and sends
``--packets`` ChannelData datagrams of ``--size`` bytes, keeping at most ``--window``
in flight. Each one crosses the server twice (client -> peer, peer -> client). The
server's CPU time (user + system, from /proc) divided by the packets it relayed is the
figure of merit; throughput and loss are reported too. Everything runs on loopback and
stops by itself (bounded packet count and ``--timeout``).

    python bench/relay_bench.py                 # turnd only
    python bench/relay_bench.py --coturn        # turnd and coturn side by side
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from turnd.stun import Message, decode_untrusted, encode, long_term_key  # noqa: E402
from turnd.stun import constants as c  # noqa: E402

USER, PASSWORD, REALM = "bench", "bench-password", "bench.test"


def free_port(kind=socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_for_udp(port: int, timeout: float = 15.0) -> None:
    """Until a Binding request on the port is answered."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(0.2)
    deadline = time.monotonic() + timeout
    req = encode(Message(c.BINDING, c.REQUEST, os.urandom(12)))
    try:
        while time.monotonic() < deadline:
            sock.sendto(req, ("127.0.0.1", port))
            try:
                sock.recvfrom(2048)
                return
            except OSError:
                continue
        raise RuntimeError(f"server on port {port} did not answer")
    finally:
        sock.close()


def start_turnd(port: int, workdir: str) -> subprocess.Popen:
    path = os.path.join(workdir, "turnd.toml")
    with open(path, "w") as f:
        f.write(f'[server]\nlisten = ["127.0.0.1:{port}"]\nrealm = "{REALM}"\n'
                f'[auth]\nusers = {{ {USER} = "{PASSWORD}" }}\n'
                f'[relay]\nports = "44000-44999"\n[peers]\nallow = ["127.0.0.1/32"]\n')
    return subprocess.Popen([sys.executable, "-m", "turnd", "serve", "--config", path,
                             "--log-level", "warning"], stderr=subprocess.DEVNULL)


def start_coturn(port: int, workdir: str) -> subprocess.Popen:
    path = os.path.join(workdir, "turnserver.conf")
    with open(path, "w") as f:
        f.write(f"listening-ip=127.0.0.1\nlistening-port={port}\nrelay-ip=127.0.0.1\n"
                f"lt-cred-mech\nuser={USER}:{PASSWORD}\nrealm={REALM}\nallow-loopback-peers\n"
                "no-cli\nno-tls\nno-dtls\nlog-file=stdout\nno-stdout-log\nsimple-log\n"
                "min-port=45000\nmax-port=45999\nno-multicast-peers\n")
    return subprocess.Popen(["turnserver", "-c", path], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def start_echo_peer(port: int) -> subprocess.Popen:
    code = ("import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            f"s.bind(('127.0.0.1',{port}))\nb=bytearray(65536)\n"
            "while True:\n n,a=s.recvfrom_into(b)\n s.sendto(memoryview(b)[:n],a)\n")
    return subprocess.Popen([sys.executable, "-c", code])


class Client:
    def __init__(self, server: tuple):
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.settimeout(2)
        self.nonce = None
        self.key = long_term_key(USER, REALM, PASSWORD)

    def call(self, method: int, attrs: list) -> Message:
        for _ in range(3):
            extra = [(c.USERNAME, USER), (c.REALM, REALM), (c.NONCE, self.nonce)] if self.nonce else []
            msg = Message(method, c.REQUEST, os.urandom(12), attrs + extra)
            self.sock.sendto(encode(msg, key=self.key if self.nonce else None), self.server)
            resp = decode_untrusted(self.sock.recvfrom(65536)[0])
            err = resp.get(c.ERROR_CODE)
            if err is not None and err.code in (401, 438):
                self.nonce = resp.get(c.NONCE)
                continue
            if err is not None:
                raise RuntimeError(f"{c.METHOD_NAMES[method]}: {err.code} {err.reason}")
            return resp
        raise RuntimeError("authentication failed")


def run_one(name: str, server_proc, port: int, peer_port: int, args) -> dict:
    wait_for_udp(port)
    client = Client(("127.0.0.1", port))
    client.call(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
    client.call(c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4000), (c.XOR_PEER_ADDRESS, ("127.0.0.1", peer_port))])
    frame = b"\x40\x00" + args.size.to_bytes(2, "big") + os.urandom(args.size)
    sock = client.sock
    sock.setblocking(False)
    rss_before = rss_kib(server_proc.pid)
    cpu0, t0 = cpu_seconds(server_proc.pid), time.monotonic()
    sent = received = 0
    deadline = t0 + args.timeout
    last_progress = t0
    while received < args.packets and time.monotonic() < deadline:
        while sent < args.packets and sent - received < args.window:
            try:
                sock.sendto(frame, client.server)
                sent += 1
            except BlockingIOError:
                break
        try:
            while True:
                data = sock.recv(65536)
                if data[:2] == b"\x40\x00":
                    received += 1
                    last_progress = time.monotonic()
        except BlockingIOError:
            pass
        if time.monotonic() - last_progress > 1.0 and sent - received >= args.window:
            sent = received  # packets were lost: refill the window
            last_progress = time.monotonic()
        else:
            time.sleep(0)
    elapsed = time.monotonic() - t0
    cpu = cpu_seconds(server_proc.pid) - cpu0
    relayed = 2 * received
    return {"server": name, "packets": args.packets, "received": received,
            "lost": args.packets - received, "cpu_us_per_packet": 1e6 * cpu / max(relayed, 1),
            "packets_per_s": relayed / elapsed if elapsed else 0.0,
            "rss_mib": rss_kib(server_proc.pid) / 1024, "rss_growth_kib": rss_kib(server_proc.pid) - rss_before}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=20000)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--coturn", action="store_true", help="also measure coturn's turnserver")
    args = parser.parse_args(argv)

    results = []
    with tempfile.TemporaryDirectory() as workdir:
        servers = [("turnd", start_turnd)]
        if args.coturn:
            if shutil.which("turnserver") is None:
                print("coturn's turnserver is not installed (apt-get install coturn)", file=sys.stderr)
                return 2
            servers.append(("coturn", start_coturn))
        for name, start in servers:
            port, peer_port = free_port(), free_port()
            peer = start_echo_peer(peer_port)
            proc = start(port, workdir)
            try:
                results.append(run_one(name, proc, port, peer_port, args))
            finally:
                for p in (proc, peer):
                    p.terminate()
                    try:
                        p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        p.kill()
    print(f"| server | packets | size | lost | CPU us/relayed packet | relayed packets/s | RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['server']} | {r['packets']} | {args.size} | {r['lost']} | "
              f"{r['cpu_us_per_packet']:.1f} | {r['packets_per_s']:.0f} | {r['rss_mib']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
