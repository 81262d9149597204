"""Prefix-aware recency/frequency policy for KV prefix traffic.

Each resident block has a priority; the lowest is evicted first:

    priority = clock / capacity + freq_weight * log2(freq) - depth_weight * log2(pos + 1)

* ``clock / capacity`` is recency measured in cache turnovers (the clock
  ticks once per insert or hit), so the weights mean the same thing at
  every capacity: a block seen twice outlives a one-hit block by
  ``freq_weight`` turnovers, a block seen four times by twice that.
* ``freq`` counts every insert and hit of the key, remembered across
  evictions in a bounded ghost table (``ghost_factor * capacity`` keys,
  least recently seen forgotten first) and capped at ``max_freq``, so a
  block that was hot long ago cannot squat forever.
* The depth term evicts leaves before their ancestors: a block at depth
  ``pos`` is useful only while every block before it is resident, and deep
  blocks belong to long prompts whose blocks are, per block, reused less.
  Among equal priorities the deeper block goes first.

On KV prefix traffic most blocks are seen once (long unique prompt tails),
a minority is seen again and again (system prompts, documents, the history of
a conversation that keeps going).  Plain LRU lets every one-hit tail push those
out; this policy keeps them for a few turnovers more per doubling of their
count, which is what the Mooncake conversation trace rewards.
"""
from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict

from ..errors import ConfigError
from . import EvictionPolicy, Protected, register_policy


@register_policy
class PrefixAware(EvictionPolicy):
    name = "prefix"

    def __init__(self, capacity: int, freq_weight: float = 3.0, depth_weight: float = 0.3,
                 max_freq: int = 64, ghost_factor: int = 4):
        super().__init__(capacity)
        for key, value in (("freq_weight", freq_weight), ("depth_weight", depth_weight)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"prefix.{key}", value, "a non-negative number")
        for key, value in (("max_freq", max_freq), ("ghost_factor", ghost_factor)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"prefix.{key}", value, "a positive int")
        self.freq_weight = float(freq_weight)
        self.depth_weight = float(depth_weight)
        self.max_freq = max_freq
        self._ghost_max = ghost_factor * capacity
        self._clock = 0
        self._seq = itertools.count()
        self._resident: dict[bytes, tuple[float, int, int]] = {}    # key -> (priority, pos, freq)
        self._heap: list[tuple[float, int, int, bytes]] = []        # (priority, -pos, seq, key); lazy
        self._ghost: OrderedDict[bytes, int] = OrderedDict()        # evicted key -> freq

    # ---- priority ----------------------------------------------------------------
    def _priority(self, pos: int, freq: int) -> float:
        return (self._clock / self.capacity + self.freq_weight * math.log2(freq)
                - self.depth_weight * math.log2(pos + 1))

    def _set(self, key: bytes, pos: int, freq: int) -> None:
        self._clock += 1
        pr = self._priority(pos, freq)
        self._resident[key] = (pr, pos, freq)
        heapq.heappush(self._heap, (pr, -pos, next(self._seq), key))
        if len(self._heap) > 4 * len(self._resident) + 64:
            self._compact()

    def _compact(self) -> None:
        live = {k: v[0] for k, v in self._resident.items()}
        self._heap = [e for e in self._heap if live.get(e[3]) == e[0]]
        # several heap entries may carry the current priority of one key: keep one
        seen: set[bytes] = set()
        heap = []
        for e in self._heap:
            if e[3] not in seen:
                seen.add(e[3])
                heap.append(e)
        heapq.heapify(heap)
        self._heap = heap

    # ---- EvictionPolicy ------------------------------------------------------------
    def insert(self, key: bytes, pos: int = 0) -> None:
        old = self._resident.get(key)
        if old is not None:
            freq = old[2]
        else:
            freq = self._ghost.pop(key, 0)
        self._set(key, pos, min(freq + 1, self.max_freq))

    def access(self, key: bytes, pos: int = 0) -> None:
        old = self._resident.get(key)
        if old is None:
            return
        self._set(key, pos, min(old[2] + 1, self.max_freq))

    def remove(self, key: bytes) -> None:
        self._resident.pop(key, None)       # its heap entries go stale

    def evict(self, n: int, protected: Protected) -> list[bytes] | None:
        if n <= 0:
            return []
        victims: list[tuple[float, int, int, bytes]] = []
        skipped: list[tuple[float, int, int, bytes]] = []
        taken: set[bytes] = set()
        heap, resident = self._heap, self._resident
        while len(victims) < n and heap:
            e = heapq.heappop(heap)
            cur = resident.get(e[3])
            if cur is None or cur[0] != e[0] or e[3] in taken:
                continue                                    # stale entry
            if protected(e[3]):
                skipped.append(e)
                continue
            victims.append(e)
            taken.add(e[3])
        for e in skipped:
            heapq.heappush(heap, e)
        if len(victims) < n:
            for e in victims:
                heapq.heappush(heap, e)
            return None
        out = []
        for e in victims:
            key = e[3]
            _, _, freq = resident.pop(key)
            self._remember(key, freq)
            out.append(key)
        return out

    def _remember(self, key: bytes, freq: int) -> None:
        self._ghost[key] = freq
        self._ghost.move_to_end(key)
        while len(self._ghost) > self._ghost_max:
            self._ghost.popitem(last=False)

    def __len__(self) -> int:
        return len(self._resident)

    def __contains__(self, key: bytes) -> bool:
        return key in self._resident
