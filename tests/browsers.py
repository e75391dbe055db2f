"""Real browsers for tests: headless Chromium and Firefox ESR, each in its own process
group with a fresh profile, started on a URL and stopped cleanly (only their own group).
Used by the interop tests and by tests/fuzz/capture.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile

import trio

# Flags that work here (see the shared notes on driving real peers): headless, no
# sandbox (root), no background networking, no mDNS host names, no crash reporter.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-features=WebRtcHideLocalIpsWithMdns", "--disable-breakpad"]
FIREFOX_PREFS = {
    # WebRTC on loopback (see /work/shared/reference/real-peers.md)
    "media.peerconnection.ice.loopback": True,
    "media.peerconnection.ice.obfuscate_host_addresses": False,
    "media.peerconnection.ice.default_address_only": False,
    "media.navigator.permission.disabled": True,
    # never reach for the network
    "app.update.enabled": False, "app.update.auto": False, "app.update.disabledForTesting": True,
    "app.normandy.enabled": False, "app.shield.optoutstudies.enabled": False,
    "toolkit.telemetry.enabled": False, "toolkit.telemetry.unified": False,
    "toolkit.telemetry.archive.enabled": False,
    "datareporting.healthreport.uploadEnabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "browser.safebrowsing.malware.enabled": False, "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.downloads.enabled": False, "browser.safebrowsing.blockedURIs.enabled": False,
    "browser.safebrowsing.update.enabled": False,
    "browser.shell.checkDefaultBrowser": False, "browser.startup.page": 0,
    "browser.startup.homepage_override.mstone": "ignore", "browser.aboutwelcome.enabled": False,
    "browser.newtabpage.enabled": False, "browser.region.update.enabled": False,
    "browser.region.network.url": "", "browser.topsites.contile.enabled": False,
    "browser.sessionstore.resume_from_crash": False,
    "network.captive-portal-service.enabled": False, "network.connectivity-service.enabled": False,
    "network.dns.disablePrefetch": True, "network.prefetch-next": False,
    "extensions.update.enabled": False, "extensions.getAddons.cache.enabled": False,
    "extensions.systemAddon.update.enabled": False, "media.gmp-manager.updateEnabled": False,
    "services.settings.server": "http://127.0.0.1:9/", "toolkit.startup.max_resumed_crashes": -1,
}


def chromium_command(url: str, profile: str) -> tuple[list[str], dict] | None:
    """(command, environment) for headless Chromium on ``url``; None when not installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return None
    # TMPDIR: Chromium's singleton socket directory goes with the profile
    return ([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url],
            dict(os.environ, TMPDIR=profile))


def firefox_command(url: str, profile: str) -> tuple[list[str], dict] | None:
    """(command, environment) for headless Firefox ESR on ``url`` with a fresh profile
    whose prefs allow WebRTC on loopback and reach for no network; None when missing."""
    browser = shutil.which("firefox-esr") or shutil.which("firefox")
    if browser is None:
        return None
    with open(os.path.join(profile, "user.js"), "w") as f:
        for key, value in FIREFOX_PREFS.items():
            v = ("true" if value else "false") if isinstance(value, bool) else \
                str(value) if isinstance(value, int) else f'"{value}"'
            f.write(f'user_pref("{key}", {v});\n')
    env = dict(os.environ, MOZ_HEADLESS="1", HOME=profile, TMPDIR=profile,
               MOZ_CRASHREPORTER_DISABLE="1")
    return [browser, "--headless", "--no-remote", "--profile", profile, url], env


def group_members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (zombies excluded)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry))
    return out


class Child:
    """A process in its own process group; ``stop()`` ends that group and only it."""

    def __init__(self, name: str, cmd: list[str], env=None):
        self.name, self.cmd, self.env = name, cmd, env
        self.output = tempfile.TemporaryFile()

    async def start(self) -> "Child":
        self.proc = await trio.lowlevel.open_process(
            self.cmd, stdin=subprocess.DEVNULL, stdout=self.output, stderr=subprocess.STDOUT,
            env=self.env, start_new_session=True)
        return self

    def text(self) -> str:
        self.output.seek(0)
        return self.output.read().decode(errors="replace")

    async def wait(self, timeout: float) -> int | None:
        """Wait for the leader to exit by itself; None on timeout (it is then stopped)."""
        with trio.move_on_after(timeout):
            await self.proc.wait()
        if self.proc.returncode is None:
            await self.stop()
            return None
        await self.stop()  # a leftover child of its group, if any
        return self.proc.returncode

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL, to the group.  The leader is reaped only at the end, and a
        pid is never reused while its process group has members: ``pgid`` stays ours."""
        pgid = self.proc.pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.returncode is not None and not group_members(pgid):
                break
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            with trio.move_on_after(3):
                while group_members(pgid):
                    await trio.sleep(0.1)
            if not group_members(pgid):
                break
        with trio.move_on_after(5):
            await self.proc.wait()
