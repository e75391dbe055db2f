"""The core's state for a hand-over to the next turnd (``turnd restart``, SIGUSR2), sans-I/O.

Format (JSON), version ``STATE_VERSION``; a reader refuses any other version (the
predecessor then keeps serving).  Times are relative ("seconds left", "seconds ago"), so the
two processes' clocks need not agree.  A new version is made whenever a field's meaning
changes; a field added with a default a reader can do without keeps the version.

    {"version": 1,
     "nonce_secret": hex,                  # nonces handed out stay good
     "allocations": [{
        "id", "transport" ("udp"|"tcp"), "client": [ip, port], "server": [ip, port],
        "user", "key": hex, "integrity": "sha1"|"sha256", "client_key",
        "left": seconds of lifetime, "age": seconds since created,
        "relays": [[ip, port], ...],       # in the order of the relay sockets handed over
        "permissions": {ip: seconds left},
        "channels": [[number, peer ip, peer port, seconds left], ...],
        "counters": [to peers packets, bytes, to client packets, bytes],
        "allocate_tid": hex, "allocate_response": hex}]}   # only while the Allocate may
                                                           # still be retransmitted (40 s)

A hand-over (turnd/handover.py) adds "connections" (plain TCP ones where they stand),
"fds" (which descriptor is which), "listen" and "draining" (SIGUSR1 goes on).
"""

from __future__ import annotations

from .allocation import Allocation, Channel

STATE_VERSION = 1
# RFC 8489 §6.2.1: a client gives up on a transaction after Rc x RTO (39.5 s by default);
# after that its Allocate is never retransmitted, and its answer needn't go along.
RETRANSMIT_WINDOW = 40.0


class StateError(Exception):
    """A state this turnd can't adopt (another version, or malformed)."""


def export_state(core, now: float, keep=lambda alloc: True) -> tuple[dict, list]:
    """(state, relay handles in the order of the state's relays) of the allocations ``keep``
    says go along."""
    allocations, handles = [], []
    young = now - RETRANSMIT_WINDOW
    for alloc in core.allocations.values():
        if alloc.expires < now or not keep(alloc):
            continue
        ft = alloc.five_tuple
        relays = alloc.relays.values()
        entry = {
            "id": alloc.id, "transport": ft.transport, "client": ft.client,
            "server": ft.server, "user": alloc.username, "key": alloc.key.hex(),
            "integrity": alloc.integrity, "client_key": alloc.client_key,
            "left": alloc.expires - now, "age": now - alloc.created,
            "relays": [r.address for r in relays],
            "permissions": {ip: t - now for ip, t in alloc.permissions.items() if t >= now},
            "channels": [(ch.number, ch.peer[0], ch.peer[1], ch.expires - now)
                         for ch in alloc.channels.values() if ch.expires >= now],
            "counters": (alloc.up_packets, alloc.up_bytes, alloc.down_packets, alloc.down_bytes)}
        if alloc.created > young:
            entry["allocate_tid"] = alloc.allocate_tid.hex()
            entry["allocate_response"] = alloc.allocate_response.hex()
        allocations.append(entry)
        for r in relays:
            handles.append(r.handle)
    return {"version": STATE_VERSION, "nonce_secret": core.nonces._secret.hex(),
            "allocations": allocations}, handles


def check_version(state) -> None:
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise StateError(f"state version {version!r}: this turnd reads version {STATE_VERSION}")


def import_allocation(core, entry: dict, handles: list, now: float, five_tuple) -> Allocation | None:
    """Adopt one allocation with its relay sockets (``handles``, in the order of
    ``entry["relays"]``).  None when it no longer fits this config (a relay address or port
    outside it): the caller closes the sockets and logs it."""
    relays = [tuple(r) for r in entry["relays"]]
    for ip, port in relays:
        pool = core.pools.get(ip)
        if pool is None or port not in pool:
            return None
    expires = now + float(entry["left"])
    alloc = Allocation(five_tuple, entry["user"], bytes.fromhex(entry["key"]), entry["integrity"],
                       expires)
    alloc.client_key = entry["client_key"]
    alloc.created = now - float(entry["age"])
    alloc.id = entry["id"]
    if "allocate_tid" in entry:  # (young enough to be retransmitted)
        alloc.allocate_tid = bytes.fromhex(entry["allocate_tid"])
        alloc.allocate_response = bytes.fromhex(entry["allocate_response"])
    alloc.up_packets, alloc.up_bytes, alloc.down_packets, alloc.down_bytes = entry["counters"]
    relays_by_addr = core.relays_by_addr
    for (ip, port), handle in zip(relays, handles):
        core.pools[ip].take(port)
        r = core._add_relay(alloc, ip, port, handle)
        relays_by_addr[r.address] = relays_by_addr[r.advertised] = r
    first = expires  # the sweep looks at the allocation when its first timer ends
    permissions = alloc.permissions
    for ip, left in entry["permissions"].items():
        permissions[ip] = t = now + float(left)
        first = min(first, t)
    for number, peer_ip, peer_port, left in entry["channels"]:
        relay = alloc.relays.get(6 if ":" in peer_ip else 4)
        if relay is None:
            continue
        peer = (peer_ip, int(peer_port))
        ch = Channel(int(number), peer, relay, now + float(left), peer_ip in core.own_ips)
        alloc.channels[ch.number] = ch
        alloc.peer_channels[peer] = ch
        first = min(first, ch.expires)
    core.allocations[five_tuple] = alloc
    core.by_id[alloc.id] = alloc
    core._hold(alloc.username, alloc.client_key)
    core.wheel.schedule(alloc, first)
    return alloc
