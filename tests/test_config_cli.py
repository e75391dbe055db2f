"""Config parsing and the turnd command line (click's CliRunner and a real process)."""

import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from turnd import __version__
from turnd.cli import main
from turnd.config import ConfigError, Endpoint, load_config, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_check(tmp_path, text: str):
    path = tmp_path / "turnd.toml"
    path.write_text(text)
    return CliRunner().invoke(main, ["check-config", str(path)])


def test_default_config_file_is_valid():
    config = load_config(os.path.join(ROOT, "conf", "turnd.toml"))
    assert config.server.listen == (Endpoint("127.0.0.1", 3478), Endpoint("::1", 3478))
    assert config.server.software == ""


def test_empty_config_gives_defaults():
    config = parse_config({})
    assert config.server.listen == (Endpoint("127.0.0.1", 3478), Endpoint("::1", 3478))


@pytest.mark.parametrize("text, message", [
    ('[server]\nlisten = ["127.0.0.1:3478", "[::1]:99999"]\n',
     'config error: server.listen[1]: "[::1]:99999": port must be 1-65535'),
    ('[server]\nlisten = ["::1:3478"]\n',
     'config error: server.listen[0]: "::1:3478": IPv6 addresses go in brackets: "[::1]:3478"'),
    ('[server]\nlisten = ["example.com:3478"]\n',
     "config error: server.listen[0]: \"example.com:3478\": 'example.com' is not an IP address"),
    ('[server]\nlisten = "127.0.0.1:3478"\n',
     "config error: server.listen: must be a list, not a string"),
    ('[server]\nlisten = []\n',
     'config error: server.listen: must list at least one "host:port"'),
    ('[server]\nrealm = 5\n', "config error: server.realm: must be a string, not an integer"),
    ('[server]\nsoftware = "x"\nport = 3478\n', "config error: server.port: unknown key"),
    ('[servers]\n', "config error: servers: unknown section"),
    ('[server]\nsoftware = "' + "x" * 200 + '"\n',
     "config error: server.software: must be at most 127 characters"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, message):
    result = run_check(tmp_path, text)
    assert result.exit_code == 2
    assert result.stderr.strip() == message
    assert "Traceback" not in result.output


def test_invalid_toml_and_missing_file(tmp_path):
    result = run_check(tmp_path, "[server\n")
    assert result.exit_code == 2 and result.stderr.startswith("config error: ")
    assert len(result.stderr.strip().splitlines()) == 1
    result = CliRunner().invoke(main, ["check-config", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"config error: {tmp_path / 'nope.toml'}: No such file or directory"


def test_check_config_ok(tmp_path):
    result = run_check(tmp_path, '[server]\nlisten = ["0.0.0.0:3478", "[::]:3478"]\n'
                       '[relay]\naddresses = ["192.0.2.10", "2001:db8::10"]\n')
    assert result.exit_code == 0, result.output


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"turnd, version {__version__}"


def test_config_error_type_names_key():
    with pytest.raises(ConfigError) as info:
        parse_config({"server": {"listen": [1]}})
    assert str(info.value).startswith("server.listen[0]: ")


def _turnd(*args):
    return [sys.executable, "-m", "turnd", *args]


def test_serve_stops_cleanly_on_sigterm_and_sigint(tmp_path):
    import socket
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    path = tmp_path / "t.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\n[metrics]\nlisten = ""\n')
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen(_turnd("serve", "--config", str(path)), stderr=subprocess.PIPE,
                                text=True)
        try:
            deadline = time.monotonic() + 20
            lines = []
            while time.monotonic() < deadline:
                line = proc.stderr.readline()
                lines.append(line)
                if "listening on tcp" in line or not line:
                    break
            assert any("listening on udp 127.0.0.1:" in ln for ln in lines), lines
            proc.send_signal(sig)
            rest = proc.communicate(timeout=20)[1]
        finally:
            proc.kill()
        assert proc.returncode == 0
        assert "stopping" in rest and "stopped" in rest and "Traceback" not in rest


def test_serve_port_in_use_is_one_line(tmp_path):
    import socket
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    path = tmp_path / "t.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\n[metrics]\nlisten = ""\n')
    try:
        proc = subprocess.run(_turnd("serve", "--config", str(path)), capture_output=True,
                              text=True, timeout=30)
    finally:
        taken.close()
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"turnd: cannot listen on udp 127.0.0.1:{port}: address already in use"


FULL = '''
[server]
listen = ["127.0.0.1:3478"]
realm = "example.org"
[auth]
users = { alice = "secret", bob = "0x0123456789abcdef0123456789abcdef" }
secrets = ["s1", "s2"]
nonce_lifetime = 300
[relay]
ports = "50000-50100"
addresses = ["127.0.0.1"]
external = { "127.0.0.1" = "203.0.113.7" }
default_family = "keep"
[peers]
allow = ["10.0.0.0/8"]
deny = ["10.1.0.0/16"]
[limits]
user_quota = 5
total_quota = 100
max_lifetime = 1800
'''


def test_full_config_parses(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(FULL)
    cfg = load_config(str(path))
    assert cfg.auth.users == (("alice", "secret"), ("bob", "0x0123456789abcdef0123456789abcdef"))
    assert cfg.auth.secrets == ("s1", "s2") and cfg.auth.nonce_lifetime == 300
    assert cfg.relay.ports == (50000, 50100) and cfg.relay.external == (("127.0.0.1", "203.0.113.7"),)
    assert cfg.relay.default_family == "keep"
    assert cfg.peers.allow == ("10.0.0.0/8",) and cfg.peers.deny == ("10.1.0.0/16",)
    assert (cfg.limits.user_quota, cfg.limits.total_quota, cfg.limits.max_lifetime) == (5, 100, 1800)


@pytest.mark.parametrize("section, message", [
    ('[relay]\nports = "60000-50000"\n', 'config error: relay.ports: "60000-50000": need 1024 <= min <= max <= 65535'),
    ('[relay]\nports = "1-2-3"\n', 'config error: relay.ports: "1-2-3": expected "min-max", e.g. "49152-65535"'),
    ('[relay]\ndefault_family = "both"\n', 'config error: relay.default_family: "both": must be "ipv4", "ipv6" or "keep"'),
    ('[relay]\naddresses = ["1.2.3.4", "5.6.7.8"]\n', "config error: relay.addresses: at most one IPv4 and one IPv6 address"),
    ('[relay]\nexternal = { "127.0.0.1" = "::1" }\n', 'config error: relay.external."127.0.0.1": internal and public address must be of one family'),
    ('[relay]\nexternal = { "10.9.9.9" = "1.2.3.4" }\n', 'config error: relay.external."10.9.9.9": is neither a listen nor a relay address'),
    ('[auth]\nusers = { alice = 5 }\n', "config error: auth.users.alice: must be a password string, not an integer"),
    ('[auth]\nusers = { alice = "0xabc" }\n', 'config error: auth.users.alice: a key must be "0x" + 32 hex digits (MD5 of user:realm:password) or 64 (SHA-256)'),
    ('[auth]\nsecrets = "s"\n', "config error: auth.secrets: must be a list, not a string"),
    ('[auth]\nnonce_lifetime = 5\n', "config error: auth.nonce_lifetime: 5: must be 30-86400"),
    ('[peers]\nallow = ["10.0.0.0/33"]\n', 'config error: peers.allow[0]: "10.0.0.0/33": not a CIDR like "10.0.0.0/8"'),
    ('[limits]\nmax_lifetime = 7200\n', "config error: limits.max_lifetime: 7200: must be 60-3600"),
    ('[limits]\nuser_quota = -1\n', "config error: limits.user_quota: -1: must be 0-1000000"),
    ('[limits]\nquota = 1\n', "config error: limits.quota: unknown key"),
])
def test_bad_turn_keys(tmp_path, section, message):
    result = run_check(tmp_path, '[server]\nlisten = ["127.0.0.1:3478"]\n' + section)
    assert result.exit_code == 2
    assert result.stderr.strip() == message
