"""Offline bounds: the infinite cache and Belady's optimum under prefix semantics.

Prefix semantics: a request's block hits only if every earlier block of the
request hit, so a request's hits are the leading run of its blocks that are
resident when it arrives.

Belady (MIN) knows the future: after each request, every block of the request
is resident, then, while the cache holds more than ``capacity`` blocks, the
block whose next request is farthest away leaves first (never-again blocks
first of all); among equal next uses the deeper block leaves first, since a
block is worth nothing without its ancestors.  Over the Mooncake conversation
trace this gives 0.3682 at 3M tokens, the figure its README reports.
"""
from __future__ import annotations

import heapq

from ..errors import ConfigError
from .trace import Trace

NEVER = 1 << 62


def prefix_hits(resident, blocks) -> int:
    """Length of the leading run of ``blocks`` found in ``resident``."""
    n = 0
    for h in blocks:
        if h not in resident:
            break
        n += 1
    return n


def infinite_hits(trace: Trace) -> int:
    """Hit blocks of a cache that never evicts."""
    seen: set[int] = set()
    hits = 0
    for r in trace.requests:
        hits += prefix_hits(seen, r.blocks)
        seen.update(r.blocks)
    return hits


def next_uses(trace: Trace) -> list[list[int]]:
    """For request i and its block j: the index of the next request holding that block."""
    out: list[list[int]] = [[]] * len(trace.requests)
    last: dict[int, int] = {}
    for i in range(len(trace.requests) - 1, -1, -1):
        blocks = trace.requests[i].blocks
        out[i] = [last.get(h, NEVER) for h in blocks]
        for h in blocks:
            last[h] = i
    return out


def belady_hits(trace: Trace, capacity: int) -> int:
    """Hit blocks of the offline optimum holding at most ``capacity`` blocks."""
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
        raise ConfigError("capacity", capacity, "a positive number of blocks")
    nxt = next_uses(trace)
    resident: dict[int, tuple[int, int]] = {}      # block -> (next use, pos) of its live heap entry
    heap: list[tuple[int, int, int]] = []          # (-next use, -pos, block): farthest, deepest on top
    hits = 0
    for i, r in enumerate(trace.requests):
        hits += prefix_hits(resident, r.blocks)
        for pos, (h, nu) in enumerate(zip(r.blocks, nxt[i])):
            resident[h] = (nu, pos)
            heapq.heappush(heap, (-nu, -pos, h))
        while len(resident) > capacity:
            nnu, npos, h = heapq.heappop(heap)
            if resident.get(h) == (-nnu, -npos):
                del resident[h]
        if len(heap) > 4 * capacity + 1024:          # drop stale entries
            heap = [(-nu, -p, h) for h, (nu, p) in resident.items()]
            heapq.heapify(heap)
    return hits
