#!/usr/bin/env python3
"""What one unauthenticated request can cost turnd: the CPU time of the worst 64 KiB
requests we know how to build, through the sans-I/O core (decode, checks, the answer),
next to a plain unauthenticated Allocate.  Before the attribute cap, the worst of these
cost about 2.2 s (16,000 unknown attribute types) and 47 ms (2,700 peer addresses).

    python bench/worst_request.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.core_harness import Harness, worst_requests  # noqa: E402
from turnd.stun import Message, decode_untrusted, encode  # noqa: E402
from turnd.stun import constants as c  # noqa: E402


def cost_us(h: Harness, data: bytes, repeat: int) -> tuple[float, str]:
    """Median microseconds per request, and what it was answered with."""
    ft = h.five_tuple()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        actions = h.send(data, ft)
        times.append(time.perf_counter() - start)
    answer = "dropped"
    for action in actions:
        if hasattr(action, "data"):
            msg = decode_untrusted(action.data)
            err = msg.get(c.ERROR_CODE)
            answer = f"{err.code} ({len(action.data)} B)" if err else f"success ({len(action.data)} B)"
    return statistics.median(times) * 1e6, answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    h = Harness(unauth_rate=1e9)  # answer every one: measure the work, not the rate limit
    plain = encode(Message(c.ALLOCATE, c.REQUEST, os.urandom(12), [(c.REQUESTED_TRANSPORT, 17)]))
    rows = [("plain unauthenticated Allocate", plain)] + list(worst_requests().items())
    print("| request | bytes | µs per request (median) | answer |")
    print("|---|---|---|---|")
    for name, data in rows:
        us, answer = cost_us(h, data, args.repeat)
        print(f"| {name} | {len(data)} | {us:.0f} | {answer} |")


if __name__ == "__main__":
    main()
