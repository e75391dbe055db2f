"""The ``turnd`` command: serve, check-config, --version."""

from __future__ import annotations

import logging
import os
import sys

import click
import trio

from . import __version__
from .config import Config, ConfigError, load_config
from .sockets import StartupError

EXIT_CONFIG = 2
EXIT_STARTUP = 1


def _load_or_exit(path: str) -> Config:
    """The config, its TLS certificate and key checked too (one line and exit 2 if not)."""
    try:
        config = load_config(path)
        if config.tls.cert or config.tls.key:
            from .tls import load_context
            load_context(config.tls)
        return config
    except ConfigError as exc:
        click.echo(f"config error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


@click.group()
@click.version_option(__version__, prog_name="turnd")
def main() -> None:
    """turnd: a STUN/TURN server (RFC 8489, RFC 8656)."""


@main.command()
@click.option("--config", "config_path", default="/etc/turnd/turnd.toml", show_default=True,
              type=click.Path(dir_okay=False), help="The TOML configuration file.")
@click.option("--log-level", default=None, help="Overrides [log] level.",
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--worker", "worker_spec", default=None, hidden=True,
              help="(internal) serve as a worker of a master process")
def serve(config_path: str, log_level: str | None, worker_spec: str | None) -> None:
    """Serve STUN and TURN until SIGINT or SIGTERM; SIGHUP reloads, SIGUSR1 drains."""
    config = _load_or_exit(config_path)
    from .logs import setup_logging
    from .notify import Notifier
    from .server import WorkerSpec, run
    worker = WorkerSpec.from_json(worker_spec) if worker_spec else None
    log_level = log_level or config.log.level
    setup_logging(log_level, config.log.format, f"turnd[{worker.index}]" if worker else "turnd")
    notifier = Notifier()
    failed = None
    try:
        if worker is None and config.server.workers > 1:
            from .workers import run_master
            trio.run(run_master, config, config_path, log_level, notifier)
        else:
            trio.run(run, config, worker, config_path, notifier)
    except* StartupError as group:
        failed = group.exceptions[0]
    if failed is not None:
        click.echo(f"turnd: {failed}", err=True)
        sys.exit(EXIT_STARTUP)


@main.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False))
def check_config(path: str) -> None:
    """Validate a configuration file and exit 0 (valid) or 2 (invalid)."""
    _load_or_exit(path)
    click.echo(f"{path}: ok")


@main.command("gen-cert")
@click.option("--host", required=True, help="The name (or IP address) clients use in turns: URLs.")
@click.option("--out", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Where to write turnd.crt and turnd.key.")
@click.option("--days", default=365, show_default=True, type=click.IntRange(1, 3650))
def gen_cert(host: str, out: str, days: int) -> None:
    """Write a self-signed certificate and key, for tests and first setup."""
    from .tls import generate, spki_sha256
    cert, key = generate(host, out, days)
    click.echo(f"wrote {cert} and {key} (mode 0600), for {host}, valid {days} days")
    click.echo(f'[tls]\ncert = "{os.path.abspath(cert)}"\nkey = "{os.path.abspath(key)}"')
    click.echo(f"browsers will not trust it; for a test with Chromium: "
               f"--ignore-certificate-errors-spki-list={spki_sha256(cert)}")


def find_daemons(config_path: str | None = None) -> list[int]:
    """PIDs of running ``turnd serve`` processes (masters, not workers), optionally only
    those serving ``config_path``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if "serve" not in args or "--worker" in args:
            continue
        if not any(a.endswith("turnd") or a == "turnd" for a in args[:3]):
            continue
        if config_path is not None:
            given = args[args.index("--config") + 1] if "--config" in args[:-1] else \
                "/etc/turnd/turnd.toml"
            if os.path.abspath(given) != os.path.abspath(config_path):
                continue
        found.append(int(entry))
    return found


def _signal_daemon(sig, what: str, pid: int | None, config_path: str | None) -> None:
    import signal as _signal
    pids = [pid] if pid else find_daemons(config_path)
    if len(pids) != 1:
        click.echo(f"turnd: {'no' if not pids else len(pids)} running turnd serve found"
                   f"{'' if not pids else ' (' + ', '.join(map(str, pids)) + ')'}; "
                   "name one with --pid or --config", err=True)
        sys.exit(EXIT_STARTUP)
    try:
        os.kill(pids[0], sig)
    except OSError as exc:
        click.echo(f"turnd: cannot signal pid {pids[0]}: {exc.strerror}", err=True)
        sys.exit(EXIT_STARTUP)
    click.echo(f"turnd (pid {pids[0]}): {what} (sent {_signal.Signals(sig).name})")


@main.command()
@click.option("--pid", type=int, default=None, help="The turnd process (default: find it).")
@click.option("--config", "config_path", default=None, help="Find the turnd serving this file.")
def drain(pid: int | None, config_path: str | None) -> None:
    """Refuse new allocations (300 to [server] alternate, else 403); live ones run out."""
    import signal as _signal
    _signal_daemon(_signal.SIGUSR1, "draining", pid, config_path)


@main.command()
@click.option("--pid", type=int, default=None, help="The turnd process (default: find it).")
@click.option("--config", "config_path", default=None, help="Find the turnd serving this file.")
def reload(pid: int | None, config_path: str | None) -> None:
    """Re-read the configuration and TLS certificate (SIGHUP); calls go on."""
    import signal as _signal
    _signal_daemon(_signal.SIGHUP, "reloading", pid, config_path)
