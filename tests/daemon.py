"""turnd as a real process (``turnd serve``) for tests of signals, systemd and workers: its
own process group, its log read as it goes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time


class Turnd:
    def __init__(self, tmp_path, config_text: str, env: dict | None = None, name: str = "turnd"):
        self.conf = tmp_path / f"{name}.toml"
        self.conf.write_text(config_text)
        self.log = tmp_path / f"{name}.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "turnd", "serve", "--config", str(self.conf)],
                                     stderr=open(self.log, "w"), start_new_session=True,
                                     env=dict(os.environ, **(env or {})))
        self.port = int(self.wait_for(r"listening on udp 127\.0\.0\.1:(\d+)").group(1))

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, timeout: float = 20.0, after: int = 0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.compile(pattern).search(self.text(), after)
            if m:
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"turnd exited {self.proc.returncode}:\n{self.text()}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in:\n{self.text()}")

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode
