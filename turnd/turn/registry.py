"""Which relay ports are live, for every worker of one turnd (sans-I/O).

One bit per (relay address, port) in a buffer the shell provides: a ``bytearray`` for one
process, or shared memory that every worker maps, so that a worker knows a port on
turnd's own address is another worker's live relay (reachable, a permitted peer) and not
some other program (never reachable).  Each worker sets and clears the bits of its own
ports only; a reader sees a port as live from the moment its socket is bound until it is
closed.
"""

from __future__ import annotations

PORTS = 65536
BYTES_PER_ADDRESS = PORTS // 8


class LiveRelays:
    __slots__ = ("buffer", "index", "to_internal", "to_public")

    def __init__(self, relay_addresses: tuple, external: dict, buffer=None):
        """``relay_addresses``: the relay IPs (at most one per family), in config order;
        ``external``: internal IP -> public IP (a relay is live under both)."""
        self.index: dict[str, int] = {}
        self.to_internal: dict[str, str] = {}
        self.to_public: dict[str, str] = {}
        for i, ip in enumerate(relay_addresses):
            self.index[ip] = i
            if ip in external:
                self.index[external[ip]] = i
                self.to_internal[external[ip]] = ip
                self.to_public[ip] = external[ip]
        self.buffer = buffer if buffer is not None else bytearray(self.size(len(relay_addresses)))

    @staticmethod
    def size(addresses: int) -> int:
        return max(1, addresses) * BYTES_PER_ADDRESS

    def add(self, ip: str, port: int) -> None:
        i = self.index[ip] * BYTES_PER_ADDRESS + (port >> 3)
        self.buffer[i] |= 1 << (port & 7)

    def remove(self, ip: str, port: int) -> None:
        i = self.index[ip] * BYTES_PER_ADDRESS + (port >> 3)
        self.buffer[i] &= ~(1 << (port & 7)) & 0xFF

    def clear(self, low: int, high: int) -> None:
        """Mark ports ``low``..``high`` of every relay address not live: what a worker does
        with its own slice at start, since a worker that was killed left its bits set."""
        for i in set(self.index.values()):
            base = i * BYTES_PER_ADDRESS
            for port in range(low, high + 1):
                self.buffer[base + (port >> 3)] &= ~(1 << (port & 7)) & 0xFF

    def live(self, addr: tuple) -> bool:
        """Is ``addr`` (ip, port) a live relay address (internal or public) of turnd?"""
        i = self.index.get(addr[0])
        if i is None:
            return False
        port = addr[1]
        return bool(self.buffer[i * BYTES_PER_ADDRESS + (port >> 3)] & (1 << (port & 7)))

    def internal(self, addr: tuple) -> tuple:
        """The address a relay's socket is bound to (where to send it datagrams)."""
        ip = self.to_internal.get(addr[0])
        return (ip, addr[1]) if ip is not None else addr

    def public(self, addr: tuple) -> tuple:
        """The address a relay is known by to clients (XOR-RELAYED-ADDRESS)."""
        ip = self.to_public.get(addr[0])
        return (ip, addr[1]) if ip is not None else addr
