"""Operator tools: REST credentials, the users file with reload, coturn migration on real
inputs, and the first run of make run's config relaying at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import trio

from turnd.config import load_config
from turnd.stun import constants as c

from .daemon import Turnd
from .helpers import UdpTurn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def turnd(*args, input=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "turnd", *args], capture_output=True, text=True,
                          input=input, timeout=60, cwd=cwd)


def daemon_text(extra_auth: str = "", ports="45600-45699") -> str:
    return (f'[server]\nlisten = ["127.0.0.1:0"]\nrealm = "turnd.test"\n[auth]\n{extra_auth}\n'
            f'[relay]\nports = "{ports}"\n[metrics]\nlisten = ""\n')


async def allocate_result(port: int, user: str, password: str) -> int:
    """0 when the allocation succeeded, else the error code."""
    turn = await UdpTurn.connect(("127.0.0.1", port), user, password)
    with trio.fail_after(5):
        resp = await turn.call(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)])
    turn.sock.close()
    return 0 if resp.cls == c.SUCCESS else resp.get(c.ERROR_CODE).code


def test_credential_is_accepted_by_turnd_and_prints_an_ice_server(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("# a comment\ns3cret-value\n")
    d = Turnd(tmp_path, daemon_text('secrets = ["s3cret-value"]'))
    try:
        out = turnd("credential", "--secret-file", str(secret), "--user", "web-42", "--ttl", "3600")
        assert out.returncode == 0, out.stderr
        fields = dict(line.split(": ", 1) for line in out.stdout.splitlines())
        expiry, _, who = fields["username"].partition(":")
        assert who == "web-42" and int(expiry) > 0
        assert trio.run(allocate_result, d.port, fields["username"], fields["password"]) == 0
        assert trio.run(allocate_result, d.port, fields["username"], "wrong") == 401
        out = turnd("credential", "--secret-file", str(secret), "--json", "--config", str(d.conf))
        server = json.loads(out.stdout)
        assert server["urls"] == ["turn:127.0.0.1:0?transport=udp", "turn:127.0.0.1:0?transport=tcp"]
        assert trio.run(allocate_result, d.port, server["username"], server["credential"]) == 0
        out = turnd("credential", "--secret-file", str(tmp_path / "none"))
        assert out.returncode == 2 and out.stderr.startswith("turnd: secret file: ")
    finally:
        d.stop()


def test_users_file_add_and_delete_apply_on_reload(tmp_path):
    users = tmp_path / "users.toml"
    # users_file must exist to start; make it with the tool, then serve
    conf = tmp_path / "t.toml"
    conf.write_text(daemon_text('users = { alice = "alicepw" }\nusers_file = "users.toml"'))
    out = turnd("user", "add", "carol", "--users-file", str(users), "--config", str(conf),
                "--password", "carolpw")
    assert out.returncode == 0, out.stderr
    assert "added 'carol'" in out.stdout
    text = users.read_text()
    assert "carolpw" not in text and "carol = [" in text  # keys, never the password
    assert oct(users.stat().st_mode & 0o777) == "0o600"
    d = Turnd(tmp_path, conf.read_text(), name="served")
    try:
        assert trio.run(allocate_result, d.port, "carol", "carolpw") == 0
        # add dave (the password from stdin, as a script would), reload: dave logs in
        out = turnd("user", "add", "dave", "--config", str(d.conf), input="davepw\ndavepw\n")
        assert out.returncode == 0, out.stderr
        assert trio.run(allocate_result, d.port, "dave", "davepw") == 401  # not yet
        out = turnd("reload", "--pid", str(d.proc.pid))
        assert out.returncode == 0, out.stderr
        d.wait_for("configuration reloaded")
        assert trio.run(allocate_result, d.port, "dave", "davepw") == 0
        # delete carol, reload: carol can no longer log in
        out = turnd("user", "delete", "carol", "--config", str(d.conf))
        assert out.returncode == 0, out.stderr
        d.signal(signal.SIGHUP)
        d.wait_for("configuration reloaded", after=d.text().index("configuration reloaded") + 1)
        assert trio.run(allocate_result, d.port, "carol", "carolpw") == 401
        assert trio.run(allocate_result, d.port, "alice", "alicepw") == 0
        out = turnd("user", "delete", "nobody", "--config", str(d.conf))
        assert out.returncode == 2 and "no user 'nobody'" in out.stderr
    finally:
        d.stop()


def test_a_users_file_with_a_password_is_refused(tmp_path):
    (tmp_path / "users.toml").write_text('mallory = "plain-password"\n')
    conf = tmp_path / "t.toml"
    conf.write_text(daemon_text('users_file = "users.toml"'))
    out = turnd("check-config", str(conf))
    assert out.returncode == 2
    assert "holds keys only" in out.stderr and len(out.stderr.strip().splitlines()) == 1


# --- migrate-coturn -------------------------------------------------------------------------

FULL_COTURN = """\
# a coturn config with every option turnd maps
listening-port=3479
tls-listening-port=5350
listening-ip=192.0.2.10
listening-ip=2001:db8::10
relay-ip=192.0.2.10
external-ip=203.0.113.7/192.0.2.10
min-port=50000
max-port=50999
realm=calls.example.com
lt-cred-mech
user=alice:secretpw
user=bob:0x0123456789abcdef0123456789abcdef
use-auth-secret
static-auth-secret=rest-secret-1
cert=/etc/ssl/turn.pem
pkey=/etc/ssl/turn.key
denied-peer-ip=10.0.0.0-10.255.255.255
allowed-peer-ip=10.1.2.3
allow-loopback-peers
user-quota=12
total-quota=1200
stale-nonce=900
max-allocate-lifetime=1800
channel-lifetime=600
permission-lifetime=120
no-tcp-relay
log-file=/var/log/turn.log
prometheus
alternate-server=198.51.100.1:3478
proc-user=turnserver
cli-password=x
"""


def test_migrate_a_coturn_config_with_every_mapped_option(tmp_path):
    src = tmp_path / "turnserver.conf"
    src.write_text(FULL_COTURN)
    out_path = tmp_path / "turnd.toml"
    out = turnd("migrate-coturn", str(src), "-o", str(out_path))
    assert out.returncode == 0, out.stderr
    config = load_config(str(out_path))
    s = config.server
    assert [str(ep) for ep in s.listen] == ["192.0.2.10:3479", "[2001:db8::10]:3479"]
    assert [str(ep) for ep in s.tls_listen] == ["192.0.2.10:5350", "[2001:db8::10]:5350"]
    assert s.realm == "calls.example.com" and str(s.alternate) == "198.51.100.1:3478"
    assert config.tls.cert == "/etc/ssl/turn.pem" and config.tls.key == "/etc/ssl/turn.key"
    assert dict(config.auth.users) == {"alice": "secretpw", "bob": "0x0123456789abcdef0123456789abcdef"}
    assert config.auth.secrets == ("rest-secret-1",) and config.auth.nonce_lifetime == 900
    assert config.relay.ports == (50000, 50999) and config.relay.addresses == ("192.0.2.10",)
    assert dict(config.relay.external) == {"192.0.2.10": "203.0.113.7"}
    assert config.peers.deny == ("10.0.0.0/8",)
    assert set(config.peers.allow) == {"10.1.2.3/32", "127.0.0.0/8", "::1/128"}
    assert (config.limits.user_quota, config.limits.total_quota, config.limits.max_lifetime) == (12, 1200, 1800)
    assert str(config.metrics.listen) == "127.0.0.1:9641"
    notes = out.stderr
    assert "line 26: permission-lifetime: turnd uses RFC 8656's 300 s" in notes
    assert "line 27: no-tcp-relay: not known to turnd" in notes
    assert "line 28: log-file: turnd logs to stderr" in notes
    assert "line 31: proc-user: systemd/turnd.service runs turnd" in notes
    assert "line 32: cli-password: not needed" in notes
    assert "channel-lifetime" not in notes  # 600 is turnd's too
    # and turnd check-config agrees (the certificate files don't exist here: only that line)
    check = turnd("check-config", str(out_path))
    assert check.stderr.strip() == "config error: tls.cert: /etc/ssl/turn.pem: No such file or directory"


def test_migrate_debians_own_turnserver_conf(tmp_path):
    conf = "/etc/turnserver.conf"
    if not os.path.exists(conf):
        if os.environ.get("CI"):
            pytest.fail("/etc/turnserver.conf is missing in CI: .ci/run installs coturn")
        pytest.skip("coturn's /etc/turnserver.conf not installed")
    out_path = tmp_path / "turnd.toml"
    out = turnd("migrate-coturn", conf, "-o", str(out_path))
    assert out.returncode == 0, out.stderr
    text = out_path.read_text()
    assert 'listen = ["0.0.0.0:3478", "[::]:3478"]' in text
    # each option Debian's file sets is accounted for, line by line
    active = [(n, line.split("=")[0].strip()) for n, line in enumerate(open(conf), 1)
              if line.strip() and not line.lstrip().startswith("#")]
    for n, name in active:
        assert f"line {n}: {name}:" in out.stderr, (n, name, out.stderr)
    # with the relay address the note asks for, it is a valid turnd config
    if "relay.addresses" in out.stderr and "addresses =" not in text:
        text = text.replace('[relay]\n', '[relay]\naddresses = ["192.0.2.10"]\n')
        out_path.write_text(text)
    assert turnd("check-config", str(out_path)).returncode == 0


# --- the first run ---------------------------------------------------------------------------

def test_the_default_config_relays_at_the_first_run_and_a_production_one_does_not(tmp_path):
    """make run: conf/turnd.toml has no credentials; turnd makes a REST secret of its own and
    prints an RTCIceServer that relays at once.  Without --first-run-secret (systemd, any
    other config) TURN stays refused with 401."""
    secret = tmp_path / "state" / "rest-secret"
    text = open(os.path.join(ROOT, "conf", "turnd.toml")).read()
    # the same config on free ports (the real one uses 3478 and 9641, maybe taken here)
    text = text.replace('listen = ["127.0.0.1:3478", "[::1]:3478"]', 'listen = ["127.0.0.1:0"]')
    text = text.replace('listen = "127.0.0.1:9641"', 'listen = ""')
    conf = tmp_path / "turnd.toml"
    conf.write_text(text)
    proc = subprocess.Popen([sys.executable, "-m", "turnd", "serve", "--config", str(conf),
                             "--first-run-secret", str(secret)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        server = json.loads(proc.stdout.readline())
        port = None
        for line in proc.stderr:
            if "listening on udp 127.0.0.1:" in line:
                port = int(line.rsplit(":", 1)[1])
                break
        assert oct(secret.stat().st_mode & 0o777) == "0o600"
        assert server["urls"][0].startswith("turn:127.0.0.1:")
        assert trio.run(allocate_result, port, server["username"], server["credential"]) == 0
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    # a second start finds the secret and prints nothing again
    proc = subprocess.Popen([sys.executable, "-m", "turnd", "serve", "--config", str(conf),
                             "--first-run-secret", str(secret)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "listening on udp" in line:
                break
    finally:
        proc.terminate()
        stdout, _ = proc.communicate(timeout=15)
    assert stdout == ""
    # production: no credentials, no --first-run-secret: 401
    d = Turnd(tmp_path, text.replace("[auth]", "[auth]"), name="prod")
    try:
        d.wait_for("serving STUN only, TURN requests get 401")
        assert trio.run(allocate_result, d.port, server["username"], server["credential"]) == 401
    finally:
        d.stop()


def test_make_run_passes_the_first_run_secret_only_on_the_default_config():
    out = subprocess.run(["make", "-n", "run"], capture_output=True, text=True, cwd=ROOT)
    assert "--first-run-secret .turnd/rest-secret" in out.stdout
    out = subprocess.run(["make", "-n", "run", "CONFIG=/etc/turnd/turnd.toml"], capture_output=True,
                         text=True, cwd=ROOT)
    assert "--first-run-secret" not in out.stdout
    assert ".turnd/" in open(os.path.join(ROOT, ".gitignore")).read()


def test_user_names_of_any_unicode_round_trip_and_the_file_keeps_its_mode(tmp_path):
    users = tmp_path / "users.toml"
    for name in ("José", "名前", "a b", 'quo"te', "emoji😀", "back\\slash"):
        out = turnd("user", "add", name, "--users-file", str(users), "--config", "/nonexistent",
                    "--password", "pw")
        assert out.returncode == 0, out.stderr
    from turnd.config import read_users_file
    assert [u for u, _ in read_users_file(str(users))] == ["José", "名前", "a b", 'quo"te',
                                                          "emoji😀", "back\\slash"]
    os.chmod(users, 0o640)
    assert turnd("user", "delete", "a b", "--users-file", str(users), "--config",
                 "/nonexistent").returncode == 0
    assert oct(users.stat().st_mode & 0o777) == "0o640"  # kept: the service's group may read it
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".users-")]  # no leftovers


def test_migrate_survives_hostile_input_and_writes_valid_toml(tmp_path):
    src = tmp_path / "turnserver.conf"
    src.write_bytes("realm=caf😀\"x\nuser=Jo\\sé:p\"w\ndenied-peer-ip=10.0.0.1-::1\n"
                    "alternate-server=::1\nrelay-ip=192.0.2.1\nmin-port=abc\n".encode()
                    + b"\xff\x00\n")
    out_path = tmp_path / "out.toml"
    out = turnd("migrate-coturn", str(src), "-o", str(out_path))
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "line 3: denied-peer-ip: not understood (a range of two address families)" in out.stderr
    assert "line 6: min-port: not understood" in out.stderr
    config = load_config(str(out_path))
    assert config.server.realm == 'caf😀"x' and dict(config.auth.users) == {"Jo\\sé": 'p"w'}
    assert str(config.server.alternate) == "[::1]:3478"
    assert oct(out_path.stat().st_mode & 0o777) == "0o640"
