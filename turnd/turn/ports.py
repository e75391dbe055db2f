"""A pool of relay ports for one relay address: O(1) random take and give back."""

from __future__ import annotations

import random


class PortPool:
    def __init__(self, low: int, high: int):
        self.low, self.high = low, high
        self._free = list(range(low, high + 1))
        self._index = {p: i for i, p in enumerate(self._free)}

    def __len__(self) -> int:
        return len(self._free)

    def __contains__(self, port: int) -> bool:
        return port in self._index

    def take(self, port: int) -> bool:
        i = self._index.pop(port, None)
        if i is None:
            return False
        last = self._free.pop()
        if last != port:
            self._free[i] = last
            self._index[last] = i
        return True

    def take_random(self, rng: random.Random) -> int | None:
        if not self._free:
            return None
        port = self._free[rng.randrange(len(self._free))]
        self.take(port)
        return port

    def take_even(self, rng: random.Random, tries: int = 64) -> int | None:
        """A free even port (EVEN-PORT without the R bit: its neighbour may be in use)."""
        for _ in range(tries):
            if not self._free:
                return None
            p = self._free[rng.randrange(len(self._free))]
            if not p & 1:
                self.take(p)
                return p
        return None

    def take_even_pair(self, rng: random.Random, tries: int = 64) -> int | None:
        """An even port p with p+1 also free; both are taken."""
        for _ in range(tries):
            if len(self._free) < 2:
                return None
            p = self._free[rng.randrange(len(self._free))] & ~1
            if p in self._index and p + 1 in self._index:
                self.take(p)
                self.take(p + 1)
                return p
        return None

    def give(self, port: int) -> None:
        if self.low <= port <= self.high and port not in self._index:
            self._index[port] = len(self._free)
            self._free.append(port)
