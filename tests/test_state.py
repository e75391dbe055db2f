"""The hand-over state (turnd/turn/state.py), sans-I/O: what one core exports, another adopts,
and a client can't tell the difference."""

from __future__ import annotations

import json

import pytest

from turnd.stun import constants as c
from turnd.stun import decode_untrusted
from turnd.turn.protocol import FiveTuple
from turnd.turn.state import StateError, check_version, export_state, import_allocation

from .core_harness import Harness, error_code
from .turn_client import TurnClient

PEER = ("8.8.8.8", 5000)


def hand_over(old: Harness, new: Harness, later: float = 0.0) -> list:
    """Export from ``old``, through JSON as it travels, adopt into ``new`` ``later``
    seconds after (on the same wall clock, which nonces carry)."""
    state, handles = export_state(old.server, old.now)
    state = json.loads(json.dumps(state))
    check_version(state)
    new.now = old.now + later
    adopted, pos = [], 0
    for entry in state["allocations"]:
        mine = handles[pos:pos + len(entry["relays"])]
        pos += len(mine)
        ft = FiveTuple(entry["transport"], tuple(entry["client"]), tuple(entry["server"]))
        adopted.append(import_allocation(new.server, entry, mine, new.now, ft))
    return adopted


def test_an_allocation_goes_on_in_the_next_core_without_a_new_allocate():
    old, new = Harness(), Harness()
    client, ft = TurnClient("alice", "alicepw"), old.five_tuple()
    relayed = old.allocate(client, ft).get(c.XOR_RELAYED_ADDRESS)
    assert old.call(client, ft, c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4001),
                                                 (c.XOR_PEER_ADDRESS, PEER)]).cls == c.SUCCESS
    old.now += 100
    [alloc] = hand_over(old, new, later=0.5)
    assert alloc is not None and alloc.relays[4].advertised == relayed
    # lifetimes went along, relative: 600 s from the Allocate, 100 s gone
    assert 499 <= alloc.expires - new.now <= 500
    assert 199 <= alloc.permissions[PEER[0]] - new.now <= 200
    # the nonce the client holds is good; its channel relays
    assert new.call(client, ft, c.REFRESH, [(c.LIFETIME, 600)]).cls == c.SUCCESS
    assert 599 <= new.server.allocations[ft].expires - new.now <= 600
    # its channel is there: refreshing it works, binding the number elsewhere is refused
    assert new.server.allocations[ft].peer_channels[PEER].number == 0x4001
    assert new.call(client, ft, c.CHANNEL_BIND, [(c.CHANNEL_NUMBER, 0x4001),
                                                 (c.XOR_PEER_ADDRESS, PEER)]).cls == c.SUCCESS
    assert error_code(new.call(client, ft, c.CHANNEL_BIND, [
        (c.CHANNEL_NUMBER, 0x4001), (c.XOR_PEER_ADDRESS, ("8.8.4.4", 5000))])) == 400
    assert new.server.stats.get("allocations_created", 0) == 0


def test_a_young_allocate_is_answered_again_an_old_one_gets_437():
    """RFC 8489 §6.3: a retransmitted Allocate gets the same answer; after Rc x RTO (39.5 s)
    there are no retransmissions, and the answer doesn't go along."""
    for age, expect in ((5, "same"), (60, 437)):
        old, new = Harness(), Harness()
        client, ft = TurnClient("alice", "alicepw"), old.five_tuple()
        old.allocate(client, ft)
        alloc = old.server.allocations[ft]
        tid, response = alloc.allocate_tid, alloc.allocate_response
        old.now += age
        hand_over(old, new)
        _, data = client.request(c.ALLOCATE, [(c.REQUESTED_TRANSPORT, 17)], tid=tid)
        [reply] = new.replies(new.send(data, ft))
        if expect == "same":
            assert reply == response
        else:
            assert error_code(decode_untrusted(reply)) == 437


def test_an_allocation_whose_relay_port_left_the_config_is_not_adopted():
    old, new = Harness(), Harness(port_range=(51000, 51099))
    client, ft = TurnClient("alice", "alicepw"), old.five_tuple()
    old.allocate(client, ft)
    assert hand_over(old, new) == [None]
    assert new.server.allocations == {}


def test_another_state_version_is_refused():
    old = Harness()
    state, _ = export_state(old.server, old.now)
    for version in (None, 0, 2, "1"):
        with pytest.raises(StateError):
            check_version(dict(state, version=version))
    with pytest.raises(StateError):
        check_version([state])
