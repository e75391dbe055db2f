"""When to look at an allocation next: a timer wheel with one-second slots (sans-I/O).

The core schedules each allocation at the earliest moment anything in it can expire (the
allocation itself, a permission, a channel, a channel's cool-down).  ``due(now, budget)``
hands out at most ``budget`` of those whose moment has come, oldest slot first, so one
sweep never does more than a bounded amount of work however many allocations exist.
Moving or cancelling an entry is O(1) and the wheel holds exactly one entry per scheduled
allocation; a slot left empty stays until its second has passed, so its key is in the heap
once: memory is bounded by the allocations plus the seconds of the longest lifetime, and
no client can make it grow by refreshing, or by creating and deleting allocations.
"""

from __future__ import annotations

import heapq
import math


class ExpiryWheel:
    __slots__ = ("_slots", "_keys", "_slot_of")

    def __init__(self) -> None:
        self._slots: dict[int, set] = {}  # whole second (rounded up) -> entries (maybe none)
        self._keys: list[int] = []        # a heap of exactly the keys of ``_slots``
        self._slot_of: dict = {}          # entry -> its slot

    def __len__(self) -> int:
        return len(self._slot_of)

    def schedule(self, entry, when: float) -> None:
        """Look at ``entry`` at ``when`` (or the next whole second after it)."""
        key = math.ceil(when)
        old = self._slot_of.get(entry)
        if old == key:
            return
        if old is not None:
            self._remove(entry, old)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = set()
            heapq.heappush(self._keys, key)
        slot.add(entry)
        self._slot_of[entry] = key

    def when(self, entry) -> int | None:
        return self._slot_of.get(entry)

    def cancel(self, entry) -> None:
        old = self._slot_of.get(entry)
        if old is not None:
            self._remove(entry, old)

    def _remove(self, entry, key: int) -> None:
        del self._slot_of[entry]
        self._slots[key].discard(entry)  # an empty slot stays until its second is due

    def due(self, now: float, budget: int) -> list:
        """Up to ``budget`` entries whose slot is at or before ``now``; they are unscheduled."""
        out: list = []
        keys = self._keys
        while keys and keys[0] <= now and len(out) < budget:
            key = keys[0]
            slot = self._slots[key]
            while slot and len(out) < budget:
                entry = slot.pop()
                del self._slot_of[entry]
                out.append(entry)
            if not slot:
                del self._slots[key]
                heapq.heappop(keys)
        return out

    def pending(self, now: float) -> bool:
        """Is anything due at ``now`` still waiting (the last ``due`` hit its budget)?"""
        keys = self._keys
        while keys and keys[0] <= now and not self._slots[keys[0]]:
            del self._slots[heapq.heappop(keys)]
        return bool(keys) and keys[0] <= now
