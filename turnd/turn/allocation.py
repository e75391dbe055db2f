"""Allocations, relays, channels: plain slotted data shared by the core and the hot path.

The core (protocol.py) creates and changes them; turnd/relay.py only reads
them per packet (dict lookups and expiry comparisons).
"""

from __future__ import annotations


class Relay:
    """One relayed transport address of an allocation."""

    __slots__ = ("alloc", "family", "address", "advertised", "handle")

    def __init__(self, alloc: "Allocation", family: int, address: tuple, advertised: tuple,
                 handle: object):
        self.alloc = alloc
        self.family = family          # 4 or 6
        self.address = address        # (ip, port) the socket is bound to
        self.advertised = advertised  # (ip, port) in XOR-RELAYED-ADDRESS (external, if NATed)
        self.handle = handle          # the shell's socket (opaque to the core)


class Channel:
    __slots__ = ("number", "peer", "relay", "expires", "own")

    def __init__(self, number: int, peer: tuple, relay: Relay, expires: float, own: bool):
        self.number = number
        self.peer = peer      # (ip, port)
        self.relay = relay    # the relay whose family matches the peer
        self.expires = expires
        self.own = own        # peer IP is one of turnd's own addresses


class Allocation:
    __slots__ = ("five_tuple", "username", "key", "integrity", "expires", "relays",
                 "permissions", "channels", "peer_channels", "allocate_tid",
                 "allocate_response", "client_handle", "peer_attr_cache", "cooldown",
                 "cooldown_peers", "client_key", "created", "up_packets", "up_bytes",
                 "down_packets", "down_bytes", "id")

    def __init__(self, five_tuple, username: str, key: bytes, integrity: str, expires: float):
        self.five_tuple = five_tuple
        self.username = username
        self.key = key                # the long-term key responses are signed with
        self.integrity = integrity    # "sha1" or "sha256": what the client used
        self.expires = expires
        self.relays: dict[int, Relay] = {}            # family (4/6) -> relay
        self.permissions: dict[str, float] = {}       # peer IP -> expiry
        self.channels: dict[int, Channel] = {}        # number -> channel
        self.peer_channels: dict[tuple, Channel] = {}  # peer (ip, port) -> channel
        self.allocate_tid: bytes = b""
        self.allocate_response: bytes = b""
        self.client_handle: object = None  # set by the shell: how to reach the client
        # XOR-PEER-ADDRESS TLVs of IPv4 peers for Data indications (an IPv4 address is
        # XORed with the cookie only, so it does not depend on the transaction ID).
        self.peer_attr_cache: dict[tuple, bytes] = {}
        # Expired channels: number -> (peer, until). For 5 minutes neither the number nor
        # the peer may be bound to anything else (RFC 8656 §12).
        self.cooldown: dict[int, tuple[tuple, float]] = {}
        self.cooldown_peers: dict[tuple, int] = {}  # the same, by peer
        self.client_key = ""  # what limits.ip_quota counts by (IPv4 address, IPv6 /64)
        self.created = expires  # set by the core: when it was made
        self.id = ""  # set by the core: what `turnd sessions` calls it
        # Relayed for this allocation (the hot path adds, for the logs and the hand-over):
        # from its client to peers, and from peers to its client (payload bytes).
        self.up_packets = self.up_bytes = self.down_packets = self.down_bytes = 0

    def permitted(self, ip: str, now: float) -> bool:
        expiry = self.permissions.get(ip)
        return expiry is not None and expiry >= now
