#!/usr/bin/env python3
"""`make bench`: turnd and coturn side by side, on loopback, in one run.

Starts turnd (this checkout) and coturn (Debian's `turnserver`) with equivalent configs
(one user, loopback peers allowed on both), then runs each workload of bench/turnbench.py
on both servers, alternating turnd and coturn, --repeat times, and prints one table of
medians and turnd/coturn ratios; the same table is written as Markdown to
bench/results/bench.md (for the README).

    python bench/run.py [--repeat 3] [--quick] [--only calls,hot,...]

Workloads (see bench/turnbench.py): calls (1,000 allocations, channels, 20k pkt/s offered),
calls-send (the same with Send/Data indications carrying FINGERPRINT), hot (one flow),
setup and setup-one-source (allocations per second with authentication), idle (RSS per
idle allocation at 10,000 allocations), load50/load90 (calls at 50 % and 90 % of coturn's
saturation rate), workers (turnd's throughput at saturation, 32 busy flows, with workers = 1
and 2; the server is pinned to CPU 0 with one worker, and gets every CPU with two).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TURNBENCH = os.path.join(ROOT, "bench", "turnbench.py")
USER, PASSWORD, REALM = "bench", "bench-password", "bench.test"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PIN = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def pinned(cmd: list[str], cpus: str) -> list[str]:
    """On a machine with two CPUs or more, the server runs on CPU 0 and the load generator
    (with its echo peer) on CPU 1, so neither takes the other's CPU."""
    return ["taskset", "-c", cpus, *cmd] if PIN else cmd


class Server:
    def __init__(self, name: str, workdir: str, workers: int = 1):
        self.name, self.workdir, self.workers = name, workdir, workers
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.name == "turnd":
            path = os.path.join(self.workdir, f"turnd-{self.port}.toml")
            with open(path, "w") as f:
                f.write(f'[server]\nlisten = ["127.0.0.1:{self.port}"]\nrealm = "{REALM}"\n'
                        + (f'workers = {self.workers}\n' if self.workers != 1 else '') +
                        f'[auth]\nusers = {{ {USER} = "{PASSWORD}" }}\n'
                        f'[relay]\nports = "20000-39999"\n[peers]\nallow = ["127.0.0.0/8"]\n'
                        f'[limits]\nunauthenticated_rate = 0\nip_quota = 0\n')
            cmd = [sys.executable, "-m", "turnd", "serve", "--config", path, "--log-level", "warning"]
        else:
            path = os.path.join(self.workdir, f"coturn-{self.port}.conf")
            with open(path, "w") as f:
                f.write(f"listening-ip=127.0.0.1\nlistening-port={self.port}\nrelay-ip=127.0.0.1\n"
                        f"lt-cred-mech\nuser={USER}:{PASSWORD}\nrealm={REALM}\n"
                        "allow-loopback-peers\nno-cli\nno-tls\nno-dtls\nlog-file=stdout\n"
                        "no-stdout-log\nsimple-log\nmin-port=40000\nmax-port=59999\n"
                        "no-multicast-peers\ntotal-quota=0\nuser-quota=0\n")
            cmd = ["turnserver", "-c", path]
        # One CPU for one process; workers get every CPU but the load generator's.
        cpus = "0" if self.workers == 1 else ",".join(str(i) for i in range(os.cpu_count() or 1))
        self.proc = subprocess.Popen(pinned(cmd, cpus), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=ROOT)
        self.wait_ready()

    def wait_ready(self, timeout: float = 20.0) -> None:
        sys.path.insert(0, ROOT)
        from turnd.stun import Message, encode
        from turnd.stun import constants as c
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(0.2)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                sock.sendto(encode(Message(c.BINDING, c.REQUEST, os.urandom(12))), ("127.0.0.1", self.port))
                try:
                    sock.recv(2048)
                    return
                except OSError:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
        finally:
            sock.close()
        raise RuntimeError(f"{self.name} did not answer on port {self.port}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def bench(self, workload: str, *args: str, timeout: float = 300) -> dict:
        cmd = [sys.executable, TURNBENCH, workload, "--port", str(self.port), "--user", USER,
               "--password", PASSWORD, "--pid", str(self.proc.pid), *args, *fresh_ports(args)]
        out = subprocess.run(pinned(cmd, "1"), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if out.returncode:
            raise RuntimeError(f"{self.name} {workload}: {out.stderr.strip()[-500:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict], key: str):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


_next_port = [1024]  # client source ports, below the relay ranges: each run its own


def fresh_ports(args) -> tuple[str, str]:
    """--first-port for a run: 5-tuples no earlier run used (coturn keeps a deleted
    allocation for a while and answers 437 on its 5-tuple)."""
    count = 1
    if "--one-source" in args:
        count = int(args[args.index("--allocations") + 1]) if "--allocations" in args else 1000
    first = _next_port[0]
    _next_port[0] = first + count
    if _next_port[0] > 19999:
        raise RuntimeError("out of fresh client ports: fewer repeats")
    return "--first-port", str(first)


def alternate(servers: dict, repeat: int, workload: str, *args: str) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {name: [] for name in servers}
    for _ in range(repeat):
        for name, server in servers.items():
            results[name].append(server.bench(workload, *args))
    return results


def saturation(server: Server, start: float, args: list[str], steps: int = 8) -> float:
    """The highest offered rate of the calls workload (stepping by 25 %) with under 0.5 %
    loss and the load generator keeping up."""
    rate, best = start, 0.0
    for _ in range(steps):
        r = server.bench("calls", "--rate", str(rate), *args)
        if r["loss_pct"] >= 0.5 or r["sent"] < 0.95 * rate * float(args[args.index("--seconds") + 1]):
            break
        best = rate
        rate *= 1.25
    return best


ROWS = []  # (label, turnd value, coturn value, unit, better: "lower"|"higher"|None)


def row(label: str, turnd, coturn, unit: str, better: str | None = "lower") -> None:
    ROWS.append((label, turnd, coturn, unit, better))
    ratio = f"{turnd / coturn:.2f}" if turnd is not None and coturn else "-"
    print(f"{label:58s} turnd {fmt(turnd):>10s}  coturn {fmt(coturn):>10s}  {unit:16s} ratio {ratio}",
          flush=True)


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def markdown(machine: str) -> str:
    lines = ["| workload | turnd | coturn | unit | turnd/coturn |", "|---|---|---|---|---|"]
    for label, t, cval, unit, _ in ROWS:
        ratio = f"{t / cval:.2f}" if t is not None and cval else "-"
        lines.append(f"| {label} | {fmt(t)} | {fmt(cval)} | {unit} | {ratio} |")
    return "\n".join(lines) + f"\n\n{machine}\n"


def machine_line() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    coturn = subprocess.run(["turnserver", "--version"], capture_output=True, text=True).stdout.strip()
    pin = ("server on CPU 0, load generator and echo peer on CPU 1 (taskset)" if PIN
           else "server, load generator and echo peer sharing the CPUs")
    return (f"Machine: {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}; coturn {coturn}; {pin}; loopback only; "
            f"medians of the runs.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="seconds-long runs (a smoke test)")
    parser.add_argument("--only", default="", help="comma-separated workloads")
    parser.add_argument("--no-coturn", action="store_true")
    args = parser.parse_args(argv)
    if not args.no_coturn and shutil.which("turnserver") is None:
        print("coturn's turnserver is not installed (apt-get install coturn); --no-coturn runs turnd alone",
              file=sys.stderr)
        return 2
    only = set(filter(None, args.only.split(",")))
    want = lambda name: not only or name in only
    q = args.quick
    secs = ["--seconds", "2" if q else "8"]
    allocs = ["--allocations", "50" if q else "1000"]
    rate = "2000" if q else "20000"
    idle_n = "200" if q else "10000"
    setup_n = "50" if q else "1000"
    with tempfile.TemporaryDirectory() as workdir:
        servers = {"turnd": Server("turnd", workdir)}
        if not args.no_coturn:
            servers["coturn"] = Server("coturn", workdir)
        try:
            for s in servers.values():
                s.start()
            get = lambda res, name, key: median_of(res[name], key) if name in res else None
            if want("calls"):
                res = alternate(servers, args.repeat, "calls", "--rate", rate, *allocs, *secs)
                row(f"many calls ({allocs[1]} allocations, channels, {rate} pkt/s): CPU",
                    get(res, "turnd", "cpu_us_per_relayed"), get(res, "coturn", "cpu_us_per_relayed"),
                    "µs/relayed pkt")
                row("  loss", get(res, "turnd", "loss_pct"), get(res, "coturn", "loss_pct"), "%", None)
                row("  round trip p50", get(res, "turnd", "rtt_p50_ms"), get(res, "coturn", "rtt_p50_ms"), "ms")
                row("  round trip p99", get(res, "turnd", "rtt_p99_ms"), get(res, "coturn", "rtt_p99_ms"), "ms")
            if want("calls-send"):
                res = alternate(servers, args.repeat, "calls", "--send", "--rate", rate, *allocs, *secs)
                row(f"many calls, Send/Data + FINGERPRINT (Firefox), {rate} pkt/s: CPU",
                    get(res, "turnd", "cpu_us_per_relayed"), get(res, "coturn", "cpu_us_per_relayed"),
                    "µs/relayed pkt")
                row("  loss", get(res, "turnd", "loss_pct"), get(res, "coturn", "loss_pct"), "%", None)
            if want("hot"):
                res = alternate(servers, args.repeat, "hot", *secs)
                row("one hot flow (ChannelData): CPU", get(res, "turnd", "cpu_us_per_relayed"),
                    get(res, "coturn", "cpu_us_per_relayed"), "µs/relayed pkt")
                row("  throughput", get(res, "turnd", "relayed_pps"), get(res, "coturn", "relayed_pps"),
                    "relayed pkt/s", "higher")
            if want("setup"):
                res = alternate(servers, args.repeat, "setup", "--allocations", setup_n)
                row("allocation set-up, many source addresses", get(res, "turnd", "per_s"),
                    get(res, "coturn", "per_s"), "allocations/s", "higher")
                res = alternate(servers, args.repeat, "setup", "--allocations", setup_n, "--one-source")
                row("allocation set-up, one source address", get(res, "turnd", "per_s"),
                    get(res, "coturn", "per_s"), "allocations/s", "higher")
                res = alternate(servers, args.repeat, "setup", "--allocations", setup_n, "--parallel", "32")
                row("allocation set-up, 32 clients at a time (a meeting joining)", get(res, "turnd", "per_s"),
                    get(res, "coturn", "per_s"), "allocations/s", "higher")
                row("  CPU per allocation", get(res, "turnd", "cpu_ms_per_allocation"),
                    get(res, "coturn", "cpu_ms_per_allocation"), "ms")
            if want("idle"):
                res = alternate(servers, 1, "idle", "--allocations", idle_n)
                row(f"RSS per idle allocation ({idle_n} allocations)", get(res, "turnd", "kib_per_allocation"),
                    get(res, "coturn", "kib_per_allocation"), "KiB")
            if want("load") and "coturn" in servers:
                sat = saturation(servers["coturn"], 10000.0 if not q else 1000.0, [*allocs, *secs],
                                 2 if q else 8)
                for share in (0.5, 0.9):
                    offered = str(round(sat * share))
                    res = alternate(servers, args.repeat, "calls", "--rate", offered, *allocs, *secs)
                    row(f"at {share:.0%} of coturn's saturation ({offered} pkt/s): loss",
                        get(res, "turnd", "loss_pct"), get(res, "coturn", "loss_pct"), "%", None)
                    row("  round trip p99", get(res, "turnd", "rtt_p99_ms"), get(res, "coturn", "rtt_p99_ms"), "ms")
        finally:
            for s in servers.values():
                s.stop()
        if want("workers"):
            through = {}
            for workers in (1, 2):
                s = Server("turnd", workdir, workers)
                try:
                    s.start()
                    # 32 busy flows (spread over the workers by SO_REUSEPORT), each with 128
                    # datagrams in flight, sent and received 64 per system call: the most
                    # the server relays, with a generator far cheaper than the server.
                    res = [s.bench("hot", "--allocations", "32", "--window", "128", *secs)
                           for _ in range(args.repeat)]
                    through[workers] = median_of(res, "relayed_pps")
                finally:
                    s.stop()
            row("turnd saturation, 32 busy flows, workers = 1", through[1], None, "relayed pkt/s", "higher")
            row("turnd saturation, 32 busy flows, workers = 2", through[2], None, "relayed pkt/s", "higher")
            row("  workers = 2 / workers = 1", through[2] / through[1] if through[1] else None, None,
                "x", "higher")
    machine = machine_line()
    table = markdown(machine)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "bench.md"), "w") as f:
        f.write(table)
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
