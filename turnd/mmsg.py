"""Many datagrams per system call: Linux's recvmmsg and sendmmsg through ctypes.

No compiled code of our own: the C structures are declared with ctypes, filled once where
they don't change, and the per-datagram fields are written with ``struct.pack_into`` on a
memoryview of them (the engine in turnd/relay.py does that inline, per datagram).  Where
the C library lacks these calls (not Linux), ``AVAILABLE`` is False and callers use one
``recvfrom_into`` / ``sendto`` per datagram instead.

Addresses come and go as raw ``sockaddr`` bytes; ``key_of`` cuts the part that names a
client (port and address, not IPv6's flow label) for dictionary lookups, and ``address``
turns raw bytes back into the ``(ip, port)`` text recvfrom gives.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct


class Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.c_void_p), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", Msghdr), ("msg_len", ctypes.c_uint)]


MMSG_SIZE = ctypes.sizeof(Mmsghdr)
IOV_SIZE = ctypes.sizeof(Iovec)
LEN_OFFSET = Mmsghdr.msg_len.offset
# msg_name and msg_namelen, at the start of each mmsghdr
NAME = struct.Struct("P" + "x" * (Msghdr.msg_namelen.offset - ctypes.sizeof(ctypes.c_void_p)) + "I")
IOV = struct.Struct("PN")  # iov_base, iov_len
LEN = struct.Struct("I")
SOCKADDR_SIZE = {socket.AF_INET: 16, socket.AF_INET6: 28}

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _sendmmsg = _libc.sendmmsg
    _sendmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
    _sendmmsg.restype = ctypes.c_int
    _recvmmsg = _libc.recvmmsg
    _recvmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p)
    _recvmmsg.restype = ctypes.c_int
    # The same, keeping Python's GIL through the call (on a non-blocking socket it returns at
    # once): for a reader thread beside a busy one (turnd/early.py), which would otherwise
    # wait for the GIL again after every call.
    recvmmsg_holding_gil = ctypes.PyDLL(None, use_errno=True).recvmmsg
    recvmmsg_holding_gil.argtypes = _recvmmsg.argtypes
    recvmmsg_holding_gil.restype = ctypes.c_int
    AVAILABLE = True
except (OSError, AttributeError):
    AVAILABLE = False


def address_of(buffer) -> int:
    """The address of a bytearray's storage (it may not be resized afterwards)."""
    return ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))


def sockaddr(addr: tuple) -> bytes:
    """struct sockaddr_in / sockaddr_in6 for (ip, port)."""
    if ":" in addr[0]:
        return (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", addr[1], 0)
                + socket.inet_pton(socket.AF_INET6, addr[0]) + struct.pack("=I", 0))
    return (struct.pack("=H", socket.AF_INET) + struct.pack("!H", addr[1])
            + socket.inet_pton(socket.AF_INET, addr[0]) + bytes(8))


def key_of(raw) -> bytes:
    """What names a client in a raw sockaddr: port and address (IPv6's flow label and
    scope left out).  ``key_of(sockaddr(addr))`` equals the key the engine computes."""
    if len(raw) >= 24:  # IPv6
        return bytes(raw[2:4]) + bytes(raw[8:24])
    return bytes(raw[2:8])


def address(key: bytes) -> tuple[str, int]:
    """(ip, port) from a key, as recvfrom writes it (inet_ntop)."""
    port = (key[0] << 8) | key[1]
    if len(key) == 18:
        return socket.inet_ntop(socket.AF_INET6, key[2:]), port
    return socket.inet_ntop(socket.AF_INET, key[2:]), port


class SendBatch:
    """Datagrams for one socket, gathered and sent with one sendmmsg.  The caller writes
    entry ``count`` with ``NAME.pack_into(names, ...)``, ``IOV.pack_into(iovs, ...)``."""

    __slots__ = ("fd", "msgs", "iovs", "names", "iovs_mv", "count", "size")

    def __init__(self, sock: socket.socket | None, size: int):
        self.fd = sock.fileno() if sock is not None else -1  # or set before each flush
        self.size = size
        self.msgs = (Mmsghdr * size)()
        self.iovs = (Iovec * size)()
        for k in range(size):
            self.msgs[k].msg_hdr.msg_iov = ctypes.addressof(self.iovs[k])
            self.msgs[k].msg_hdr.msg_iovlen = 1
        self.names = memoryview(self.msgs).cast("B")  # NAME at k * MMSG_SIZE
        self.iovs_mv = memoryview(self.iovs).cast("B")  # IOV at k * IOV_SIZE
        self.count = 0

    def flush(self) -> tuple[int, int]:
        """sendmmsg everything gathered: (sent, dropped)."""
        count, done, dropped = self.count, 0, 0
        self.count = 0
        while done < count:
            n = _sendmmsg(self.fd, ctypes.byref(self.msgs, done * MMSG_SIZE), count - done, 0)
            if n > 0:
                done += n
                continue
            if ctypes.get_errno() in (errno.EAGAIN, errno.ENOBUFS):  # full: drop the rest
                dropped += count - done
                break
            done += 1  # that one datagram could not go (EMSGSIZE...): drop it, go on
            dropped += 1
        return count - dropped, dropped


class RecvBatch:
    """Up to ``size`` datagrams from one socket with one recvmmsg, each into its own slot
    of ``stride`` bytes (at ``offset`` into the slot, leaving headroom in front)."""

    __slots__ = ("fd", "msgs", "iovs", "lens", "names", "size", "namelen", "views", "starts",
                 "buffer", "base", "call")

    def __init__(self, sock: socket.socket, buffer: bytearray, size: int, stride: int, offset: int,
                 length: int):
        self.fd = sock.fileno()
        self.size = size
        self.buffer = buffer
        self.call = _recvmmsg  # (or recvmmsg_holding_gil)
        self.base = base = address_of(buffer)
        self.namelen = SOCKADDR_SIZE[sock.family]
        self.names = bytearray(size * self.namelen)
        names_base = address_of(self.names)
        self.msgs = (Mmsghdr * size)()
        self.iovs = (Iovec * size)()
        view = memoryview(buffer)
        self.starts = [k * stride + offset for k in range(size)]
        self.views = [view[s:s + length] for s in self.starts]
        for k in range(size):
            self.iovs[k].iov_base = base + self.starts[k]
            self.iovs[k].iov_len = length
            hdr = self.msgs[k].msg_hdr
            hdr.msg_iov = ctypes.addressof(self.iovs[k])
            hdr.msg_iovlen = 1
            hdr.msg_name = names_base + k * self.namelen
            hdr.msg_namelen = self.namelen
        self.lens = memoryview(self.msgs).cast("B")  # LEN at k * MMSG_SIZE + LEN_OFFSET

    def receive(self, limit: int) -> int:
        """Datagrams now in slots 0..n-1 (0: none waiting; -1: an error, e.g. ICMP)."""
        n = self.call(self.fd, self.msgs, min(limit, self.size), 0, None)
        if n < 0 and ctypes.get_errno() in (errno.EAGAIN, errno.EWOULDBLOCK):
            return 0
        return n

    def load(self, datagrams: list) -> int:
        """Datagrams read earlier (``(bytes, raw sockaddr)``, at most ``size``, from a socket
        of this one's family) into slots 0..n-1, as ``receive`` would have left them
        (turnd/early.py)."""
        namelen, lens, views = self.namelen, self.lens, self.views
        names = memoryview(self.names)  # (a slice of it never resizes: the C side points in)
        for k, (data, name) in enumerate(datagrams):
            view = views[k]
            n = min(len(data), len(view))
            view[:n] = data[:n]
            names[k * namelen:(k + 1) * namelen] = name
            LEN.pack_into(lens, k * MMSG_SIZE + LEN_OFFSET, n)
        return len(datagrams)

    def receive_at(self, fd: int, first: int, limit: int) -> int:
        """From socket ``fd``, datagrams into slots first..first+n-1 (as ``receive``)."""
        n = _recvmmsg(fd, ctypes.byref(self.msgs, first * MMSG_SIZE),
                      min(limit, self.size - first), 0, None)
        if n < 0 and ctypes.get_errno() in (errno.EAGAIN, errno.EWOULDBLOCK):
            return 0
        return n
