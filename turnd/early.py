"""The first thing a turnd that systemd restarted does: read its UDP listen sockets.

After ``systemctl restart``, a crash or a watchdog kill, systemd hands the next turnd its
sockets from the file descriptor store (turnd/fdstore.py).  Until that turnd serves (Python's
imports and start-up: a few tenths of a second) nobody reads them, and a listen socket that
all clients share fills in well under a second at tens of thousands of datagrams a second
(its buffer is capped by net.core.rmem_max): the kernel drops the rest.  So, before anything
else is imported, a thread reads the UDP listen sockets named in ``LISTEN_FDNAMES`` into
memory (bounded: ``LIMIT_BYTES`` counting each datagram's Python objects too; there it
stops reading), and the relay engine takes those datagrams first, through its usual path
(``RelayEngine.replay``, for at most server.REPLAY_SECONDS: a flood is not caught up with,
it is dropped), then reads the sockets itself.  Relay sockets are not read early: each
holds one allocation's traffic.

This module imports only the standard library's light modules: it runs before the rest.
"""

from __future__ import annotations

import os
import select
import socket
import threading

from . import mmsg  # (ctypes and the standard library only)

LIMIT_BYTES = 64 << 20   # memory held, at most: each datagram's bytes and OVERHEAD
OVERHEAD = 200           # bytes of Python objects per datagram held (its tuple, bytes, name)
DATAGRAM_MAX = 65536     # as the relay engine's slots (relay.BUFFER_SIZE)
BATCH = 64               # datagrams per recvmmsg (a 4 MiB arena per listen socket)

_reader: "EarlyReader | None" = None


class EarlyReader:
    def __init__(self, socks: dict[int, socket.socket]):
        self.socks = socks  # systemd's fd number -> a socket on a dup of it
        self.got: dict[int, list] = {fd: [] for fd in socks}  # fd -> [(bytes, raw sockaddr)]
        self.bytes = 0
        self.full = False  # LIMIT_BYTES reached: reading stopped
        self.lock = threading.Lock()  # ``got`` is swapped while the engine replays
        self.wake_r, self.wake_w = os.pipe()
        self.thread = threading.Thread(target=self._run, name="turnd-early-reader", daemon=True)

    def _run(self) -> None:
        poller = select.poll()
        batches = {}
        for fd, s in self.socks.items():
            poller.register(s.fileno(), select.POLLIN)
            # recvmmsg keeping the GIL: a reader that let go of it after every call would
            # wait up to a switch interval for it again while the main thread imports
            batch = mmsg.RecvBatch(s, bytearray(BATCH * DATAGRAM_MAX), BATCH, DATAGRAM_MAX, 0,
                                   DATAGRAM_MAX)
            batch.call = mmsg.recvmmsg_holding_gil
            batches[s.fileno()] = (fd, batch)
        poller.register(self.wake_r, select.POLLIN)
        unpack_len, mmsg_size, len_offset = mmsg.LEN.unpack_from, mmsg.MMSG_SIZE, mmsg.LEN_OFFSET
        while True:
            for ready, _ in poller.poll():
                if ready == self.wake_r:
                    return
                fd, batch = batches[ready]
                views, names, lens, namelen = batch.views, batch.names, batch.lens, batch.namelen
                with self.lock:
                    held = self.got[fd]
                    for _ in range(16):  # up to 16 x BATCH, then the other sockets
                        n = batch.receive(BATCH)
                        if n < 0:  # an ICMP error reported on the socket: read on
                            continue
                        for k in range(n):
                            size = unpack_len(lens, k * mmsg_size + len_offset)[0]
                            if not size:  # (no STUN message, no ChannelData is empty)
                                continue
                            if self.bytes + size + OVERHEAD > LIMIT_BYTES:
                                # a flood: stop here (the kernel drops the rest), leaving
                                # the CPU to the start-up
                                self.full = True
                                return
                            self.bytes += size + OVERHEAD
                            held.append((bytes(views[k][:size]),
                                         bytes(names[k * namelen:(k + 1) * namelen])))
                        if n < BATCH:
                            break

    def take_some(self) -> dict[int, list]:
        """What was read so far (the reader goes on)."""
        with self.lock:
            got, self.got = self.got, {fd: [] for fd in self.socks}
            self.bytes = 0
        return got

    def stop(self) -> dict[int, list]:
        """Stop reading (once; again: nothing): what was read since ``take_some``."""
        if not self.thread.is_alive() and self.wake_r < 0:
            return {}
        os.write(self.wake_w, b"x")
        self.thread.join()
        for s in self.socks.values():
            s.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        self.wake_r = self.wake_w = -1
        return self.got


def start(environ=os.environ) -> None:
    """Start reading when systemd passed this process UDP listen sockets (``udp-...``)."""
    global _reader
    if environ.get("LISTEN_PID") != str(os.getpid()) or not environ.get("LISTEN_FDS", "").isdigit():
        return
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    socks = {}
    for i, name in enumerate(names[:int(environ["LISTEN_FDS"])]):
        if not name.startswith("udp-"):
            continue
        fd = 3 + i  # SD_LISTEN_FDS_START
        try:
            s = socket.socket(fileno=os.dup(fd))  # (the kernel says its family)
            s.setblocking(False)
        except OSError:
            continue
        socks[fd] = s
    if socks:
        _reader = EarlyReader(socks)
        _reader.thread.start()


def reader() -> EarlyReader | None:
    """The reader, if one runs (once: whoever takes it stops it)."""
    global _reader
    taken, _reader = _reader, None
    return taken


def main() -> None:
    """The ``turnd`` command (and ``python -m turnd``): start reading, then everything else."""
    start()
    from .cli import main as cli_main
    cli_main()
