"""Prefix-aware recency/frequency policy for KV prefix traffic.

Each resident block has a priority, in clock ticks; the lowest is evicted first:

    priority = (clock - pos) + gap * (w * log2(freq) - d * log2(pos + 1))

* ``clock - pos`` is recency.  The clock ticks once per insert or hit;
  subtracting the block's depth ``pos`` gives every block of one request the
  same time, so within a request the deeper blocks (the leaves) go first: a
  block is useful only while every block before it is resident.
* ``freq`` counts every insert and hit of the key, remembered across
  evictions in a bounded ghost table (``ghost_factor * capacity`` keys,
  least recently evicted forgotten first) and capped at ``max_freq``.
* ``gap`` is the workload's typical reuse gap, measured: a running geometric
  mean of the ticks between consecutive accesses of the blocks that come back.
  Protection is given in those units, so it means the same at every capacity
  (counted in cache turnovers instead, the same weight that is right for a
  small cache keeps blocks far too long in a large one and loses to LRU).
* ``w`` is learned, not fixed: the policy measures how often a block seen
  once comes back (``p_first``) and how often a block seen twice or more
  does (``p_repeat``), over the keys it still remembers, with exponential
  forgetting.  ``w = gain * (log2(p_repeat / p_first) - 0.1)``, clipped to
  ``[0, freq_weight]`` (the margin keeps noise in the estimates from turning
  into a weight).  Where frequency predicts reuse (shared system prompts,
  documents, the Mooncake conversation trace: 0.25 vs 0.62) blocks seen often
  outlive one-hit tails by ``w`` gaps per doubling of their count; where it
  does not (pure multi-turn chat, where the newest turn is as likely to come
  back as the oldest), ``w`` falls to 0 and the policy is LRU.
* ``d = depth_weight * w / freq_weight`` evicts deep blocks a little earlier:
  they belong to long prompts whose blocks are, per block, reused less.  It
  scales with ``w`` so the policy stays plain LRU where frequency says nothing.

* ``first_low`` (off by default; the candidate of ``adaptive`` turns it on)
  stores a block seen for the first time ``w`` gaps lower, as if its count
  were 1/2: where frequency predicts reuse, one-hit blocks (most blocks) then
  leave before older blocks that came back, which are the ones about to come
  back again.  Where frequency says nothing (``w`` = 0) it changes nothing.
* ``tails`` (off by default; on in ``adaptive``'s candidate) classes a
  first-seen block by the length of the run of new blocks it was stored in
  (the new part of its request: 1, 2-3, 4-7, ... 128+ blocks) and learns, as
  for ``w``, how much more or less often each class comes back than
  first-seen blocks in general (``run_weights``, capped at ``freq_weight``
  gaps either way, times ``w / freq_weight``).  A run's blocks all move by the
  same amount once the run has ended, so its leaves still go first.  A short
  new tail (a turn added to a conversation) may be worth more than one block
  of a long new document, or less: the trace decides, and where the classes
  come back alike the weights stay 0.

A one-shot scan cannot flush a hot prefix unless it outlasts the hot blocks'
bonus (``w * log2(freq)`` gaps); a workload whose hot set changes abruptly
(tenants taking turns) pays for that bonus once per switch.
"""
from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict

from ..errors import ConfigError
from . import EvictionPolicy, Protected, register_policy


_PRIOR = 256.0      # pseudo-observations behind each reuse estimate
_MARGIN = 0.1       # log2 ratio below which frequency is taken to say nothing (about 7%)
_GAP_RATE = 1e-3    # weight of each observed gap in the running mean of log2(gap)
_RUN_CLASSES = 8    # runs of 1, 2-3, 4-7, ... 128+ new blocks


@register_policy
class PrefixAware(EvictionPolicy):
    name = "prefix"

    def __init__(self, capacity: int, freq_weight: float = 3.0, depth_weight: float = 0.3,
                 gain: float = 4.5, max_freq: int = 64, ghost_factor: int = 4, first_low: bool = False,
                 tails: bool = False):
        super().__init__(capacity)
        for key, value in (("freq_weight", freq_weight), ("depth_weight", depth_weight), ("gain", gain)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"prefix.{key}", value, "a non-negative number")
        for key, value in (("max_freq", max_freq), ("ghost_factor", ghost_factor)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"prefix.{key}", value, "a positive int")
        for key, value in (("first_low", first_low), ("tails", tails)):
            if not isinstance(value, bool):
                raise ConfigError(f"prefix.{key}", value, "true or false")
        self.first_low = first_low
        self.tails = tails
        self.max_freq_weight = float(freq_weight)
        self.max_depth_weight = float(depth_weight)
        self.gain = float(gain)
        self.freq_weight = 0.0                  # learned: starts as LRU
        self.depth_weight = 0.0
        self.max_freq = max_freq
        # reuse statistics: [first-time blocks, repeat blocks]; seen, came back
        self._seen = [0.0, 0.0]
        self._back = [0.0, 0.0]
        self._events = 0
        self._forget_every = 8 * capacity
        self._ghost_max = ghost_factor * capacity
        self._clock = 0
        self._log_gap = math.log2(capacity)     # until measured: one turnover
        self._seq = itertools.count()
        self._resident: dict[bytes, tuple[float, int, int, int, int]] = {}  # key -> (priority, pos, freq, last, run)
        self._heap: list[tuple[float, int, int, bytes]] = []           # (priority, -pos, seq, key); lazy
        self._ghost: OrderedDict[bytes, tuple[int, int, int]] = OrderedDict()  # evicted key -> (freq, last, run)
        # first-seen blocks by the length of the run of new blocks they were stored in
        # (log2 classes; ``run`` above is the class, -1 once the block came back): seen, came back
        self._run_seen = [0.0] * _RUN_CLASSES
        self._run_back = [0.0] * _RUN_CLASSES
        self.run_weights = [0.0] * _RUN_CLASSES      # learned, in reuse gaps (times w / freq_weight)
        self._run: list[bytes] = []                  # the run of first-seen inserts being stored
        self._run_pos = -2
        self._num_runs = 0

    # ---- priority ----------------------------------------------------------------
    @property
    def reuse_gap(self) -> float:
        """The typical reuse gap, in clock ticks (geometric running mean)."""
        return 2.0 ** self._log_gap

    def _priority(self, pos: int, freq: int) -> float:
        bonus = self.freq_weight * math.log2(freq) - self.depth_weight * math.log2(pos + 1)
        pr = (self._clock - pos) + self.reuse_gap * bonus
        if freq == 1 and self.first_low:
            pr -= self.reuse_gap * self.freq_weight
        return pr

    @property
    def reuse_probabilities(self) -> tuple[float, float]:
        """(p_first, p_repeat): how often a block seen once / more than once came back.

        Each is shrunk toward the pooled rate by ``_PRIOR`` pseudo-observations,
        so a handful of early events cannot swing the weight.
        """
        seen = self._seen[0] + self._seen[1]
        pooled = (self._back[0] + self._back[1]) / seen if seen else 0.0
        return tuple((self._back[i] + _PRIOR * pooled) / (self._seen[i] + _PRIOR) for i in (0, 1))

    def _learn(self, prev_freq: int, freq: int) -> None:
        """``prev_freq`` (0: unknown) was the key's count when last seen; it is back now."""
        if prev_freq:
            self._back[0 if prev_freq == 1 else 1] += 1.0
        self._seen[0 if freq == 1 else 1] += 1.0
        self._events += 1
        if self._events % 256 == 0:
            p_first, p_repeat = self.reuse_probabilities
            w = self.gain * (math.log2(max(p_repeat, 1e-9) / max(p_first, 1e-9)) - _MARGIN)
            self.freq_weight = min(self.max_freq_weight, max(0.0, w))
            self.depth_weight = self.max_depth_weight * (
                self.freq_weight / self.max_freq_weight if self.max_freq_weight else 0.0)
        if self._events % self._forget_every == 0:
            for i in (0, 1):
                self._seen[i] *= 0.5
                self._back[i] *= 0.5
            for t in range(_RUN_CLASSES):
                self._run_seen[t] *= 0.5
                self._run_back[t] *= 0.5

    def _set(self, key: bytes, pos: int, prev: tuple[int, int, int] | None) -> None:
        """Record one insert or hit of ``key``; ``prev`` is (freq, last clock, run class) if known."""
        if prev is None:
            freq = 1
            self._learn(0, 1)
        else:
            pfreq, last, run = prev
            if run >= 0:
                self._run_back[run] += 1.0
            gap = max(1, self._clock - last)
            self._log_gap += _GAP_RATE * (math.log2(gap) - self._log_gap)
            freq = min(pfreq + 1, self.max_freq)
            self._learn(pfreq, freq)
        self._clock += 1
        pr = self._priority(pos, freq)
        self._resident[key] = (pr, pos, freq, self._clock, -1)
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
        prev = old[2:] if old is not None else self._ghost.pop(key, None)
        if self.tails:
            if prev is None and self._run and pos == self._run_pos + 1:
                self._run.append(key)               # the run of new blocks goes on
            else:
                self._end_run()
                if prev is None:
                    self._run.append(key)
            self._run_pos = pos
        self._set(key, pos, prev)

    def access(self, key: bytes, pos: int = 0) -> None:
        old = self._resident.get(key)
        if old is not None:
            if self._run:
                self._end_run()
            self._set(key, pos, old[2:])

    # ---- runs of first-seen blocks (``tails``) ---------------------------------------
    def _end_run(self) -> None:
        """The run of first-seen blocks just stored is over: class it by its length and move
        all its blocks by that class's learned weight (all alike: the run's order stays)."""
        run, self._run = self._run, []
        if not run:
            return
        t = min(len(run).bit_length() - 1, _RUN_CLASSES - 1)
        self._run_seen[t] += len(run)
        self._num_runs += 1
        if self._num_runs % 64 == 0:
            self._learn_runs()
        shift = self.reuse_gap * self.run_weights[t] * (
            self.freq_weight / self.max_freq_weight if self.max_freq_weight else 0.0)
        resident, heap = self._resident, self._heap
        for key in run:
            rec = resident.get(key)
            if rec is None or rec[2] != 1:
                continue                            # gone, or already came back
            pr = rec[0] + shift
            resident[key] = (pr, rec[1], 1, rec[3], t)
            if shift:
                heapq.heappush(heap, (pr, -rec[1], next(self._seq), key))

    def _learn_runs(self) -> None:
        """Each run class's weight: how much more (or less) often its blocks come back than
        first-seen blocks in general, on the scale of the frequency weight."""
        seen, back = self._run_seen, self._run_back
        total = sum(seen)
        pooled = sum(back) / total if total else 0.0
        if pooled <= 0:
            return
        for t in range(_RUN_CLASSES):
            # a run comes back as a whole, more or less: the evidence is in runs, not blocks,
            # so the prior is _PRIOR runs of the class's size
            prior = _PRIOR * (1 << t)
            p = (back[t] + prior * pooled) / (seen[t] + prior)
            r = math.log2(max(p, 1e-9) / pooled)
            w = min(self.max_freq_weight, max(0.0, self.gain * (abs(r) - _MARGIN)))
            self.run_weights[t] = math.copysign(w, r)

    def remove(self, key: bytes) -> None:
        self._resident.pop(key, None)       # its heap entries go stale

    def discard(self, key: bytes) -> None:
        """``key`` left the tier by someone else's choice: forget it, but keep its history
        (count and last use) in the ghost table, as an eviction would."""
        rec = self._resident.pop(key, None)
        if rec is not None:
            self._remember(key, rec[2:])

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
            self._remember(key, resident.pop(key)[2:])
            out.append(key)
        return out

    def _remember(self, key: bytes, record: tuple[int, int, int]) -> None:
        self._ghost[key] = record
        self._ghost.move_to_end(key)
        while len(self._ghost) > self._ghost_max:
            self._ghost.popitem(last=False)

    def __len__(self) -> int:
        return len(self._resident)

    def __contains__(self, key: bytes) -> bool:
        return key in self._resident
