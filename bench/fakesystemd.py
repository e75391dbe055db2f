"""A fake systemd with a file descriptor store, for tests and bench/handover.py.

It listens on a NOTIFY_SOCKET, keeps the descriptors turnd sends with ``FDSTORE=1`` (by
``FDNAME=``) and forgets those of ``FDSTOREREMOVE=1``, as systemd's store does; then it
starts the next turnd the way systemd does after a restart: the stored descriptors at 3, 4,
... with ``LISTEN_FDS``, ``LISTEN_FDNAMES`` and ``LISTEN_PID`` (its own pid: the launcher
execs turnd).
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import threading


class FdStoringSystemd:
    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.setblocking(False)
        self.store: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.started: list[subprocess.Popen] = []  # stopped by close()
        self.thread: threading.Thread | None = None

    def drain(self) -> None:
        """Take every notification waiting (non-blocking)."""
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 4096, 16)
            except BlockingIOError:
                return
            msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            name = msg.get("FDNAME", "")
            with self.lock:
                if msg.get("FDSTORE") == "1" and fds:
                    if name in self.store:
                        os.close(self.store[name])
                    self.store[name] = fds.pop(0)
                elif msg.get("FDSTOREREMOVE") == "1" and name in self.store:
                    os.close(self.store.pop(name))
            for fd in fds:
                os.close(fd)

    def keep_draining(self) -> threading.Thread:
        """Drain in a thread, as systemd reads at once (turnd's notifications block when
        nobody reads), until ``stop`` is set."""
        import select

        def loop():
            poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN)
            while not self.stop.is_set():
                if poller.poll(100):
                    self.drain()
        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()
        return self.thread

    def start_with_store(self, conf: str, stderr, cwd: str | None = None) -> subprocess.Popen:
        """Start ``turnd serve --config conf`` as systemd would after a restart (in the child,
        between fork and exec, as systemd does)."""
        with self.lock:
            names = list(self.store)
            fds = [self.store[n] for n in names]
        high = len(fds) + 64  # above every target (3 .. 3+n-1): dup2 can't clobber a source

        def in_child():  # (no imports here: another thread may hold the import lock)
            moved = [fcntl.fcntl(f, fcntl.F_DUPFD_CLOEXEC, high) for f in fds]
            for i, f in enumerate(moved):
                os.dup2(f, 3 + i)  # (not close-on-exec: turnd gets it)
            os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)),
                              LISTEN_FDNAMES=":".join(names), NOTIFY_SOCKET=self.path)
        proc = subprocess.Popen([sys.executable, "-m", "turnd", "serve", "--config", conf],
                                preexec_fn=in_child, close_fds=False, stderr=stderr,
                                stdout=subprocess.DEVNULL, cwd=cwd)
        self.started.append(proc)
        return proc

    def close(self) -> None:
        """Stop the turnds it started, forget the store."""
        for proc in self.started:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        with self.lock:
            for fd in self.store.values():
                os.close(fd)
            self.store.clear()
        self.sock.close()
