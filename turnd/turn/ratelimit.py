"""Token buckets in a fixed-size table (sans-I/O: ``now`` comes in): ``rate`` per second per
key, in bursts of twice that, indexed by a hash of the key, so memory never grows with the
number of keys a client can make up (keys that collide share a bucket)."""

from __future__ import annotations

from array import array

BUCKETS = 4096


class TokenBuckets:
    __slots__ = ("tokens", "last")

    def __init__(self, size: int = BUCKETS):
        self.tokens = array("d", bytes(8 * size))
        self.last = array("d", bytes(8 * size))

    def ok(self, key, now: float, rate: float) -> bool:
        """Take a token from ``key``'s bucket; False when it has none.  ``rate`` 0: no limit."""
        if not rate:
            return True
        i = hash(key) % len(self.tokens)
        tokens = min(2 * rate, self.tokens[i] + (now - self.last[i]) * rate)
        self.last[i] = now
        if tokens < 1:
            self.tokens[i] = tokens
            return False
        self.tokens[i] = tokens - 1
        return True
