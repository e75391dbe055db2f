"""The sans-I/O server: bytes plus a 5-tuple in, actions out (RFC 8489, RFC 8656).

``TurnServer.handle_untrusted(data, five_tuple, now)`` takes one datagram (or
one stream frame) from a client and returns a list of actions for the trio
shell to carry out; ``expire(now)`` removes what has timed out.  It never
blocks, never reads a clock and never touches a socket: relay ports are bound
through the ``binder`` seam, credentials come from the ``credentials`` seam
and peer decisions from the ``policy`` seam (as pion/turn's ServerConfig).
"""

from __future__ import annotations

import math
import random
import secrets
from collections import deque
from typing import NamedTuple, Protocol

import attrs

from ..auth import RestSecrets
from ..stun import constants as c
from ..stun.attributes import AddressErrorCode, ErrorCode, PasswordAlgorithm
from ..stun.errors import StunDecodeError, StunError
from ..stun.integrity import verify_fingerprint, verify_integrity
from ..stun.message import Message, decode_untrusted, encode
from .allocation import Allocation, Channel, Relay
from .nonce import FEATURE_PASSWORD_ALGORITHMS, FEATURE_USERNAME_ANONYMITY, NonceMaker
from .policy import PeerPolicy, embedded_ipv4_ints, parse_ip
from .ports import PortPool
from .ratelimit import TokenBuckets
from .registry import LiveRelays
from .wheel import ExpiryWheel

Address = tuple  # (ip: str, port: int)

TURN_METHODS = (c.ALLOCATE, c.REFRESH, c.CREATE_PERMISSION, c.CHANNEL_BIND)
RESERVATION_LIFETIME = 30.0
CHANNEL_COOLDOWN = 300.0
ALL_ALGORITHMS = (c.ALGORITHM_MD5, c.ALGORITHM_SHA256)
RATE_BUCKETS = 4096
BIND_ATTEMPTS = 16    # random ports tried per relay before 508
DENIED_NOTE = ("peer_policy", "a peer address was refused by the peer policy (loopback, private, "
               "link-local, turnd's own...; [peers] allow opens a range)")
SWEEP_BUDGET = 10_000  # items (allocations, permissions, channels) looked at per expire() call


class FiveTuple(NamedTuple):
    transport: str  # "udp", "tcp" or "tls"
    client: Address
    server: Address


# --- actions -------------------------------------------------------------------

@attrs.frozen
class Reply:
    """Send ``data`` to the client on the 5-tuple the request came in on."""
    data: bytes


@attrs.frozen(eq=False)
class AllocationCreated:
    """Start relaying for ``alloc`` (its relays' sockets are bound already)."""
    alloc: Allocation


@attrs.frozen(eq=False)
class AllocationDeleted:
    """Stop relaying for ``alloc`` (its relay sockets are closed already).  ``reason``:
    "deleted" (Refresh with LIFETIME 0), "expired" or "closed" (its TCP/TLS connection)."""
    alloc: Allocation
    reason: str = "deleted"


@attrs.frozen(eq=False)
class AllocationRefreshed:
    """``alloc`` was refreshed for ``lifetime`` seconds (for the logs)."""
    alloc: Allocation
    lifetime: int


@attrs.frozen
class Refused:
    """A request was refused for a reason the operator should hear of (out of ports, a
    quota, a cap, the peer policy, a failed login): log it, at most now and then per
    ``kind`` (a fixed word: never text a client chose)."""
    code: int
    kind: str
    note: str


@attrs.frozen(eq=False)
class SendToPeer:
    """Send ``data`` from ``relay`` to ``peer`` (a Send indication on the slow path)."""
    relay: Relay
    peer: Address
    data: bytes


class PortBusy(Exception):
    """The binder's answer when another program has the port: turnd tries another port
    and offers this one again after ``ProtocolConfig.port_retry`` seconds."""


class BindFailed(Exception):
    """The binder's answer when binding failed for want of resources (EMFILE, ENFILE,
    ENOBUFS...): the Allocate fails at once with 508 and the port goes back to the pool."""


class RelayBinder(Protocol):
    def bind(self, ip: str, port: int, dont_fragment: bool) -> object:
        """Bind a relay socket and return its handle; raise PortBusy or BindFailed."""

    def unbind(self, handle: object) -> None:
        """Close a relay socket.  When this returns the port may be bound again: the core
        returns a port to its pool only after this (so it is never handed out twice)."""


class Reservation(NamedTuple):
    """An EVEN-PORT reservation (RFC 8656 §7.2): port+1 kept for RESERVATION-TOKEN."""
    ip: str
    port: int
    expires: float
    username: str    # counted by that user's quota until used or expired
    client_key: str  # and by its client's (limits.ip_quota)


def client_key(ip: str) -> str:
    """What per-client limits count by: an IPv4 address, or the /64 of an IPv6 address
    (one host can have a whole /64 to itself)."""
    if ":" not in ip:
        return ip
    parsed = parse_ip(ip)
    return f"{parsed[1] >> 64:016x}::/64" if parsed else ip


@attrs.frozen
class ProtocolConfig:
    realm: str = "turnd"
    software: str = ""
    listen: tuple = ()                    # the server's own (ip, port) endpoints
    relay_addresses: tuple = ()           # relay IPs, at most one per family
    external: tuple = ()                  # ((internal ip, public ip), ...)
    port_range: tuple = (49152, 65535)
    default_family: str = "ipv4"          # "ipv4", "ipv6" or "keep"
    max_lifetime: int = 3600
    default_lifetime: int = 600
    permission_lifetime: int = 300
    channel_lifetime: int = 600
    nonce_lifetime: int = 600
    user_quota: int = 0
    total_quota: int = 0
    ip_quota: int = 0                     # allocations per client IPv4 address / IPv6 /64
    dont_fragment: bool = True            # the binder can honour DONT-FRAGMENT
    turn_transports: frozenset = frozenset({"udp", "tcp", "tls"})
    unauth_rate: float = 200.0            # answers to unauthenticated requests per second per
                                          # source IP, bursts of twice that; 0: no limit
    channel_max: int = c.CHANNEL_MAX      # 0x4FFF (RFC 8656); 0x7FFF accepts RFC 5766 clients
    max_attributes: int = c.MAX_ATTRIBUTES  # attributes decoded per message, else 400
    permissions_per_allocation: int = 64  # peer IPs with a permission, else 508
    channels_per_allocation: int = 64     # channel bindings, else 508
    port_retry: float = 60.0              # seconds before a port another program had is tried again
    host_addresses: tuple = ()            # every address of this host (also "own")


def user_for_logs(username: str) -> str:
    """A user name as logs show it: a TURN REST name ("<expiry>:<name>") without its expiry,
    which would tell apart (and date) each credential a caller was given."""
    if RestSecrets.expiry_of(username) is not None:
        rest = username.partition(":")[2]
        return rest if ":" in username else "(REST)"
    return username


def _family(ip: str) -> int:
    return 6 if ":" in ip else 4


class TurnServer:
    def __init__(self, config: ProtocolConfig, *, credentials=None, policy: PeerPolicy | None = None,
                 binder: RelayBinder | None = None, rng: random.Random | None = None,
                 nonce_secret: bytes | None = None, live: LiveRelays | None = None):
        self.config = config
        self.credentials = credentials
        self.policy = policy or PeerPolicy()
        self.binder = binder
        self.rng = rng or random.SystemRandom()
        self.stats: dict[str, int] = {}
        features = FEATURE_PASSWORD_ALGORITHMS
        if credentials is not None and credentials.supports_userhash:
            features |= FEATURE_USERNAME_ANONYMITY
        self.nonces = NonceMaker(nonce_secret or secrets.token_bytes(32), config.nonce_lifetime,
                                 features)
        # PASSWORD-ALGORITHMS offers only what every configured user can log in with.
        algorithms = credentials.algorithms if credentials is not None else ALL_ALGORITHMS
        self.offered = tuple(PasswordAlgorithm(a) for a in algorithms)
        # Checked against when a user is unknown, so that costs what a known one does.
        self._decoy_key = secrets.token_bytes(16)
        self.allocations: dict[FiveTuple, Allocation] = {}
        self.relays_by_addr: dict[Address, Relay] = {}
        # Allocations and reservations held per user and per client: what the quotas count.
        self.user_allocations: dict[str, int] = {}
        self.ip_allocations: dict[str, int] = {}
        self.reservations: dict[bytes, Reservation] = {}
        self._reservation_queue: deque[tuple[float, bytes]] = deque()  # in expiry order
        self._busy_ports: deque[tuple[float, str, int]] = deque()  # (retry at, ip, port)
        self.wheel = ExpiryWheel()
        self.sweep_pending = False  # the last expire() hit its budget: call again soon
        # None: serving; else draining, new Allocates refused: () -> 403, (ip, port) -> 300
        self.draining: tuple | None = None
        self.by_id: dict[str, Allocation] = {}  # what `turnd sessions --close` names
        self.relay_ips = {_family(ip): ip for ip in config.relay_addresses}
        self.external = dict(config.external)
        # Every live relay port of this turnd (with workers, of all of them: shared memory).
        self.live = live or LiveRelays(config.relay_addresses, self.external)
        self.pools = {ip: PortPool(*config.port_range) for ip in config.relay_addresses}
        self.listen_set = {tuple(ep) for ep in config.listen}
        # Ports listened on at a wildcard address: on any of turnd's own IPs they are it.
        self.wildcard_ports = frozenset(port for ip, port in config.listen if ip in ("0.0.0.0", "::"))
        # Every IP that is turnd itself: listen, relay and public (external) addresses, and
        # the host's own addresses (the shell finds them).
        self.own_ips = frozenset({ep[0] for ep in config.listen} | set(config.relay_addresses)
                                 | set(self.external) | set(self.external.values())
                                 | set(config.host_addresses))
        self._own_v4_ints = frozenset(p[1] for p in map(parse_ip, self.own_ips) if p and p[0] == 4)
        self.own_relay_ips = frozenset(set(config.relay_addresses) | {
            self.external[ip] for ip in config.relay_addresses if ip in self.external})
        # Token buckets for 401s, indexed by a hash of the source IP: fixed memory.
        self._buckets = TokenBuckets(RATE_BUCKETS)

    def reconfigure(self, config: ProtocolConfig, credentials=None,
                    policy: PeerPolicy | None = None) -> None:
        """A reload: new credentials, peer policy and limits for every request from now on.
        Allocations, relays, nonces and the rate-limit table stay; what shapes sockets and
        the port pools (listen and relay addresses, ports, channel numbers) is kept."""
        keep = ("listen", "relay_addresses", "external", "port_range", "host_addresses",
                "channel_max", "realm")
        self.config = attrs.evolve(config, **{k: getattr(self.config, k) for k in keep})
        self.credentials = credentials
        self.policy = policy or PeerPolicy()
        features = FEATURE_PASSWORD_ALGORITHMS
        if credentials is not None and credentials.supports_userhash:
            features |= FEATURE_USERNAME_ANONYMITY
        self.nonces = NonceMaker(self.nonces._secret, config.nonce_lifetime, features)
        algorithms = credentials.algorithms if credentials is not None else ALL_ALGORITHMS
        self.offered = tuple(PasswordAlgorithm(a) for a in algorithms)

    def count(self, name: str) -> None:
        self.stats[name] = self.stats.get(name, 0) + 1

    # --- entry points ------------------------------------------------------------

    def handle_untrusted(self, data: bytes, ft: FiveTuple, now: float) -> list:
        if ft.transport == "udp" and self.live.live(ft.client):
            # One of turnd's own relays (turnd reached itself, e.g. through another of the
            # host's addresses): never answered, so no loop and no way in.
            self.count("dropped_own_relay")
            return []
        try:
            msg = decode_untrusted(data, self.config.max_attributes)
        except StunDecodeError as exc:
            if exc.is_stun and exc.cls == c.REQUEST:
                self.count("bad_requests")
                if not self._rate_ok(ft, now):
                    self.count("dropped_rate_limited")
                    return []
                return [Reply(self._error_bytes(exc.method, exc.transaction_id,
                                                StunError(c.BAD_REQUEST, exc.reason[:127])))]
            self.count("dropped_not_stun")
            return []
        if msg.fingerprint_offset is not None and not verify_fingerprint(msg):
            self.count("dropped_bad_fingerprint")
            return []
        actions: list = []
        alloc = self.allocations.get(ft)
        if alloc is not None and alloc.expires < now:
            # RFC 8656 §7: an allocation is gone the moment its lifetime ends, whether
            # or not a sweep has run: it answers nothing and its 5-tuple is free.
            self.count("allocations_expired")
            actions.append(self._delete(alloc, "expired"))
        if msg.cls == c.INDICATION:
            if not msg.unknown_required:
                actions += self._indication(msg, ft, now)
            return actions
        if msg.cls != c.REQUEST:
            self.count("dropped_responses")
            return actions
        auth: tuple | None = None
        try:
            if msg.unknown_required:
                # RFC 8489 §6.3.1.1: unknown comprehension-required attributes: 420.
                raise StunError(c.UNKNOWN_ATTRIBUTE,
                                attributes=[(c.UNKNOWN_ATTRIBUTES, msg.unknown_required)])
            if msg.method == c.BINDING:
                self.count("binding_requests")
                resp = self._response(msg, [(c.XOR_MAPPED_ADDRESS, ft.client)])
                return actions + [Reply(encode(resp, fingerprint=msg.fingerprint_offset is not None))]
            if msg.method not in TURN_METHODS:
                raise StunError(c.BAD_REQUEST, "Unknown method")
            if ft.transport not in self.config.turn_transports:
                raise StunError(c.BAD_REQUEST, f"TURN over {ft.transport} is not served")
            auth = self._authenticate(msg, ft, now)
            return actions + self._turn_request(msg, ft, now, *auth)
        except StunError as err:
            self.count(f"error_{err.code}")
            if err.note:
                actions.append(Refused(err.code, *err.note))
            if auth is None and not self._rate_ok(ft, now):
                # Every answer to an unauthenticated request (401, 438, 400, 420) comes out
                # of one token bucket per source IP: turnd is no amplifier.
                self.count("dropped_rate_limited")
                return actions
            key = auth[1] if auth else None
            integrity = auth[2] if auth else "sha1"
            return actions + [Reply(self._error_bytes(
                msg.method, msg.transaction_id, err, key=key, integrity=integrity,
                fingerprint=msg.fingerprint_offset is not None))]

    def connection_closed(self, ft: FiveTuple) -> list:
        """A TCP or TLS connection closed.  An allocation's 5-tuple is its connection's (RFC
        8656 §2.2): nothing can reach it any more, so the allocation goes now and its relay
        ports return to the pool, not at the end of its lifetime."""
        alloc = self.allocations.get(ft)
        if alloc is None:
            return []
        self.count("allocations_closed")
        return [self._delete(alloc, "closed")]

    def close_allocation(self, alloc_id: str) -> list:
        """An admin ends the allocation ``alloc_id`` at once (``turnd sessions --close``):
        its relay ports return to the pool; its client's next request gets 437."""
        alloc = self.by_id.get(alloc_id)
        if alloc is None:
            return []
        self.count("allocations_closed_by_admin")
        return [self._delete(alloc, "closed_by_admin")]

    def expire(self, now: float, budget: int = SWEEP_BUDGET) -> list:
        """Delete what has expired: allocations, permissions, channels, cool-downs and
        reservations; offer ports again that another program had.  Looks at no more than
        ``budget`` allocations; ``sweep_pending`` says whether more are due already."""
        actions = []
        work = 0
        while work < budget:
            due = self.wheel.due(now, 1)
            if not due:
                break
            alloc = due[0]
            work += 1 + len(alloc.permissions) + len(alloc.channels) + len(alloc.cooldown)
            if alloc.expires < now:
                self.count("allocations_expired")
                actions.append(self._delete(alloc, "expired"))
            else:
                self._sweep(alloc, now)
        queue = self._reservation_queue
        for _ in range(budget):
            if not queue or queue[0][0] >= now:
                break
            _, token = queue.popleft()
            reserved = self.reservations.get(token)
            if reserved is not None and reserved.expires < now:
                del self.reservations[token]
                self._unhold(reserved.username, reserved.client_key)
                self.pools[reserved.ip].give(reserved.port)
        busy = self._busy_ports
        for _ in range(budget):
            if not busy or busy[0][0] > now:
                break
            _, ip, port = busy.popleft()
            self.pools[ip].give(port)
        self.sweep_pending = (self.wheel.pending(now) or bool(queue and queue[0][0] < now)
                              or bool(busy and busy[0][0] <= now))
        return actions

    def _sweep(self, alloc: Allocation, now: float) -> None:
        """Drop the expired permissions, channels and cool-downs of a live allocation and
        schedule it for the next thing in it that can expire."""
        nxt = alloc.expires
        perms = alloc.permissions
        for ip, expiry in list(perms.items()):
            if expiry < now:
                del perms[ip]
            elif expiry < nxt:
                nxt = expiry
        for number, ch in list(alloc.channels.items()):
            if ch.expires < now:
                # RFC 8656 §12: for 5 minutes after a channel expires neither its number
                # nor its peer may be bound to anything else.
                del alloc.channels[number]
                alloc.peer_channels.pop(ch.peer, None)
                alloc.cooldown[number] = (ch.peer, ch.expires + CHANNEL_COOLDOWN)
                alloc.cooldown_peers[ch.peer] = number
            elif ch.expires < nxt:
                nxt = ch.expires
        for number, (peer, until) in list(alloc.cooldown.items()):
            if until < now:
                del alloc.cooldown[number]
                del alloc.cooldown_peers[peer]
            elif until < nxt:
                nxt = until
        self.wheel.schedule(alloc, nxt if nxt > now else now + 1)

    def _wake_by(self, alloc: Allocation, when: float) -> None:
        """Something in ``alloc`` expires at ``when``: make sure the sweep looks by then."""
        scheduled = self.wheel.when(alloc)
        if scheduled is None or math.ceil(when) < scheduled:
            self.wheel.schedule(alloc, when)

    def free_ports(self) -> dict[str, int]:
        return {ip: len(pool) for ip, pool in self.pools.items()}

    # --- authentication (RFC 8489 §9.2.4) -------------------------------------------

    def _client_key(self, ft: FiveTuple) -> str:
        return f"{ft.transport}|{ft.client[0]}|{ft.client[1]}"

    def _challenge(self, ft: FiveTuple, now: float) -> list:
        return [(c.REALM, self.config.realm), (c.NONCE, self.nonces.make(self._client_key(ft), now)),
                (c.PASSWORD_ALGORITHMS, self.offered)]

    def _rate_ok(self, ft: FiveTuple, now: float) -> bool:
        """A token bucket per source IP in a fixed-size table: no state per request."""
        return self._buckets.ok(ft.client[0], now, self.config.unauth_rate)

    def _authenticate(self, msg: Message, ft: FiveTuple, now: float) -> tuple[str, bytes, str]:
        # RFC 8489 §9.2.4, in its order.
        if msg.integrity_offset is None and msg.integrity_sha256_offset is None:
            raise StunError(c.UNAUTHORIZED, attributes=self._challenge(ft, now))
        username, uhash = msg.get(c.USERNAME), msg.get(c.USERHASH)
        realm, nonce = msg.get(c.REALM), msg.get(c.NONCE)
        if (username is None and uhash is None) or realm is None or nonce is None:
            raise StunError(c.BAD_REQUEST, "Missing USERNAME, REALM or NONCE")
        if not self.nonces.check_untrusted(nonce, self._client_key(ft), now):
            raise StunError(c.STALE_NONCE, attributes=self._challenge(ft, now))
        algorithms, algorithm = msg.get(c.PASSWORD_ALGORITHMS), msg.get(c.PASSWORD_ALGORITHM)
        if (algorithms is None) != (algorithm is None):
            raise StunError(c.BAD_REQUEST, "PASSWORD-ALGORITHM needs PASSWORD-ALGORITHMS")
        alg = c.ALGORITHM_MD5
        if algorithm is not None:
            if tuple(algorithms) != self.offered or algorithm not in self.offered:
                raise StunError(c.BAD_REQUEST, "PASSWORD-ALGORITHMS do not match")
            alg = algorithm.algorithm
        if self.credentials is None or realm != self.config.realm:
            raise StunError(c.UNAUTHORIZED, attributes=self._challenge(ft, now))
        keys: list[bytes] = []
        if username is None:
            username = self.credentials.username_for_userhash(uhash, realm)
        if username is not None:
            keys = self.credentials.keys_for(username, realm, alg, now)
        kind = "sha256" if msg.integrity_sha256_offset is not None else "sha1"
        for key in keys:
            if verify_integrity(msg, key):
                return username, key, kind
        if not keys:
            # An unknown user costs the one HMAC a known one does: timing tells nothing.
            verify_integrity(msg, self._decoy_key)
        self.count("auth_failures")
        expiry = RestSecrets.expiry_of(username)
        why = (f"an expired REST credential of {user_for_logs(username)!r}"
               if expiry is not None and expiry < now and not keys
               else f"wrong password or unknown user {user_for_logs(username)!r}")
        raise StunError(c.UNAUTHORIZED, attributes=self._challenge(ft, now), note=("auth", why))

    # --- TURN requests ---------------------------------------------------------------

    def _turn_request(self, msg, ft, now, username, key, integrity) -> list:
        alloc = self.allocations.get(ft)
        if msg.method == c.ALLOCATE:
            return self._allocate(msg, ft, now, username, key, integrity, alloc)
        if alloc is None:
            raise StunError(c.ALLOCATION_MISMATCH)  # RFC 8656 §7.3, §9.2, §11.2
        if alloc.username != username:
            raise StunError(c.WRONG_CREDENTIALS)  # RFC 8656 §5: not the allocation's user
        scheduled = self.wheel.when(alloc)
        if scheduled is not None and scheduled <= now:
            self._sweep(alloc, now)  # answer from exact state, not the last sweep's
        alloc.key, alloc.integrity = key, integrity  # answer in kind
        if msg.method == c.REFRESH:
            return self._refresh(msg, alloc, now)
        if msg.method == c.CREATE_PERMISSION:
            return self._create_permission(msg, alloc, now)
        return self._channel_bind(msg, alloc, now)

    def _signed(self, msg: Message, alloc_key: bytes, integrity: str, attributes: list) -> bytes:
        return encode(self._response(msg, attributes), key=alloc_key, integrity=integrity,
                      fingerprint=msg.fingerprint_offset is not None)

    def _lifetime(self, msg: Message) -> int:
        requested = msg.get(c.LIFETIME)
        cfg = self.config
        default = min(cfg.default_lifetime, cfg.max_lifetime)
        if requested is None:
            return default
        return max(default, min(requested, cfg.max_lifetime))

    def _hold(self, username: str, key: str) -> None:
        for table, name in ((self.user_allocations, username), (self.ip_allocations, key)):
            table[name] = table.get(name, 0) + 1

    def _unhold(self, username: str, key: str) -> None:
        for table, name in ((self.user_allocations, username), (self.ip_allocations, key)):
            n = table.get(name, 1) - 1
            if n:
                table[name] = n
            else:
                table.pop(name, None)

    def _allocate(self, msg, ft, now, username, auth_key, integrity, alloc) -> list:
        # RFC 8656 §7.2, step by step.
        if alloc is not None:
            # Step 2: the 5-tuple is in use.  A retransmission of the request that made
            # the allocation gets its response again; anything else (another user too) 437.
            if msg.transaction_id == alloc.allocate_tid and username == alloc.username:
                self.count("allocate_retransmits")
                return [Reply(alloc.allocate_response)]
            raise StunError(c.ALLOCATION_MISMATCH)
        if self.draining is not None:
            # Draining (the operator's choice): no new allocations here.  RFC 8489 §10: 300
            # with ALTERNATE-SERVER sends the client elsewhere; without one, 403.
            self.count("refused_draining")
            if self.draining:
                raise StunError(c.TRY_ALTERNATE, attributes=[(c.ALTERNATE_SERVER, self.draining)])
            raise StunError(c.FORBIDDEN, "Server is draining")
        transport = msg.get(c.REQUESTED_TRANSPORT)
        if transport is None:
            raise StunError(c.BAD_REQUEST, "Missing REQUESTED-TRANSPORT")  # step 3
        if transport != c.TRANSPORT_UDP:
            raise StunError(c.UNSUPPORTED_TRANSPORT)
        dont_fragment = c.DONT_FRAGMENT in msg
        if dont_fragment and not self.config.dont_fragment:  # step 4
            raise StunError(c.UNKNOWN_ATTRIBUTE, attributes=[(c.UNKNOWN_ATTRIBUTES, (c.DONT_FRAGMENT,))])
        token, even = msg.get(c.RESERVATION_TOKEN), msg.get(c.EVEN_PORT)
        req_fam = msg.get(c.REQUESTED_ADDRESS_FAMILY)
        add_fam = msg.get(c.ADDITIONAL_ADDRESS_FAMILY, msg.get(c.ADDITIONAL_ADDRESS_FAMILY_DRAFT))
        if token is not None and (even is not None or req_fam is not None or add_fam is not None):
            raise StunError(c.BAD_REQUEST, "RESERVATION-TOKEN with EVEN-PORT or address family")  # step 5
        if req_fam is not None and add_fam is not None:
            raise StunError(c.BAD_REQUEST, "REQUESTED- and ADDITIONAL-ADDRESS-FAMILY together")  # step 7
        if req_fam is not None and req_fam not in (c.FAMILY_IPV4, c.FAMILY_IPV6):
            raise StunError(c.ADDRESS_FAMILY_NOT_SUPPORTED)
        if add_fam is not None and add_fam != c.FAMILY_IPV6:
            raise StunError(c.BAD_REQUEST, "ADDITIONAL-ADDRESS-FAMILY must be IPv6")
        # Step 8, quotas: reservations count as allocations; EVEN-PORT with the R bit
        # takes two (the allocation and the reservation); using a reservation turns it
        # into the allocation, so it takes none more from whoever made it.
        cfg = self.config
        key = client_key(ft.client[0])
        reserved = self.reservations.get(token) if token is not None else None
        takes = 2 if even else 1
        user_takes = takes - (reserved is not None and reserved.username == username)
        ip_takes = takes - (reserved is not None and reserved.client_key == key)
        if cfg.user_quota and self.user_allocations.get(username, 0) + user_takes > cfg.user_quota:
            raise StunError(c.ALLOCATION_QUOTA_REACHED,
                            note=("user_quota", f"user {user_for_logs(username)!r} holds limits.user_quota ({cfg.user_quota}) allocations"))
        if cfg.ip_quota and self.ip_allocations.get(key, 0) + ip_takes > cfg.ip_quota:
            raise StunError(c.ALLOCATION_QUOTA_REACHED,
                            note=("ip_quota", f"a client address holds limits.ip_quota ({cfg.ip_quota}) allocations"))
        if cfg.total_quota and (len(self.allocations) + len(self.reservations)
                                + takes - (reserved is not None)) > cfg.total_quota:
            raise StunError(c.ALLOCATION_QUOTA_REACHED,
                            note=("total_quota", f"limits.total_quota ({cfg.total_quota}) allocations exist"))

        if token is not None:
            families = [4]
        elif req_fam is not None:
            families = [4 if req_fam == c.FAMILY_IPV4 else 6]
        elif add_fam is not None:
            families = [4, 6]
        elif cfg.default_family == "keep":
            families = [_family(ft.client[0])]
        else:
            families = [6 if cfg.default_family == "ipv6" else 4]
        if families[0] not in self.relay_ips:
            raise StunError(c.ADDRESS_FAMILY_NOT_SUPPORTED)

        alloc = Allocation(ft, username, auth_key, integrity, now + self._lifetime(msg))
        alloc.client_key = key
        alloc.created = now
        alloc.id = secrets.token_hex(5)  # unguessable: closing one takes knowing it
        self.by_id[alloc.id] = alloc
        new_token = None
        # The primary relay.
        ip = self.relay_ips[families[0]]
        if token is not None:
            self.reservations.pop(token, None)
            if reserved is not None:
                self._unhold(reserved.username, reserved.client_key)
            if reserved is None or reserved.expires < now:
                if reserved is not None:
                    self.pools[reserved.ip].give(reserved.port)
                raise StunError(c.INSUFFICIENT_CAPACITY, "Unknown or expired RESERVATION-TOKEN")
            ip, port = reserved.ip, reserved.port
            try:
                handle = self._open(ip, port, dont_fragment, now)
            except BindFailed:
                self.pools[ip].give(port)
                raise StunError(c.INSUFFICIENT_CAPACITY) from None
            if handle is None:
                raise StunError(c.INSUFFICIENT_CAPACITY, note=("reserved_port", "a reserved relay port was taken by another program"))
            relay = self._add_relay(alloc, ip, port, handle)
        else:
            try:
                relay = self._bind_relay(alloc, ip, dont_fragment, now, even=even)
            except BindFailed:
                raise StunError(c.INSUFFICIENT_CAPACITY) from None
            if relay is None:  # step 6 and an exhausted range
                raise StunError(c.INSUFFICIENT_CAPACITY, note=("ports", f"no free relay port on {ip}: relay.ports is used up"))
        try:
            response_attrs: list = [(c.XOR_RELAYED_ADDRESS, relay.advertised)]
            if even:  # R bit: keep port+1 for a later Allocate with RESERVATION-TOKEN
                new_token = secrets.token_bytes(8)
                expires = now + RESERVATION_LIFETIME
                self.reservations[new_token] = Reservation(ip, relay.address[1] + 1, expires,
                                                           username, key)
                self._reservation_queue.append((expires, new_token))
                self._hold(username, key)
            # The additional IPv6 relay of a dual allocation (RFC 8656 §7.2, ADDRESS-ERROR-CODE
            # when that family alone can't be served).
            if len(families) == 2:
                error = 440 if 6 not in self.relay_ips else None
                if error is None:
                    try:
                        extra = self._bind_relay(alloc, self.relay_ips[6], dont_fragment, now)
                    except BindFailed:
                        extra = None
                    if extra is None:
                        error = 508
                    else:
                        response_attrs.append((c.XOR_RELAYED_ADDRESS, extra.advertised))
                if error is not None:
                    response_attrs.append((c.ADDRESS_ERROR_CODE, AddressErrorCode(
                        c.FAMILY_IPV6, error, c.REASONS[error])))
            response_attrs.append((c.LIFETIME, int(alloc.expires - now)))
            if new_token is not None:
                response_attrs.append((c.RESERVATION_TOKEN, new_token))
            response_attrs.append((c.XOR_MAPPED_ADDRESS, ft.client))
            alloc.allocate_tid = msg.transaction_id
            alloc.allocate_response = self._signed(msg, auth_key, integrity, response_attrs)
        except BaseException:  # never keep a socket or a port for a request that failed
            for r in alloc.relays.values():
                self._release(r)
            raise

        self.allocations[ft] = alloc
        self._hold(username, key)
        for r in alloc.relays.values():
            self.relays_by_addr[r.address] = r
            self.relays_by_addr[r.advertised] = r
        self.wheel.schedule(alloc, alloc.expires)
        self.count("allocations_created")
        return [AllocationCreated(alloc), Reply(alloc.allocate_response)]

    def _add_relay(self, alloc: Allocation, ip: str, port: int, handle) -> Relay:
        self.live.add(ip, port)
        address = (ip, port)
        advertised = (self.external.get(ip, ip), port)
        relay = Relay(alloc, _family(ip), address, advertised, handle)
        alloc.relays[relay.family] = relay
        return relay

    def _open(self, ip: str, port: int, dont_fragment: bool, now: float):
        """A relay socket through the binder; None when another program has the port (it
        is offered again after ``port_retry``).  BindFailed propagates."""
        if self.binder is None:
            return object()
        try:
            return self.binder.bind(ip, port, dont_fragment)
        except PortBusy:
            self.count("relay_ports_busy")
            self._busy_ports.append((now + self.config.port_retry, ip, port))
            return None
        except BindFailed:
            self.count("relay_bind_failures")
            raise

    def _bind_relay(self, alloc, ip, dont_fragment, now, *, even: bool | None = None) -> Relay | None:
        """A relay on a random free port: for EVEN-PORT an even one, and with its R bit
        (``even`` True) port+1 free too and taken for the reservation (RFC 8656 §7.2);
        None when no port could be had.  BindFailed propagates with every port returned."""
        pool = self.pools[ip]
        even_port = bool(even)  # the pair is taken and given back together
        for _ in range(BIND_ATTEMPTS):
            if even is None:
                port = pool.take_random(self.rng)
            else:
                port = pool.take_even_pair(self.rng) if even else pool.take_even(self.rng)
            if port is None:
                return None
            try:
                handle = self._open(ip, port, dont_fragment, now)
            except BindFailed:
                pool.give(port)
                if even_port:
                    pool.give(port + 1)
                raise
            if handle is not None:
                return self._add_relay(alloc, ip, port, handle)
            if even_port:
                pool.give(port + 1)
        return None

    def _release(self, relay: Relay) -> None:
        """Close a relay's socket, then return its port: never the other way round."""
        self.live.remove(*relay.address)
        if self.binder is not None:
            self.binder.unbind(relay.handle)
        self.pools[relay.address[0]].give(relay.address[1])

    def _delete(self, alloc: Allocation, reason: str = "deleted") -> AllocationDeleted:
        del self.allocations[alloc.five_tuple]
        self.by_id.pop(alloc.id, None)
        self._unhold(alloc.username, alloc.client_key)
        for relay in alloc.relays.values():
            self.relays_by_addr.pop(relay.address, None)
            self.relays_by_addr.pop(relay.advertised, None)
            self._release(relay)
        self.wheel.cancel(alloc)
        alloc.expires = float("-inf")  # the hot path stops at once
        return AllocationDeleted(alloc, reason)

    def _refresh(self, msg, alloc, now) -> list:
        fam = msg.get(c.REQUESTED_ADDRESS_FAMILY)
        if fam is not None and (4 if fam == c.FAMILY_IPV4 else 6) not in alloc.relays:
            raise StunError(c.PEER_ADDRESS_FAMILY_MISMATCH)  # RFC 8656 §7.3
        if msg.get(c.LIFETIME) == 0:
            deleted = self._delete(alloc)
            self.count("allocations_deleted")
            return [deleted, Reply(self._signed(msg, alloc.key, alloc.integrity, [(c.LIFETIME, 0)]))]
        lifetime = self._lifetime(msg)
        alloc.expires = now + lifetime
        self._wake_by(alloc, alloc.expires)
        return [AllocationRefreshed(alloc, lifetime),
                Reply(self._signed(msg, alloc.key, alloc.integrity, [(c.LIFETIME, lifetime)]))]

    def peer_allowed(self, ip: str, port: int | None) -> bool:
        """May a client reach this peer?  ``port`` None: any port (CreatePermission)."""
        if ip in self.own_ips:
            if port is not None and self.is_listen_endpoint(ip, port):
                return False
            if ip in self.own_relay_ips and (port is None or self.live.live((ip, port))):
                return True
            return self.policy.explicitly_allowed(ip)
        if _family(ip) == 6:
            parsed = parse_ip(ip)
            if parsed is None or any(v4 in self._own_v4_ints for v4 in embedded_ipv4_ints(parsed[1])):
                return False
        return self.policy.allowed(ip)

    def is_listen_endpoint(self, ip: str, port: int) -> bool:
        """Is (ip, port) one of turnd's listen sockets (also through a wildcard listen)?"""
        return (ip, port) in self.listen_set or (port in self.wildcard_ports and ip in self.own_ips)

    def _peer_relay(self, alloc: Allocation, peer: Address) -> Relay:
        relay = alloc.relays.get(_family(peer[0]))
        if relay is None:
            raise StunError(c.PEER_ADDRESS_FAMILY_MISMATCH)
        return relay

    def _check_room(self, alloc: Allocation, ips: set[str]) -> None:
        """508 when installing permissions for ``ips`` would pass the cap (RFC 8656 §9.2,
        §11.2: the server could not install them)."""
        new = len(ips - alloc.permissions.keys())
        if new and len(alloc.permissions) + new > self.config.permissions_per_allocation:
            self.count("permissions_capped")
            raise StunError(c.INSUFFICIENT_CAPACITY, "Too many permissions", note=("permissions",
                f"an allocation of user {user_for_logs(alloc.username)!r} holds limits.permissions_per_allocation "
                f"({self.config.permissions_per_allocation}) permissions"))

    def _permit(self, alloc: Allocation, ips: set[str], now: float) -> None:
        """Install or refresh permissions (the caller checked the room)."""
        expires = now + self.config.permission_lifetime
        for ip in ips:
            alloc.permissions[ip] = expires
        self._wake_by(alloc, expires)

    def _create_permission(self, msg, alloc, now) -> list:
        # RFC 8656 §9.2.
        peers = msg.get_all(c.XOR_PEER_ADDRESS)
        if not peers:
            raise StunError(c.BAD_REQUEST, "Missing XOR-PEER-ADDRESS")
        self._check_room(alloc, {peer[0] for peer in peers})  # before any policy work
        for peer in peers:
            self._peer_relay(alloc, peer)
            if not self.peer_allowed(peer[0], None):
                self.count("peers_denied")
                raise StunError(c.FORBIDDEN, note=DENIED_NOTE)
        self._permit(alloc, {peer[0] for peer in peers}, now)
        return [Reply(self._signed(msg, alloc.key, alloc.integrity, []))]

    def _channel_bind(self, msg, alloc, now) -> list:
        # RFC 8656 §11.2.
        number, peer = msg.get(c.CHANNEL_NUMBER), msg.get(c.XOR_PEER_ADDRESS)
        if number is None or peer is None:
            raise StunError(c.BAD_REQUEST, "Missing CHANNEL-NUMBER or XOR-PEER-ADDRESS")
        if not c.CHANNEL_MIN <= number <= self.config.channel_max:
            raise StunError(c.BAD_REQUEST, "Channel number out of range")
        existing = alloc.channels.get(number)
        if existing is None and len(alloc.channels) >= self.config.channels_per_allocation:
            self.count("channels_capped")
            raise StunError(c.INSUFFICIENT_CAPACITY, "Too many channels", note=("channels",
                f"an allocation of user {user_for_logs(alloc.username)!r} holds limits.channels_per_allocation "
                f"({self.config.channels_per_allocation}) channels"))
        self._check_room(alloc, {peer[0]})
        relay = self._peer_relay(alloc, peer)
        if not self.peer_allowed(peer[0], peer[1]):
            self.count("peers_denied")
            raise StunError(c.FORBIDDEN, note=DENIED_NOTE)
        if existing is not None and existing.peer != peer:
            raise StunError(c.BAD_REQUEST, "Channel bound to another peer")
        other = alloc.peer_channels.get(peer)
        if other is not None and other.number != number:
            raise StunError(c.BAD_REQUEST, "Peer bound to another channel")
        # RFC 8656 §12: an expired binding's number and peer stay paired for 5 minutes.
        cooling = alloc.cooldown.get(number)
        if cooling is not None and cooling[1] >= now and cooling[0] != peer:
            raise StunError(c.BAD_REQUEST, "Channel was bound to another peer until recently")
        cooling_number = alloc.cooldown_peers.get(peer)
        if (cooling_number is not None and cooling_number != number
                and alloc.cooldown[cooling_number][1] >= now):
            raise StunError(c.BAD_REQUEST, "Peer was bound to another channel until recently")
        self._permit(alloc, {peer[0]}, now)  # a channel binding installs a permission too
        if cooling is not None:
            del alloc.cooldown[number]
            del alloc.cooldown_peers[cooling[0]]
        expires = now + self.config.channel_lifetime
        if existing is not None:
            existing.expires = expires
        else:
            ch = Channel(number, peer, relay, expires, peer[0] in self.own_ips)
            alloc.channels[number] = ch
            alloc.peer_channels[peer] = ch
        return [Reply(self._signed(msg, alloc.key, alloc.integrity, []))]

    # --- indications -------------------------------------------------------------------

    def _indication(self, msg: Message, ft: FiveTuple, now: float) -> list:
        if msg.method != c.SEND:
            self.count("indications_ignored")  # Binding keepalives, stray Data indications
            return []
        alloc = self.allocations.get(ft)
        peer, data = msg.get(c.XOR_PEER_ADDRESS), msg.get(c.DATA_ATTR)
        if alloc is None or peer is None or data is None or alloc.expires < now:
            self.count("send_dropped")
            return []
        relay = alloc.relays.get(_family(peer[0]))
        if relay is None or not alloc.permitted(peer[0], now):
            self.count("send_dropped")
            return []
        return [SendToPeer(relay, peer, data)]

    # --- building responses ---------------------------------------------------------------

    def _software(self) -> list:
        return [(c.SOFTWARE, self.config.software)] if self.config.software else []

    def _response(self, msg: Message, attributes: list, cls: int = c.SUCCESS) -> Message:
        return Message(msg.method, cls, msg.transaction_id, attributes + self._software())

    def _error_bytes(self, method: int, transaction_id: bytes, err: StunError, *,
                     fingerprint: bool = False, key: bytes | None = None,
                     integrity: str = "sha1") -> bytes:
        msg = Message(method, c.ERROR, transaction_id,
                      [(c.ERROR_CODE, ErrorCode(err.code, err.reason))] + err.attributes
                      + self._software())
        return encode(msg, key=key, integrity=integrity, fingerprint=fingerprint)
