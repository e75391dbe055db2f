"""The ``turnd`` command: serve, check-config, --version."""

from __future__ import annotations

import gc
import logging
import os
import sys

import attrs
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
@click.option("--first-run-secret", "first_run", default=None, type=click.Path(dir_okay=False),
              help="When the config has no users and no secrets: relay anyway, with a TURN REST "
                   "secret kept in this file (made, mode 0600, if missing). What make run uses.")
def serve(config_path: str, log_level: str | None, worker_spec: str | None,
          first_run: str | None) -> None:
    """Serve STUN and TURN until SIGINT or SIGTERM; SIGHUP reloads, SIGUSR1 drains."""
    import signal
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):  # until turnd listens: not fatal
        signal.signal(sig, signal.SIG_IGN)
    config = _load_or_exit(config_path)
    from .logs import setup_logging
    from .notify import Notifier
    from .server import WorkerSpec, run
    worker = WorkerSpec.from_json(worker_spec) if worker_spec else None
    log_level = log_level or config.log.level
    setup_logging(log_level, config.log.format, f"turnd[{worker.index}]" if worker else "turnd")
    notifier = Notifier()
    adopted = None
    if worker is None and config.server.workers == 1:
        # Until it serves (server.run turns it back on): the collector would walk every
        # adopted allocation's objects many times over while the sockets wait.
        gc.disable()
    if os.environ.get("TURND_HANDOVER_FD") and worker is None:
        from .handover import StateError, receive
        fd = int(os.environ.pop("TURND_HANDOVER_FD"))
        try:
            adopted = receive(fd)
        except (StateError, OSError) as exc:
            click.echo(f"turnd: cannot take over: {exc}", err=True)
            sys.exit(EXIT_STARTUP)
    stored: set = set()
    if adopted is None and worker is None and config.server.workers == 1:
        from .fdstore import from_listen_fds
        adopted, stored = from_listen_fds()
    first_secrets = ()
    if first_run and not config.auth.users and not config.auth.secrets:
        first_secrets = _first_run(config, first_run, announce=worker is None)
        config = attrs.evolve(config, auth=attrs.evolve(config.auth, secrets=first_secrets))
    failed = None
    try:
        if worker is None and config.server.workers > 1:
            from .workers import run_master
            trio.run(run_master, config, config_path, log_level, notifier, first_run)
        else:
            trio.run(run, config, worker, config_path, notifier, first_secrets, adopted, stored)
    except* StartupError as group:
        failed = group.exceptions[0]
    if failed is not None:
        click.echo(f"turnd: {failed}", err=True)
        sys.exit(EXIT_STARTUP)
    if notifier.enabled:
        # systemd starts the next turnd once this one has exited, and the sockets wait
        # unread meanwhile: skip tearing down the heap (tens of ms with many allocations).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _first_run(config: Config, path: str, announce: bool) -> tuple[str, ...]:
    """make run with no credentials configured: a REST secret of its own, and (when it is
    made) an RTCIceServer a browser can use at once."""
    import time
    from .tools import first_run_secret, ice_server, rest_credential, turn_urls
    try:
        secret, made = first_run_secret(path)
    except (OSError, ConfigError) as exc:
        click.echo(f"turnd: cannot use the first-run secret {path}: {exc}", err=True)
        sys.exit(EXIT_STARTUP)
    if announce:
        logging.getLogger("turnd").info(
            "no [auth] users or secrets: TURN relays with the first-run REST secret in %s", path)
    if made and announce:
        username, password = rest_credential(secret, "first-run", 86400, time.time())
        click.echo("turnd: first run. Relaying with a TURN REST secret made for you in "
                   f"{path} (mode 0600). An RTCIceServer valid for a day:", err=True)
        click.echo(ice_server(turn_urls(config), username, password))
        click.echo(f"More credentials: turnd credential --secret-file {path} --user NAME --json "
                   "(production: set [auth] users, users_file or secrets)", err=True)
    return (secret,)


@main.command()
@click.option("--secret-file", required=True, type=click.Path(dir_okay=False),
              help="A file holding the TURN REST secret ([auth] secrets); the first line is used.")
@click.option("--user", default="", help="Who the credential is for (part of the user name).")
@click.option("--ttl", default=86400, show_default=True, type=click.IntRange(60, 10 * 365 * 86400),
              help="Seconds the credential stays valid.")
@click.option("--json", "as_json", is_flag=True, help="Print an RTCIceServer object.")
@click.option("--url", "urls", multiple=True, help="TURN URLs for --json (default: from --config).")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="The config whose TURN URLs --json lists (and whose secrets it checks).")
@click.option("--host", default=None, help="The name browsers use in those URLs (turns: needs "
              "the certificate's name); default: the public address in the config.")
def credential(secret_file: str, user: str, ttl: int, as_json: bool, urls: tuple,
               config_path: str | None, host: str | None) -> None:
    """Print TURN REST API credentials, as a web app's back end hands them to browsers."""
    import time
    from .tools import ice_server, read_secret_file, rest_credential, turn_urls
    try:
        secret = read_secret_file(secret_file)[0]
    except ConfigError as exc:
        click.echo(f"turnd: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    config = _load_or_exit(config_path) if config_path else None
    if config is not None and secret not in config.auth.secrets:
        click.echo(f"turnd: warning: the secret in {secret_file} is not in {config_path}'s "
                   "[auth] secrets: turnd will refuse this credential", err=True)
    username, password = rest_credential(secret, user, ttl, time.time())
    if not as_json:
        click.echo(f"username: {username}\npassword: {password}")
        return
    if not urls:
        urls = turn_urls(config or Config(), host)
    click.echo(ice_server(list(urls), username, password))


@main.group()
def user() -> None:
    """Users in [auth] users_file: keys derived from the password, never the password."""


def _users_target(users_file: str | None, config_path: str) -> tuple[str, str]:
    """(users file path, realm)."""
    config = Config()
    if os.path.exists(config_path) or not users_file:
        try:
            config = load_config(config_path, read_users=False)
        except ConfigError as exc:
            click.echo(f"config error: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
    path = users_file or config.auth.users_file
    if not path:
        click.echo(f"turnd: {config_path} sets no [auth] users_file; give --users-file", err=True)
        sys.exit(EXIT_CONFIG)
    return path, config.server.realm


@user.command("add")
@click.argument("name")
@click.option("--users-file", default=None, type=click.Path(dir_okay=False),
              help="Default: [auth] users_file of --config.")
@click.option("--config", "config_path", default="/etc/turnd/turnd.toml", show_default=True,
              help="Gives the realm (keys depend on it) and the users file.")
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True,
              help="Prompted for when not given (or read from stdin when piped).")
def user_add(name: str, users_file: str | None, config_path: str, password: str) -> None:
    """Add NAME (or set a new password); turnd reload applies it."""
    from .tools import add_user
    path, realm = _users_target(users_file, config_path)
    try:
        new = add_user(path, name, realm, password)
    except (ValueError, ConfigError) as exc:
        click.echo(f"turnd: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    click.echo(f"{'added' if new else 'updated'} {name!r} in {path} (realm {realm!r}); "
               "apply with: turnd reload (or systemctl reload turnd)")


@user.command("delete")
@click.argument("name")
@click.option("--users-file", default=None, type=click.Path(dir_okay=False))
@click.option("--config", "config_path", default="/etc/turnd/turnd.toml", show_default=True)
def user_delete(name: str, users_file: str | None, config_path: str) -> None:
    """Delete NAME; turnd reload applies it (its allocations run out)."""
    from .tools import delete_user
    path, _ = _users_target(users_file, config_path)
    if not delete_user(path, name):
        click.echo(f"turnd: no user {name!r} in {path}", err=True)
        sys.exit(EXIT_CONFIG)
    click.echo(f"deleted {name!r} from {path}; apply with: turnd reload")


@main.command("migrate-coturn")
@click.argument("coturn_conf", type=click.Path(dir_okay=False, exists=True))
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="Write the turnd config here (default: print it).")
def migrate_coturn(coturn_conf: str, output: str | None) -> None:
    """Write a turnd.toml equivalent to coturn's turnserver.conf, and list, line by line,
    what could not be mapped and why."""
    from .migrate import parse_coturn, to_toml
    with open(coturn_conf, errors="replace") as f:
        migration = parse_coturn(f.read())
    text = to_toml(migration)
    if output:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o640)  # it may hold passwords and secrets
            f.write(text)
        click.echo(f"wrote {output}; check it with: turnd check-config {output}", err=True)
    else:
        click.echo(text, nl=False)
    if migration.notes:
        click.echo(f"not mapped ({len(migration.notes)}):", err=True)
        for note in migration.notes:
            click.echo(f"  {note}", err=True)


@main.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False, readable=False))
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
    found = _serve_pids(config_path)
    # a successor in the middle of a hand-over is its predecessor's child: one turnd still
    return [p for p in found if _parent(p) not in found]


def _serve_pids(config_path: str | None = None) -> list[int]:
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


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _daemon_config(pid: int) -> str:
    """The --config a running turnd serve was started with."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""
    path = args[args.index("--config") + 1] if "--config" in args[:-1] else "/etc/turnd/turnd.toml"
    return os.path.join(cwd, path)


def _signal_daemon(sig, what: str, pid: int | None, config_path: str | None,
                   check: bool = False, refused: str = "not reloaded") -> int:
    """Signal the one running turnd (checking its config first with ``check``); its pid."""
    import signal as _signal
    pids = [pid] if pid else find_daemons(config_path)
    if len(pids) != 1:
        click.echo(f"turnd: {'no' if not pids else len(pids)} running turnd serve found"
                   f"{'' if not pids else ' (' + ', '.join(map(str, pids)) + ')'}; "
                   "name one with --pid or --config", err=True)
        sys.exit(EXIT_STARTUP)
    if check:  # what the daemon will read: refuse to ask it to read a broken file
        path = config_path or _daemon_config(pids[0])
        if path:
            try:
                config = load_config(path)
                if config.tls.cert or config.tls.key:
                    from .tls import load_context
                    load_context(config.tls)
            except ConfigError as exc:
                click.echo(f"config error: {exc}", err=True)
                click.echo(f"turnd: {refused}; pid {pids[0]} keeps its configuration", err=True)
                sys.exit(EXIT_CONFIG)
            if sig == getattr(_signal, "SIGUSR2", None) and config.server.workers != 1:
                click.echo("turnd: not restarted: a hand-over with server.workers other than 1 "
                           "is not supported yet (stop and start it)", err=True)
                sys.exit(EXIT_STARTUP)
    try:
        os.kill(pids[0], sig)
    except OSError as exc:
        click.echo(f"turnd: cannot signal pid {pids[0]}: {exc.strerror}", err=True)
        sys.exit(EXIT_STARTUP)
    click.echo(f"turnd (pid {pids[0]}): {what} (sent {_signal.Signals(sig).name})")
    return pids[0]


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
    _signal_daemon(_signal.SIGHUP, "reloading", pid, config_path, check=True)


@main.command()
@click.option("--config", "config_path", default="/etc/turnd/turnd.toml", show_default=True,
              help="Where the metrics listener is ([metrics] listen) and the admin token.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON as turnd gives it.")
@click.option("--user", default=None, help="Only this user's allocations.")
@click.option("--close", "close_id", default=None, metavar="ID", help="End this allocation now.")
def sessions(config_path: str, as_json: bool, user: str | None, close_id: str | None) -> None:
    """List the live allocations (or end one) of the running turnd."""
    import json as _json
    import urllib.error
    import urllib.parse
    import urllib.request
    try:
        config = load_config(config_path, read_users=False)
    except ConfigError as exc:
        click.echo(f"config error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    if config.metrics.listen is None:
        click.echo(f"turnd: {config_path} has no [metrics] listen: sessions are served there",
                   err=True)
        sys.exit(EXIT_CONFIG)
    ep = config.metrics.listen
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(ep.host, ep.host)
    base = f"http://{'[' + host + ']' if ':' in host else host}:{ep.port}"
    headers = {}
    if config.metrics.admin_token_file and os.path.exists(config.metrics.admin_token_file):
        with open(config.metrics.admin_token_file) as f:
            headers["Authorization"] = "Bearer " + f.read().strip()
    if close_id:
        req = urllib.request.Request(f"{base}/sessions/close?id={urllib.parse.quote(close_id)}",
                                     method="POST", headers=headers, data=b"")
    else:
        query = f"?user={urllib.parse.quote(user)}" if user else ""
        req = urllib.request.Request(f"{base}/sessions{query}", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        if close_id and exc.code == 404:
            click.echo(f"turnd: no allocation {close_id!r}", err=True)
        else:
            click.echo(f"turnd: {base}: {exc.code} {exc.read().decode(errors='replace').strip()}",
                       err=True)
        sys.exit(EXIT_STARTUP)
    except OSError as exc:
        click.echo(f"turnd: cannot reach turnd at {base}: {getattr(exc, 'reason', exc)}", err=True)
        sys.exit(EXIT_STARTUP)
    if close_id:
        click.echo(f"closed {close_id}")
        return
    if as_json:
        click.echo(body.decode())
        return
    rows = _json.loads(body)["sessions"]
    click.echo(f"{'ID':<10} {'USER':<24} {'CLIENT':<28} {'TRANSP':<6} {'RELAYED':<28} "
               f"{'PERM':>4} {'CHAN':>4} {'TO PEERS':>16} {'TO CLIENT':>16} {'AGE':>6} {'LEFT':>5}")
    for r in rows:
        click.echo(f"{r['id']:<10} {r['user'][:24]:<24} {r['client']:<28} {r['transport']:<6} "
                   f"{','.join(r['relayed']):<28} {r['permissions']:>4} {r['channels']:>4} "
                   f"{_volume(r['to_peers_packets'], r['to_peers_bytes']):>16} "
                   f"{_volume(r['to_client_packets'], r['to_client_bytes']):>16} "
                   f"{r['age']:>6} {r['expires_in']:>5}")
    click.echo(f"{len(rows)} allocations")


def _volume(packets: int, size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{packets}p/{size:.0f}{unit}" if unit == "B" else f"{packets}p/{size:.1f}{unit}"
        size /= 1000
    return ""


@main.command()
@click.argument("urls", nargs=-1, required=True)
@click.option("--user", default=None, help="The TURN user name.")
@click.option("--password", default=None, help="Its password.")
@click.option("--secret-file", default=None, type=click.Path(dir_okay=False),
              help="Mint a TURN REST credential with this secret instead.")
@click.option("--insecure", is_flag=True, help="turns: accept a self-signed certificate.")
def selftest(urls: tuple, user: str | None, password: str | None, secret_file: str | None,
             insecure: bool) -> None:
    """Check TURN URLs (turn:H:P?transport=udp, turn:H:P?transport=tcp, turns:H:P?transport=tcp)
    as a browser would use them: allocate, permit, bind a channel, relay both ways.  Exit 0
    only when all pass.  Works against any TURN server."""
    from . import selftest as st
    if secret_file:
        import time
        from .tools import read_secret_file, rest_credential
        try:
            secret = read_secret_file(secret_file)[0]
        except ConfigError as exc:
            click.echo(f"turnd: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
        user, password = rest_credential(secret, user or "selftest", 3600, time.time())
    if not user or password is None:
        click.echo("turnd: give --user and --password, or --secret-file", err=True)
        sys.exit(EXIT_CONFIG)
    ok = trio.run(st.run, list(urls), user, password, insecure, click.echo)
    sys.exit(0 if ok else 1)


@main.command()
@click.option("--pid", type=int, default=None, help="The turnd process (default: find it).")
@click.option("--config", "config_path", default=None, help="Find the turnd serving this file.")
def restart(pid: int | None, config_path: str | None) -> None:
    """Restart without dropping a call (SIGUSR2): the running turnd starts its successor
    (the same command line: a new version on disk and a new config take effect) and hands
    it its sockets and allocations."""
    import signal as _signal
    import time
    old = _signal_daemon(_signal.SIGUSR2, "handing over to a successor", pid, config_path,
                         check=True, refused="not restarted")
    # The old turnd exits once its successor serves; when the hand-over fails, the successor
    # is gone and the old one serves on.  Watch both.
    from .handover import ADOPT_TIMEOUT, READY_TIMEOUT
    start = time.monotonic()
    successor = None
    while time.monotonic() - start < READY_TIMEOUT + ADOPT_TIMEOUT + 10:
        if not _alive(old):
            click.echo(f"turnd: handed over to pid {successor or '?'}; pid {old} has exited")
            return
        children = [p for p in _serve_pids() if _parent(p) == old]
        if children:
            successor = children[0]
        elif successor is not None or time.monotonic() - start > 10:
            break
        time.sleep(0.1)
    click.echo(f"turnd: restart failed; pid {old} still serves (its log says why)", err=True)
    sys.exit(EXIT_STARTUP)
