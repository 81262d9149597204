"""CostModel: pick a copy mechanism per transfer from measured throughput.

Transfers fall into buckets by direction, mean span length and total size
(powers of two): within a bucket the mechanisms cost about the same per byte,
across buckets they need not (many short spans favour one kernel launch; a
few long ones favour the copy engines).  In each bucket:

1. every candidate is tried ``probes`` times, in order;
2. then the candidate with the best median throughput over its last
   ``window`` measurements is used; the first candidate (the preferred one,
   e.g. DMA, which leaves the SMs to the model) keeps the bucket unless
   another beats it by more than ``margin``;
3. every ``reprobe_every``-th transfer of a bucket goes to the candidate
   measured least recently, so a choice follows the machine when load changes.

Measurements arrive when transfers complete (``record``), possibly long after
``choose``: probing counts decisions, not measurements, so it never stalls.
"""
from __future__ import annotations

import math
import statistics
import threading
from collections import deque
from typing import Sequence

from ..errors import ConfigError


class _Bucket:
    __slots__ = ("decisions", "tried", "samples", "last_seen", "chosen")

    def __init__(self, candidates: Sequence[str], window: int):
        self.decisions = 0
        self.tried = {m: 0 for m in candidates}
        self.samples = {m: deque(maxlen=window) for m in candidates}
        self.last_seen = {m: -1 for m in candidates}
        self.chosen: dict[str, int] = {m: 0 for m in candidates}


class CostModel:
    """Per-bucket choice among ``candidates`` by measured bytes per second."""

    def __init__(self, candidates: Sequence[str], probes: int = 2, window: int = 8,
                 reprobe_every: int = 64, margin: float = 0.05):
        candidates = tuple(candidates)
        if not candidates:
            raise ConfigError("candidates", candidates, "at least one mechanism")
        if not isinstance(probes, int) or probes < 1:
            raise ConfigError("probes", probes, "an int >= 1")
        if not isinstance(reprobe_every, int) or reprobe_every < 2:
            raise ConfigError("reprobe_every", reprobe_every, "an int >= 2")
        if not 0 <= margin < 1:
            raise ConfigError("margin", margin, "a fraction in [0, 1)")
        self.candidates = candidates
        self.probes = probes
        self.window = window
        self.reprobe_every = reprobe_every
        self.margin = margin
        self._buckets: dict[tuple, _Bucket] = {}
        self._lock = threading.Lock()

    @staticmethod
    def bucket(direction: str, nbytes: int, num_spans: int) -> tuple:
        mean = nbytes / max(1, num_spans)
        return (direction, int(math.log2(max(1.0, mean))), int(math.log2(max(1, nbytes))))

    def _get(self, key: tuple) -> _Bucket:
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(self.candidates, self.window)
        return b

    def choose(self, key: tuple) -> str:
        with self._lock:
            b = self._get(key)
            b.decisions += 1
            pick = self._pick(b)
            b.tried[pick] += 1
            b.chosen[pick] += 1
            return pick

    def _pick(self, b: _Bucket) -> str:
        if len(self.candidates) == 1:
            return self.candidates[0]
        for m in self.candidates:
            if b.tried[m] < self.probes:
                return m
        if b.decisions % self.reprobe_every == 0:
            return min(self.candidates, key=lambda m: b.last_seen[m])
        return self._fastest(b) or self.candidates[0]     # None: probes submitted, none measured yet

    def _fastest(self, b: _Bucket) -> str | None:
        rates = {m: statistics.median(s) for m, s in b.samples.items() if s}
        if not rates:
            return None
        best = max(rates, key=rates.get)
        first = self.candidates[0]
        if first in rates and rates[first] >= rates[best] * (1 - self.margin):
            return first
        return best

    def record(self, key: tuple, mechanism: str, nbytes: int, seconds: float) -> None:
        if mechanism not in self.candidates or seconds <= 0:
            return
        with self._lock:
            b = self._get(key)
            b.samples[mechanism].append(nbytes / seconds)
            b.last_seen[mechanism] = b.decisions

    def best(self, key: tuple) -> str | None:
        """The mechanism a settled bucket uses (None before every candidate was measured)."""
        with self._lock:
            b = self._buckets.get(key)
            if b is None or any(not b.samples[m] for m in self.candidates):
                return None
            return self._fastest(b)

    def summary(self) -> dict:
        with self._lock:
            return {"/".join(map(str, k)): dict(b.chosen) for k, b in self._buckets.items()}
