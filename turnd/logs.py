"""Logging to stderr: ``[log] format = "text"`` (one line per event) or ``"json"`` (one JSON
object per line, with the event's fields).  Under systemd, when stderr is the journal
(``JOURNAL_STREAM`` names it), each line starts with its syslog priority (``<3>``, as
sd-daemon(3) describes) so journald records the level, and the timestamp is left to it.

Events with fields (allocation events) pass them as ``extra={"fields": {...}}``: the text
format appends them as ``key=value``, the JSON format as keys.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import sys
import time

# The key of "hashed" client addresses: random per process, so the hashes can't be
# reversed by trying every address without it; a day's key comes from it and the date.
_HASH_SECRET = secrets.token_bytes(32)

PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
            logging.CRITICAL: 2}


def stderr_is_journal(environ=None) -> bool:
    env = os.environ if environ is None else environ
    dev, _, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class TextFormatter(logging.Formatter):
    converter = time.gmtime  # UTC, as the JSON lines

    def __init__(self, who: str, journal: bool):
        fmt = f"{who} %(levelname)s %(message)s" if journal else \
            f"%(asctime)sZ {who} %(levelname)s %(message)s"
        super().__init__(fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            text += " " + " ".join(f"{k}={_value(v)}" for k, v in fields.items())
        if self.journal:
            text = f"<{PRIORITY.get(record.levelno, 6)}>" + text.replace("\n", " | ")
        return text


def _value(v) -> str:
    if isinstance(v, str) and (not v or not v.isprintable()
                               or any(ch.isspace() or ch in "='\"\\" for ch in v)):
        return ascii(v)  # control, bidi and other invisible characters escaped
    return str(v)


class JsonFormatter(logging.Formatter):
    def __init__(self, who: str, journal: bool):
        super().__init__()
        self.who, self.journal = who, journal

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out = {"time": f"{stamp}.{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "process": self.who,
               "message": record.getMessage()}
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        text = json.dumps(out, default=str)
        return f"<{PRIORITY.get(record.levelno, 6)}>" + text if self.journal else text


_handler: logging.Handler | None = None
_who = "turnd"


def set_format(fmt: str) -> None:
    """A reload: lines from now on in ``fmt`` ("text" or "json")."""
    if _handler is not None:
        _handler.setFormatter((JsonFormatter if fmt == "json" else TextFormatter)(
            _who, stderr_is_journal()))


def setup_logging(level: str, fmt: str, who: str = "turnd") -> None:
    global _handler, _who
    journal = stderr_is_journal()
    handler = _handler = logging.StreamHandler(sys.stderr)
    _who = who
    handler.setFormatter((JsonFormatter if fmt == "json" else TextFormatter)(who, journal))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("turnd").setLevel(level.upper())


def client_text(addr: tuple, mode: str, now: float | None = None) -> str:
    """A client's address as ``[log] client_addresses`` allows: "full"; "truncated" (the
    default: IPv4 /24, IPv6 /48, no port: a network, not a person); "hashed" (a keyed hash of
    the IP, stable for a day, so one caller's lines can be followed but not named); "none"."""
    if mode == "full":
        return address_text(addr)
    if mode == "none":
        return "-"
    if mode == "hashed":
        return "h:" + _daily_hash(addr[0], time.time() if now is None else now)
    ip = addr[0]
    if ":" in ip:
        import ipaddress
        return str(ipaddress.ip_network(f"{ip}/48", strict=False))
    return ".".join(ip.split(".")[:3]) + ".0/24"


def address_text(addr: tuple) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def _daily_hash(ip: str, now: float) -> str:
    day = int(now // 86400).to_bytes(4, "big")
    key = hmac.new(_HASH_SECRET, day, hashlib.sha256).digest()
    return hmac.new(key, ip.encode(), hashlib.sha256).hexdigest()[:12]
