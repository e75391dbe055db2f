"""systemd's service notification protocol (sd_notify(3)), in pure Python: datagrams of
``KEY=VALUE`` lines to the unix socket named by ``NOTIFY_SOCKET`` (a path, or ``@name`` in
the abstract namespace).  ``Type=notify`` units wait for ``READY=1``; ``WatchdogSec=`` kills
and restarts a service that stops sending ``WATCHDOG=1`` (turnd sends it from its event loop,
so a stuck loop is restarted); ``RELOADING=1`` with ``MONOTONIC_USEC`` brackets a reload.

Without ``NOTIFY_SOCKET`` (not under systemd) every call does nothing.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, environ=None):
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address = ("\0" + path[1:]) if path.startswith("@") else path
        self.sock: socket.socket | None = None
        if self.address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # WATCHDOG_USEC applies to us only if WATCHDOG_PID is unset or ours (sd_watchdog_enabled)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 1e6 / 2 if usec.isdigit() and ours and self.sock else None

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, *lines: str, fds: tuple[int, ...] = ()) -> bool:
        """Send one notification; False if it could not be sent (never raises)."""
        if self.sock is None:
            return False
        data = "\n".join(lines).encode()
        try:
            if fds:
                import array
                self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            array.array("i", fds).tobytes())], 0, self.address)
            else:
                self.sock.sendto(data, self.address)
            return True
        except OSError:
            return False

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str = "") -> None:
        self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
