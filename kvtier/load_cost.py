"""What loading a block and recomputing a token cost, measured online.

Two estimators, cheap enough to feed on every load and every engine step.
Neither takes a lock: :class:`~kvtier.load_plan.LoadPlanner` owns them and
serialises access.

:class:`TierLoads` -- one tier's load times.  A window of the last ``window``
successful loads ``(bytes, seconds)``, grouped in size classes (powers of four
from 64 KiB: a 16-token block and a 2,000-token prompt do not cost the same per
byte).  :meth:`TierLoads.model` returns an immutable :class:`LoadModel`:

    a load of n bytes costs  n * (median seconds per byte of n's class)
    a class with no data:    latency + n / bandwidth, where bandwidth is that of
                             the fastest class and latency the median excess of
                             every load over it

Medians make one stalled load an outlier, not a new estimate.  Before any
load, and after ``stale_s`` with none, the model is the tier's
:class:`TierPrior`; the first load after such a gap drops the old window.  A
tier once slow is therefore tried again and re-measured, not written off for
good: while it stays slow, about one request per ``stale_s`` pays for finding
out.

:class:`PrefillCost` -- the engine's compute per token: an EWMA (weight
``alpha``) over engine steps of at least ``min_tokens`` tokens (smaller steps are
mostly decode and launch overhead), seeded by the median of the first three,
each later step clipped to within 4x of the estimate.  Steps at the engine's
current batch give the cost per token at that batch.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Sequence

NUM_CLASSES = 10          # class c holds [64 KiB * 4^c, 64 KiB * 4^(c+1)); 0 all below, 9 all above
_CLASS_SHIFT = 16         # log2(64 KiB)
_SEED = 3                 # prefill steps whose median seeds the EWMA
_CLIP = 4.0               # later steps clipped to [estimate / 4, estimate * 4]


def size_class(nbytes: int) -> int:
    """0: below 256 KiB; 1: below 1 MiB; 2: below 4 MiB; ... 9: 16 GiB and above."""
    return max(0, min(NUM_CLASSES - 1, ((int(nbytes) >> _CLASS_SHIFT).bit_length() - 1) // 2))


def class_label(c: int) -> str:
    """The lower bound of class ``c``, as stats names it: '0B', '256KiB', '1MiB', ..."""
    if c == 0:
        return "0B"
    n = 1 << (_CLASS_SHIFT + 2 * c)
    return f"{n >> 20}MiB" if n >= 1 << 20 else f"{n >> 10}KiB"


@dataclass(frozen=True)
class TierPrior:
    """A tier before it is measured: ``latency_s`` per load plus bytes at ``gbps`` (1e9 B/s)."""
    gbps: float
    latency_s: float

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / (self.gbps * 1e9)


# Each below what the medium does when healthy, so a first plan does not overrate a tier,
# and the host's fast enough that a host hit loads for any model whose prefill costs more
# than ~16 us per token per 128 KiB of KV per token (8B-class models: 30-100 us on an H100).
DEFAULT_PRIORS = {
    "gpu": TierPrior(200.0, 10e-6),    # HBM to HBM
    "host": TierPrior(10.0, 20e-6),    # pinned host -> HBM: PCIe 4/5 x16 copies at 20-50 GB/s
    "disk": TierPrior(2.0, 200e-6),    # one NVMe at moderate queue depth (3-7 GB/s at best)
    "remote": TierPrior(1.0, 1e-3),    # 10 GbE and a datacenter round trip
}
FALLBACK_PRIOR = TierPrior(1.0, 1e-3)  # a tier of any other name


class LoadModel:
    """An immutable snapshot of one tier's load times."""
    __slots__ = ("classes", "rate", "latency_s", "prior")

    def __init__(self, obs: Sequence[tuple[int, float]] | None, prior: TierPrior):
        self.prior = prior
        self.classes: dict[int, float] = {}      # size class -> median seconds per byte
        self.rate = self.latency_s = 0.0
        if not obs:
            return
        by: dict[int, list[float]] = {}
        for b, s in obs:
            by.setdefault(size_class(b), []).append(s / b)
        self.classes = {c: statistics.median(v) for c, v in by.items()}
        self.rate = min(self.classes.values())
        self.latency_s = statistics.median(max(0.0, s - b * self.rate) for b, s in obs)

    @property
    def measured(self) -> bool:
        """False while the prior stands in for measurements."""
        return bool(self.classes)

    @property
    def gbps(self) -> float:
        return 1e-9 / self.rate if self.classes else self.prior.gbps

    @property
    def latency(self) -> float:
        return self.latency_s if self.classes else self.prior.latency_s

    def class_gbps(self) -> dict[str, float]:
        return {class_label(c): 1e-9 / r for c, r in sorted(self.classes.items())}

    def seconds(self, nbytes: int) -> float:
        """Expected seconds for one load of ``nbytes``."""
        if nbytes <= 0:
            return 0.0
        if not self.classes:
            return self.prior.seconds(nbytes)
        r = self.classes.get(size_class(nbytes))
        return nbytes * r if r is not None else self.latency_s + nbytes * self.rate


class TierLoads:
    """One tier's recent loads, and the bytes in flight from it."""

    def __init__(self, prior: TierPrior, window: int, stale_s: float | None):
        self.prior, self.stale_s = prior, stale_s
        self.obs: deque[tuple[int, float]] = deque(maxlen=window)
        self.last_obs: float | None = None
        self.last_active: float | None = None     # last load issued or measured
        self.inflight_bytes = self.inflight_ops = self.failed = 0
        self._model: LoadModel | None = None      # cached until the next observation

    def begin(self, nbytes: int, now: float) -> None:
        self.inflight_bytes += max(0, int(nbytes))
        self.inflight_ops += 1
        self.last_active = now

    def end(self, nbytes: int) -> None:
        self.inflight_bytes = max(0, self.inflight_bytes - max(0, int(nbytes)))
        self.inflight_ops = max(0, self.inflight_ops - 1)

    def observe(self, nbytes: int, seconds: float, now: float) -> bool:
        """Record one successful load; False (ignored) if it cannot be a measurement."""
        if nbytes <= 0 or not (0 < seconds < math.inf):
            return False
        if self.stale_s is not None and self.last_obs is not None and now - self.last_obs > self.stale_s:
            self.obs.clear()                      # it describes a tier that may have changed since
        self.obs.append((int(nbytes), float(seconds)))
        self.last_obs = self.last_active = now
        self._model = None
        return True

    def model(self, now: float) -> LoadModel:
        if not self.obs:
            return LoadModel(None, self.prior)
        if self.stale_s is not None and now - (self.last_active or 0.0) > self.stale_s:
            return LoadModel(None, self.prior)
        if self._model is None:
            self._model = LoadModel(self.obs, self.prior)
        return self._model


class PrefillCost:
    """The engine's compute seconds per token."""

    def __init__(self, alpha: float, min_tokens: int, prior: float | None = None):
        self.alpha, self.min_tokens, self.prior = alpha, min_tokens, prior
        self.measured: float | None = None
        self.observations = 0
        self._seed: list[float] = []

    @property
    def s_per_token(self) -> float | None:
        """The measurement, else the prior, else None (unknown)."""
        return self.measured if self.measured is not None else self.prior

    def observe(self, tokens: int, seconds: float) -> bool:
        """One engine step; False (ignored) if too small or not a duration."""
        if not tokens >= self.min_tokens or not (0 < seconds < math.inf):
            return False
        x = seconds / tokens
        self.observations += 1
        if self.measured is None:
            self._seed.append(x)
            if len(self._seed) >= _SEED:
                self.measured, self._seed = statistics.median(self._seed), []
            return True
        x = min(max(x, self.measured / _CLIP), self.measured * _CLIP)
        self.measured += self.alpha * (x - self.measured)
        return True
