"""The default: a prefix-aware policy that hands the tier to LRU wherever LRU does better.

No fixed policy wins on all traffic: ``prefix`` lifts the Mooncake conversation
trace far above LRU, and loses to it on traffic whose frequent blocks come back
too late to be worth keeping.  A default must never give fewer hits than plain
LRU, on traffic nobody can know in advance, so ``adaptive`` measures, online,
what two experts would hit on the traffic this tier actually sees:

    experts   ``lru``: plain LRU, the floor;  the candidate: ``prefix`` (recency
              plus learned frequency, leaves before their ancestors, a
              request's tail as a whole) with first-seen blocks stored low
              and weighted by the length of the run of new blocks they came in
    shadows   one :class:`~kvtier.policy.shadow.ShadowCache` per expert, of the
              tier's capacity, keys only, replaying the requests rebuilt from
              the tier's calls: what that expert alone would have hit
    leader    the expert whose order picks the tier's victims

Both experts track the tier's real resident set (every insert, access and
remove goes to both), so a switch takes effect at the next eviction and the
tier's contents converge to the new leader's within about a turnover.  The
rules, checked once a leader has held for ``dwell`` turnovers:

* LRU to candidate: the candidate shadow's lead over the LRU shadow, summed
  over about ``horizon`` turnovers (older requests decay), exceeds ``margin``
  of LRU's hits and the entry bar, ``confidence`` standard deviations of the
  lead itself (one request can be worth dozens of blocks: leads are noisy).
* candidate to LRU: the lead falls as far below zero; or, over the stint, the
  tier's own hits fall behind the LRU shadow's by ``margin`` plus one standard
  deviation.  The second test sees what the shadows cannot: switching costs,
  a call stream misread.  A stint that ended behind LRU doubles the entry bar
  (up to 16 times); one that did not resets it.

So where the candidate is not clearly better the tier is plain LRU, a wrong
lead costs at most one stint's margin, and wrong leads grow rarer.  Before
any evidence the leader is LRU: the candidate has to earn the lead.

The shadows need the tier to see requests: hits and misses, each request from
its first block.  That is true of the top tier.  A tier below another sees
demotions and promotions instead (its misses never reach its policy), so
when fewer than 90% of the rebuilt requests start at pos 0 the tier stays
plain LRU.  (Measured on the conversation trace with a 3M-token host and an
8M-token disk, ``adaptive`` as the disk's policy without this rule gave 0.277
to LRU's 0.313.)

Costs: both experts' bookkeeping twice (real and shadow) and a set of keys per
shadow; no bytes.  On the 276,491 blocks of the Mooncake conversation trace a
replay takes about three times as long as with ``prefix`` alone.
"""
from __future__ import annotations

import math
from typing import Callable

from ..errors import ConfigError
from . import EvictionPolicy, Protected, register_policy
from .lru import LRU
from .prefix import PrefixAware
from .shadow import Request, RequestStream, ShadowCache

LRU_MODE, CANDIDATE_MODE = "lru", "candidate"
ROOTED = 0.9        # the share of rebuilt requests that must start at pos 0 for the shadows to count


def _default_candidate(capacity: int) -> EvictionPolicy:
    """``prefix`` with first-seen blocks stored low (where frequency predicts reuse) and
    classed by the length of their run of new blocks (``tails``)."""
    return PrefixAware(capacity, first_low=True, tails=True)


def _discard(policy: EvictionPolicy, key: bytes) -> None:
    """``key`` left the tier by another expert's choice: forget it as an eviction would."""
    drop = getattr(policy, "discard", None)
    if drop is not None:
        drop(key)
    else:
        policy.remove(key)


@register_policy
class Adaptive(EvictionPolicy):
    name = "adaptive"

    def __init__(self, capacity: int, horizon: float = 4.0, margin: float = 0.01, dwell: float = 1.0,
                 confidence: float = 1.0, candidate: Callable[[int], EvictionPolicy] | None = None):
        super().__init__(capacity)
        for key, value in (("horizon", horizon), ("dwell", dwell), ("confidence", confidence)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"adaptive.{key}", value, "a positive number")
        if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not 0 <= margin < 1:
            raise ConfigError("adaptive.margin", margin, "a number in [0, 1)")
        self.margin = float(margin)
        self.confidence = float(confidence)
        candidate = candidate or _default_candidate
        self._decay_blocks = horizon * capacity
        self._dwell_blocks = dwell * capacity
        # experts over the real resident set, and their shadows
        self._lru = LRU(capacity)
        self._cand = candidate(capacity)
        self._shadow_lru = ShadowCache(LRU(capacity))
        self._shadow_cand = ShadowCache(candidate(capacity))
        self._stream = RequestStream(self._score)
        self.mode = LRU_MODE
        self._leader: EvictionPolicy = self._lru
        self._other: EvictionPolicy = self._cand
        # evidence, decayed over the horizon: LRU shadow hits, and the candidate shadow's lead
        # over it per request (sum and sum of squares: the lead must stand out of its own noise)
        self._s_lru = self._lead = self._lead_sq = 0.0
        # requests seen, and those of them that started at pos 0 (decayed): see _decide
        self._requests = self._rooted = 0.0
        # this stint of the candidate: the tier's own hits minus the LRU shadow's (sum, squares)
        self._stint_lru = self._stint_gain = self._stint_sq = 0.0
        self._entry = self.confidence       # how many sigmas the candidate's lead must reach
        self._since_switch = 0.0
        self.num_switches = 0
        self.num_failed_stints = 0
        self.num_blocks = 0
        self.blocks_led_by_candidate = 0

    # ---- scoring -----------------------------------------------------------------------
    def _score(self, request: Request) -> None:
        n = len(request)
        a = self._shadow_lru.serve(request)
        b = self._shadow_cand.serve(request)
        f = math.exp(-n / self._decay_blocks)
        self._s_lru = self._s_lru * f + a
        self._lead = self._lead * f + (b - a)
        self._lead_sq = self._lead_sq * f + (b - a) ** 2
        self._requests = self._requests * f + 1.0
        self._rooted = self._rooted * f + (request[0][0] == 0)
        if self.mode == CANDIDATE_MODE:
            g = sum(1 for e in request if e[2]) - a
            self._stint_lru += a
            self._stint_gain += g
            self._stint_sq += g * g
            self.blocks_led_by_candidate += n
        self.num_blocks += n
        self._since_switch += n
        if self._since_switch >= self._dwell_blocks:
            self._decide()

    def _decide(self) -> None:
        if self._rooted < ROOTED * self._requests:
            # Requests that do not start at their first block: this tier sees demotions and
            # promotions (it is below another), not requests, and the shadows cannot be trusted.
            if self.mode == CANDIDATE_MODE:
                self._switch(LRU_MODE)
            return
        if self.mode == LRU_MODE:
            if self._lead > self.margin * self._s_lru and self._lead > self._entry * math.sqrt(self._lead_sq):
                self._switch(CANDIDATE_MODE)
            return
        behind = self._stint_gain < -(self.margin * self._stint_lru + math.sqrt(self._stint_sq))
        if self._lead < -max(self.margin * self._s_lru, self.confidence * math.sqrt(self._lead_sq)) or behind:
            # a stint that left the tier behind LRU makes the next one harder to start
            if self._stint_gain < 0:
                self.num_failed_stints += 1
                self._entry = min(2 * self._entry, 16 * self.confidence)
            else:
                self._entry = self.confidence
            self._switch(LRU_MODE)

    def _switch(self, mode: str) -> None:
        self.mode = mode
        self._leader, self._other = (self._cand, self._lru) if mode == CANDIDATE_MODE else (self._lru, self._cand)
        self._since_switch = 0.0
        self._stint_lru = self._stint_gain = self._stint_sq = 0.0
        self.num_switches += 1

    @property
    def shadow_hit_ratios(self) -> dict[str, float]:
        """Hit ratio each expert's shadow scored so far (over the requests seen)."""
        n = max(self.num_blocks, 1)
        return {"lru": self._shadow_lru.num_hits / n, "candidate": self._shadow_cand.num_hits / n}

    # ---- EvictionPolicy -----------------------------------------------------------------
    def admit(self, key: bytes, pos: int = 0) -> bool:
        self._stream.see(key, pos, admitted=True)
        return True

    def insert(self, key: bytes, pos: int = 0) -> None:
        self._stream.inserted(key, pos)
        self._lru.insert(key, pos)
        self._cand.insert(key, pos)

    def access(self, key: bytes, pos: int = 0) -> None:
        if key not in self._lru:
            return
        self._stream.see(key, pos, hit=True)
        self._lru.access(key, pos)
        self._cand.access(key, pos)

    def remove(self, key: bytes) -> None:
        self._lru.remove(key)
        self._cand.remove(key)

    def evict(self, n: int, protected: Protected) -> list[bytes] | None:
        victims = self._leader.evict(n, protected)
        if victims:
            for key in victims:
                _discard(self._other, key)
        return victims

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: bytes) -> bool:
        return key in self._lru
