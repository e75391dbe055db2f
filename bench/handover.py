"""How long a restart (SIGUSR2 hand-over) leaves turnd's sockets unread, with N allocations,
and whether a call relaying through it meanwhile loses anything.

    python bench/handover.py --allocations 10000
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from turnbench import Client, channel_frame, source_address  # noqa: E402

from turnd.stun import constants as c  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--allocations", type=int, default=2000)
    ap.add_argument("--packets", type=int, default=2000, help="of the call, at 1 per ms")
    args = ap.parse_args(argv)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = tempfile.mkdtemp(prefix="turnd-handover-")
    conf = os.path.join(work, "turnd.toml")
    with open(conf, "w") as f:
        f.write(f'[server]\nlisten = ["127.0.0.1:{port}"]\nrealm = "bench"\n'
                '[auth]\nusers = { bench = "bench" }\n[relay]\nports = "20000-39999"\n'
                '[peers]\nallow = ["127.0.0.0/8"]\n[limits]\nunauthenticated_rate = 0\nip_quota = 0\n'
                '[metrics]\nlisten = ""\n')
    log_path = os.path.join(work, "turnd.log")
    # (stdout not ours: a successor inherits it and would hold a caller's pipe open)
    proc = subprocess.Popen([sys.executable, "-m", "turnd", "serve", "--config", conf],
                            stdout=subprocess.DEVNULL, stderr=open(log_path, "w"), cwd=ROOT)
    successor = None
    try:
        deadline = time.monotonic() + 20
        while "listening on udp" not in open(log_path).read():
            assert time.monotonic() < deadline and proc.poll() is None, open(log_path).read()
            time.sleep(0.05)
        server = ("127.0.0.1", port)
        t0 = time.monotonic()
        clients = []
        for i in range(args.allocations):
            cl = Client(server, "bench", "bench", source_address(i))
            cl.allocate()
            clients.append(cl)
        print(f"{args.allocations} allocations in {time.monotonic() - t0:.1f} s")
        # one call: a channel to an echo peer, a datagram a millisecond
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.2", 0))
        call = Client(server, "bench", "bench", "127.0.0.3")
        relayed = call.allocate()
        call.request(c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4001),
                                      (c.XOR_PEER_ADDRESS, peer.getsockname())])
        stop = threading.Event()

        def echo():
            peer.settimeout(0.2)
            while not stop.is_set():
                try:
                    data, addr = peer.recvfrom(2048)
                    peer.sendto(data, addr)
                except socket.timeout:
                    pass
        threading.Thread(target=echo, daemon=True).start()
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
        threading.Thread(target=receive, daemon=True).start()
        for i in range(args.packets):
            if i == args.packets // 4:
                proc.send_signal(signal.SIGUSR2)
            call.sock.sendto(channel_frame(0x4001, b"%06d" % i), server)
            time.sleep(0.001)
        time.sleep(1)
        stop.set()
        text = open(log_path).read()
        m = re.search(r"handed over to pid (\d+) \((\d+) allocations, \d+ TCP connections; sockets unread for (\d+) ms\)", text)
        assert m, text[-2000:]
        successor = int(m.group(1))
        started = re.search(r"(\d\d:\d\d:\d\d,\d+)Z turnd INFO restart: successor started", text).group(1)
        print(f"handed over {m.group(2)} allocations; sockets unread for {m.group(3)} ms "
              f"(successor started at {started}, Python start-up included before that)")
        lost = args.packets - len(got)
        print(f"call through the restart: {lost} of {args.packets} datagrams lost "
              f"({100 * lost / args.packets:.2f} %); relayed address {relayed}")
        return 0
    finally:
        started = re.findall(r"successor started \(pid (\d+)\)", open(log_path).read())
        for pid in (proc.pid, successor, *map(int, started)):
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        proc.wait(timeout=15)


if __name__ == "__main__":
    sys.exit(main())
