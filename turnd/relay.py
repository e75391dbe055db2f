"""The hot path: every per-packet loop of turnd lives here.

Sockets are non-blocking; each loop waits for readability with trio, then
drains the socket in bounded batches.  No message objects, logging or
awaits per packet.  Counters are plain integers on a ``RelayStats`` object.
"""

from __future__ import annotations

import socket

import trio

BATCH = 64  # datagrams drained per wakeup before yielding to other tasks
BUFFER_SIZE = 65536


class RelayStats:
    __slots__ = ("packets_in", "packets_slow_path", "send_dropped", "recv_errors")

    def __init__(self) -> None:
        self.packets_in = 0
        self.packets_slow_path = 0
        self.send_dropped = 0
        self.recv_errors = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


def send_or_drop(sock: socket.socket, data, addr, stats: RelayStats) -> None:
    """sendto without blocking: a full buffer (or an ICMP error) drops and counts."""
    try:
        sock.sendto(data, addr)
    except OSError:
        stats.send_dropped += 1


async def listener_loop(sock: socket.socket, slow_path, stats: RelayStats) -> None:
    """Read client datagrams from a UDP listen socket.

    ``slow_path(data: bytes, addr, sock)`` handles everything that is not
    on the fast path (STUN requests and indications); it must not block.
    """
    buf = bytearray(BUFFER_SIZE)
    view = memoryview(buf)
    recvfrom_into = sock.recvfrom_into
    wait_readable = trio.lowlevel.wait_readable
    checkpoint = trio.lowlevel.checkpoint
    while True:
        await wait_readable(sock)
        for _ in range(BATCH):
            try:
                n, addr = recvfrom_into(buf)
            except BlockingIOError:
                break
            except OSError:  # e.g. ECONNREFUSED from an earlier ICMP error
                stats.recv_errors += 1
                continue
            stats.packets_in += 1
            stats.packets_slow_path += 1
            slow_path(bytes(view[:n]), addr, sock)
        await checkpoint()
