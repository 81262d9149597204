"""Load or recompute: how much of a hit to load, decided from live measurements.

A hit is worth loading only if moving its bytes into the engine's pages is
faster than computing them again.  :class:`LoadPlanner` takes the measurements
(:mod:`kvtier.load_cost`) and answers one question per request:

    begin(tier, nbytes)                  a load from ``tier`` was issued: bytes in flight
    end(tier, nbytes, seconds, ok)       it finished; ``seconds`` from issue to bytes in
                                         the engine's pages (None: not timed)
    observe(tier, nbytes, seconds)       a timed load with no begin (a probe, a promotion)
    observe_prefill(tokens, seconds)     an engine step computed ``tokens`` in ``seconds``
    plan(tiers, block_bytes, block_tokens, deadline=None) -> Plan
    stats()                              the measurements and decisions, for metrics

The rule.  Loading the first ``k`` hit blocks is expected to take
``L(k) = sum over the tiers T in the prefix of t_T(queued_T + bytes_T(k))``
(what is in flight on a tier drains first; tiers are summed, not overlapped:
an upper bound) and saves ``R(k) = k * block_tokens * seconds_per_token`` of
compute.  The plan loads the prefix with the largest ``R(k) - margin * L(k)``
(the longest on ties), none if that is not positive.  So every loaded prefix
has ``L(k) < R(k) / margin``, and a slow tail is never carried by a fast head:
host blocks followed by slow disk blocks load the host blocks only.  Until the
compute per token is measured (and with no ``prefill_s_per_token`` prior)
recompute counts as unboundedly expensive: every hit loads, as before this rule.

Back-pressure.  Bytes in flight per tier are bounded (``inflight_bytes``).  A
prefix that would pass a bound waits for the queue to drain (``Plan.wait``,
deadline at most ``max_wait_s`` after the request's first plan) when waiting is
expected to save more than what fits now, and otherwise loads the most
profitable prefix that fits (often none: recompute).  An idle tier admits one
load of any size.  A waiting request asks again, passing the plan's
``deadline``; once the clock passes it the plan never waits.  Nothing queues
without bound: the planner never holds requests, it only says how long to.

Thread-safe: one lock around the measurements; a plan is computed from a
snapshot outside it.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Mapping, Sequence

from .config import parse_size
from .errors import ConfigError
from .load_cost import DEFAULT_PRIORS, FALLBACK_PRIOR, LoadModel, PrefillCost, TierLoads, TierPrior

# About a quarter second of each tier's prior bandwidth: enough to keep the medium
# busy, short enough that a request queued behind it is never stalled for long.
DEFAULT_INFLIGHT_BYTES = {"gpu": 8 << 30, "host": 2 << 30, "disk": 512 << 20, "remote": 256 << 20}
REASONS = ("miss", "load", "partial", "recompute", "wait", "back_pressure")


def _number(key: str, v: object, lo: float, *, lo_ok: bool) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v < lo or (v == lo and not lo_ok):
        raise ConfigError(key, v, f"a finite number {'>=' if lo_ok else '>'} {lo:g}")


def _count(key: str, v: object) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(key, v, "a positive int")


@dataclass(frozen=True)
class LoadPlanConfig:
    """Settings of the rule.  The per-tier maps are merged over the defaults."""
    margin: float = 1.2               # load only if load < recompute / margin: both are estimates,
                                      # and a wrong "load" stalls the request, a wrong "recompute"
                                      # costs at most 1/margin of a load's saving
    max_wait_s: float = 0.5           # longest a request waits for room in a tier's queue
    inflight_bytes: Mapping[str, int] = field(default_factory=dict)   # bound per tier
    default_inflight_bytes: int = 256 << 20                           # tiers in neither map
    priors: Mapping[str, TierPrior] = field(default_factory=dict)
    prefill_s_per_token: float | None = None   # None: unknown until measured (every hit loads)
    prefill_alpha: float = 0.2        # EWMA weight of one engine step
    prefill_min_tokens: int = 16      # smaller steps are not prefill measurements
    window: int = 64                  # recent loads remembered per tier
    stale_s: float | None = 30.0      # a tier with no load for this long is back to its prior

    def __post_init__(self) -> None:
        _number("margin", self.margin, 1.0, lo_ok=True)
        _number("max_wait_s", self.max_wait_s, 0.0, lo_ok=True)
        _number("prefill_alpha", self.prefill_alpha, 0.0, lo_ok=False)
        if self.prefill_alpha > 1:
            raise ConfigError("prefill_alpha", self.prefill_alpha, "a weight in (0, 1]")
        if self.prefill_s_per_token is not None:
            _number("prefill_s_per_token", self.prefill_s_per_token, 0.0, lo_ok=False)
        if self.stale_s is not None:
            _number("stale_s", self.stale_s, 0.0, lo_ok=False)
        for key in ("prefill_min_tokens", "window", "default_inflight_bytes"):
            _count(key, getattr(self, key))
        if not isinstance(self.inflight_bytes, Mapping):
            raise ConfigError("inflight_bytes", self.inflight_bytes, "a mapping of tier name to bytes")
        for name, v in self.inflight_bytes.items():
            _count(f"inflight_bytes.{name}", v)
        if not isinstance(self.priors, Mapping):
            raise ConfigError("priors", self.priors, "a mapping of tier name to TierPrior")
        for name, p in self.priors.items():
            if not isinstance(p, TierPrior):
                raise ConfigError(f"priors.{name}", p, "a TierPrior(gbps, latency_s)")
            _number(f"priors.{name}.gbps", p.gbps, 0.0, lo_ok=False)
            _number(f"priors.{name}.latency_s", p.latency_s, 0.0, lo_ok=True)

    def prior(self, tier: str) -> TierPrior:
        return self.priors.get(tier) or DEFAULT_PRIORS.get(tier) or FALLBACK_PRIOR

    def inflight_limit(self, tier: str) -> int:
        return self.inflight_bytes.get(tier) or DEFAULT_INFLIGHT_BYTES.get(tier) or self.default_inflight_bytes

    @classmethod
    def from_dict(cls, data: Mapping) -> "LoadPlanConfig":
        """From plain values: sizes may be strings ('512MiB'), priors ``{tier: {gbps, latency_s}}``."""
        if not isinstance(data, Mapping):
            raise ConfigError("load_plan", data, "a mapping of settings")
        known = {f.name for f in fields(cls)}
        kw = dict(data)
        for key in kw:
            if key not in known:
                raise ConfigError(key, kw[key], "a known key: " + ", ".join(sorted(known)))
        if isinstance(kw.get("inflight_bytes"), Mapping):
            kw["inflight_bytes"] = {k: parse_size(f"inflight_bytes.{k}", v) for k, v in kw["inflight_bytes"].items()}
        if "default_inflight_bytes" in kw:
            kw["default_inflight_bytes"] = parse_size("default_inflight_bytes", kw["default_inflight_bytes"])
        if isinstance(kw.get("priors"), Mapping):
            kw["priors"] = {k: _prior(f"priors.{k}", v) for k, v in kw["priors"].items()}
        return cls(**kw)


def _prior(key: str, v: object) -> TierPrior:
    if isinstance(v, TierPrior):
        return v
    if not isinstance(v, Mapping) or set(v) != {"gbps", "latency_s"}:
        raise ConfigError(key, v, "a mapping with exactly the keys gbps and latency_s")
    return TierPrior(v["gbps"], v["latency_s"])


@dataclass(frozen=True)
class TierCost:
    """One tier's share of a plan's prefix."""
    blocks: int
    bytes: int
    queued_bytes: int                 # already in flight on the tier when planned
    load_s: float                     # expected, the queue ahead included


@dataclass(frozen=True)
class Plan:
    """How much of a hit to load, and the numbers behind it (for logs and metrics).

    Load the first ``num_blocks`` hit blocks and recompute the rest -- unless
    ``wait``: then load nothing yet and ask again (with ``deadline``) after
    ``retry_after_s`` or when loads finish; ``num_blocks`` is what would load.
    """
    num_blocks: int
    num_hit_blocks: int
    block_tokens: int
    reason: str                       # one of REASONS
    load_s: float = 0.0               # expected load time of the chosen prefix
    recompute_s: float | None = 0.0   # expected compute of the same tokens; None: not measured yet
    hit_load_s: float = 0.0           # the same two for every hit block
    hit_recompute_s: float | None = 0.0
    prefill_s_per_token: float | None = None
    wait: bool = False
    deadline: float | None = None     # on the planner's clock; past it, a new plan never waits
    retry_after_s: float = 0.0
    tiers: Mapping[str, TierCost] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_tokens

    @property
    def load_now(self) -> int:
        """Blocks to load right now: 0 while waiting."""
        return 0 if self.wait else self.num_blocks

    def as_dict(self) -> dict:
        return asdict(self)


def _tally(tiers: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in tiers:
        out[x] = out.get(x, 0) + 1
    return out


class LoadPlanner:
    """The measurements and the rule.  One per engine; safe to share between threads."""

    def __init__(self, config: LoadPlanConfig | None = None, clock: Callable[[], float] = time.monotonic):
        if config is not None and not isinstance(config, LoadPlanConfig):
            raise ConfigError("load_plan", config, "a LoadPlanConfig")
        self.config = cfg = config or LoadPlanConfig()
        self.clock = clock
        self._lock = threading.Lock()
        self._tiers: dict[str, TierLoads] = {}
        self._prefill = PrefillCost(cfg.prefill_alpha, cfg.prefill_min_tokens, cfg.prefill_s_per_token)
        self._counts: dict[str, int] = {}

    def _tier(self, name: str) -> TierLoads:
        t = self._tiers.get(name)
        if t is None:
            t = self._tiers[name] = TierLoads(self.config.prior(name), self.config.window, self.config.stale_s)
        return t

    # ---- measurements ----------------------------------------------------------------
    def begin(self, tier: str, nbytes: int) -> None:
        """A load of ``nbytes`` from ``tier`` was issued; it is in flight until ``end``."""
        with self._lock:
            self._tier(tier).begin(nbytes, self.clock())

    def end(self, tier: str, nbytes: int, seconds: float | None = None, ok: bool = True) -> None:
        """The load ``begin`` announced is over; a successful one with ``seconds`` is measured."""
        with self._lock:
            t = self._tier(tier)
            t.end(nbytes)
            if not ok:
                t.failed += 1
            elif seconds is not None:
                t.observe(nbytes, seconds, self.clock())

    def observe(self, tier: str, nbytes: int, seconds: float) -> None:
        """A timed load that was not announced with ``begin``."""
        with self._lock:
            self._tier(tier).observe(nbytes, seconds, self.clock())

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """An engine step computed ``tokens`` tokens in ``seconds`` (steps below
        ``prefill_min_tokens`` are ignored)."""
        with self._lock:
            self._prefill.observe(tokens, seconds)

    @property
    def prefill_s_per_token(self) -> float | None:
        """Measured compute per token, else the configured prior, else None."""
        with self._lock:
            return self._prefill.s_per_token

    def model(self, tier: str) -> LoadModel:
        """The load-time model ``plan`` would use for ``tier`` now."""
        with self._lock:
            return self._tier(tier).model(self.clock())

    # ---- the rule --------------------------------------------------------------------
    def plan(self, tiers: Sequence[str], block_bytes: int, block_tokens: int, *,
             deadline: float | None = None) -> Plan:
        """How many leading hit blocks to load; ``tiers[i]`` is where hit block i lives.

        ``deadline``: that of this request's earlier waiting plan, if any.
        """
        _count("block_bytes", block_bytes)
        _count("block_tokens", block_tokens)
        tiers = list(tiers)
        with self._lock:
            now = self.clock()
            loads = {x: self._tier(x) for x in set(tiers)}
            models = {x: t.model(now) for x, t in loads.items()}
            queued = {x: t.inflight_bytes for x, t in loads.items()}
            p = self._prefill.s_per_token
        plan = self._decide(tiers, block_bytes, block_tokens, p, models, queued, now, deadline)
        with self._lock:
            for key, v in (("plans", 1), (f"plans.{plan.reason}", 1),
                           ("blocks.hit", plan.num_hit_blocks), ("blocks.load", plan.load_now)):
                self._counts[key] = self._counts.get(key, 0) + v
        return plan

    def _decide(self, tiers, bb, bt, p, models, queued, now, deadline) -> Plan:
        n, cfg = len(tiers), self.config
        if n == 0:
            return Plan(0, 0, bt, "miss", recompute_s=0.0 if p is not None else None,
                        hit_recompute_s=0.0 if p is not None else None, prefill_s_per_token=p)
        r = bt * p if p is not None else math.inf           # compute saved per block
        limits = {x: cfg.inflight_limit(x) for x in models}
        count = dict.fromkeys(models, 0)
        cost = dict.fromkeys(models, 0.0)
        load = [0.0] * (n + 1)                              # L(k)
        best_any = best_fit = 0
        s_any = s_fit = 0.0
        fit_limit = n                                       # longest prefix within every bound
        for k, x in enumerate(tiers, 1):
            count[x] += 1
            t = models[x].seconds(queued[x] + count[x] * bb)
            load[k] = load[k - 1] + t - cost[x]
            cost[x] = t
            if fit_limit == n and queued[x] and queued[x] + count[x] * bb > limits[x]:
                fit_limit = k - 1
            s = k * r - cfg.margin * load[k]
            if s > s_any or (best_any and s == s_any):
                best_any, s_any = k, s
            if k <= fit_limit and (s > s_fit or (best_fit and s == s_fit)):
                best_fit, s_fit = k, s
        k, reason, wait, w = best_fit, "", False, 0.0
        if best_any > best_fit:                             # a bound cut the best prefix short
            for x, c in _tally(tiers[:best_any]).items():
                q, excess = queued[x], queued[x] + c * bb - limits[x]
                if q and excess > 0:
                    w = max(w, models[x].seconds(min(q, excess)))
            until = deadline if deadline is not None else now + cfg.max_wait_s
            s_wait = best_any * r - cfg.margin * (w + load[best_any])
            if now + w <= until and now < until and (s_wait > s_fit or math.isinf(r)):
                k, reason, wait, deadline = best_any, "wait", True, until
            else:
                reason = "back_pressure"
        if not reason:
            reason = "recompute" if k == 0 else "load" if k == n else "partial"
        costs = {x: TierCost(c, c * bb, queued[x], models[x].seconds(queued[x] + c * bb))
                 for x, c in _tally(tiers[:k]).items()}
        known = p is not None
        return Plan(k, n, bt, reason, load_s=load[k], recompute_s=k * r if known else None,
                    hit_load_s=load[n], hit_recompute_s=n * r if known else None, prefill_s_per_token=p,
                    wait=wait, deadline=deadline if wait else None, retry_after_s=w if wait else 0.0,
                    tiers=costs)

    # ---- metrics ---------------------------------------------------------------------
    def stats(self) -> dict:
        """The measurements and the decisions so far, flat, for metrics.

        ``prefill.s_per_token`` (absent while unknown), ``prefill.observations``; per tier
        seen: ``<tier>.load_gbps`` and ``<tier>.load_latency_s`` (measured, else the prior),
        ``<tier>.load_measured`` (0 while the prior stands in), ``<tier>.load_gbps.<class>``
        (per size class, named by its lower bound: 0B, 256KiB, 1MiB, ...),
        ``<tier>.load_observations`` (in the window), ``<tier>.load_failures``,
        ``<tier>.inflight_bytes``, ``<tier>.inflight_ops``, ``<tier>.inflight_limit_bytes``;
        decisions: ``plans``, ``plans.<reason>`` (see REASONS), ``blocks.hit``, ``blocks.load``.
        """
        with self._lock:
            now = self.clock()
            d: dict = dict(self._counts)
            d["prefill.observations"] = self._prefill.observations
            if self._prefill.s_per_token is not None:
                d["prefill.s_per_token"] = self._prefill.s_per_token
            for name, t in self._tiers.items():
                m = t.model(now)
                d[f"{name}.load_gbps"] = m.gbps
                d[f"{name}.load_latency_s"] = m.latency
                d[f"{name}.load_measured"] = int(m.measured)
                for label, gbps in m.class_gbps().items():
                    d[f"{name}.load_gbps.{label}"] = gbps
                d[f"{name}.load_observations"] = len(t.obs)
                d[f"{name}.load_failures"] = t.failed
                d[f"{name}.inflight_bytes"] = t.inflight_bytes
                d[f"{name}.inflight_ops"] = t.inflight_ops
                d[f"{name}.inflight_limit_bytes"] = self.config.inflight_limit(name)
        return d
