"""The default policy (``adaptive``): never behind LRU, on any traffic, at any size.

The floor is checked three ways: through the real TieredCache in metadata mode
on every synthetic generator at two capacities; on hand-made adversarial
traffic; and with a candidate expert chosen to be as bad as possible, where
only the guard stands between the tier and a collapse.  The pieces the guard is
built from (the request stream rebuilt from per-block calls, the shadow
caches) are checked against the policy-only simulator.
"""
from __future__ import annotations

from collections import OrderedDict

import pytest

from kvtier.config import HostConfig
from kvtier.errors import ConfigError
from kvtier.policy import EvictionPolicy, make_policy
from kvtier.policy.adaptive import CANDIDATE_MODE, LRU_MODE, Adaptive
from kvtier.policy.lru import LRU
from kvtier.policy.prefix import PrefixAware
from kvtier.policy.shadow import RequestStream, ShadowCache
from kvtier.replay.sim import ReplayConfig, replay, simulate
from kvtier.replay.synthetic import GENERATORS
from kvtier.replay.trace import trace_from_blocks

FLOOR = 0.99


def k(i: int) -> bytes:
    return i.to_bytes(16, "little")


def distinct(trace) -> int:
    return len({h for r in trace.requests for h in r.blocks})


def verify_floor(trace, capacity: int, policy="adaptive") -> tuple[int, int]:
    """Hits of ``policy`` and of LRU holding ``capacity`` blocks; asserts the floor."""
    lru = simulate(trace, "lru", capacity)
    got = simulate(trace, policy, capacity)
    assert got >= FLOOR * lru, (trace.name, capacity, got, lru)
    return got, lru


def test_adaptive_is_the_host_default():
    assert HostConfig().policy == "adaptive"
    assert ReplayConfig((1024,)).policy == "adaptive"
    assert isinstance(make_policy("adaptive", 8), Adaptive)


@pytest.mark.parametrize("kwargs", [{"horizon": 0}, {"horizon": "x"}, {"margin": 1.0}, {"margin": -0.1},
                                    {"dwell": True}])
def test_adaptive_rejects_bad_parameters(kwargs):
    with pytest.raises(ConfigError):
        Adaptive(8, **kwargs)


# ---- the floor, through the real cache ------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.02, 0.1])
@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_never_below_lru_on_synthetic_traffic_through_the_cache(name, fraction):
    """Every generator, two capacities, metadata mode through a TieredCache (the cache's own
    order of calls: hits, then admits, then inserts)."""
    tr = GENERATORS[name](num_requests=1500)
    cap = max(8, int(distinct(tr) * fraction))
    lru = replay(tr, ReplayConfig((cap * 512,), policy="lru")).hits
    got = replay(tr, ReplayConfig((cap * 512,), policy="adaptive")).hits
    assert got >= FLOOR * lru, (name, cap, got, lru)


# ---- adversarial traffic --------------------------------------------------------------------
def _pure_scan():
    return trace_from_blocks("pure-scan", [[10 * i + j for j in range(6)] for i in range(1500)])


def _pure_recency():
    """Each request extends the request just before it, or starts afresh (a stack: LRU is optimal)."""
    chains, nxt = [], 10**6
    for i in range(1500):
        if i % 7 == 0:
            chains.append(list(range(nxt, nxt + 4)))
            nxt += 4
        else:
            chains.append(chains[-1] + [nxt])
            nxt += 1
    return trace_from_blocks("pure-recency", chains)


def _frequency_shift():
    """Prompt set A is used very often for a long time, then never again; set B takes over."""
    chains, u = [], 10**6
    for i in range(2400):
        base = 0 if i < 1200 else 1000
        chains.append([base + 10 * (i % 12) + b for b in range(6)] + [u + i])
    return trace_from_blocks("frequency-shift", chains)


def _frequent_but_late():
    """Hot short-gap chat interleaved with a cycle of documents seen often, each only once per cycle."""
    return GENERATORS["late-reuse"](num_requests=2000, docs=200)


ADVERSARIES = {"pure-scan": _pure_scan, "pure-recency": _pure_recency, "frequency-shift": _frequency_shift,
               "frequent-but-late": _frequent_but_late}


@pytest.mark.parametrize("fraction", [0.03, 0.1, 0.3])
@pytest.mark.parametrize("name", sorted(ADVERSARIES))
def test_never_below_lru_on_adversarial_traffic(name, fraction):
    tr = ADVERSARIES[name]()
    verify_floor(tr, max(8, int(distinct(tr) * fraction)))


def test_pure_scan_hits_nothing_and_pure_recency_matches_lru():
    scan = _pure_scan()
    assert simulate(scan, "adaptive", 100) == simulate(scan, "lru", 100) == 0
    rec = _pure_recency()
    got, lru = verify_floor(rec, 60)
    assert got >= lru


class _MRU(EvictionPolicy):
    """A deliberately bad expert: evicts the most recently used block first."""
    name = "test-mru"

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def insert(self, key, pos=0):
        self._order[key] = None
        self._order.move_to_end(key)

    def access(self, key, pos=0):
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key):
        self._order.pop(key, None)

    def evict(self, n, protected):
        victims = [key for key in reversed(self._order) if not protected(key)][:n]
        if len(victims) < n:
            return None
        for key in victims:
            del self._order[key]
        return victims

    def __len__(self):
        return len(self._order)

    def __contains__(self, key):
        return key in self._order


@pytest.mark.parametrize("name", ["rag", "chat", "tenants"])
def test_the_guard_holds_the_floor_even_with_a_terrible_candidate(name):
    """With MRU as the candidate, the shadows must keep the tier on LRU nearly all the time."""
    tr = GENERATORS[name](num_requests=1500)
    cap = max(8, int(distinct(tr) * 0.05))
    made = []

    def factory(c):
        made.append(Adaptive(c, candidate=_MRU))
        return made[-1]
    got, lru = verify_floor(tr, cap, factory)
    assert simulate(tr, _MRU, cap) < 0.9 * lru            # the candidate alone would lose badly
    assert made[0].mode == LRU_MODE and made[0].blocks_led_by_candidate < 0.15 * made[0].num_blocks


def test_follows_the_candidate_where_it_wins_and_lru_where_it_loses():
    rag = GENERATORS["rag"](num_requests=2000)
    made = []
    simulate(rag, lambda c: made.append(Adaptive(c)) or made[-1], int(distinct(rag) * 0.05))
    assert made[-1].mode == CANDIDATE_MODE
    assert made[-1].blocks_led_by_candidate > 0.8 * made[-1].num_blocks
    late = GENERATORS["late-reuse"](num_requests=4000)
    cap = int(distinct(late) * 0.1)
    assert simulate(late, "prefix", cap) < 0.95 * simulate(late, "lru", cap)   # frequency misleads here
    simulate(late, lambda c: made.append(Adaptive(c)) or made[-1], cap)
    assert made[-1].mode == LRU_MODE
    ratios = made[-1].shadow_hit_ratios
    assert ratios["lru"] > ratios["candidate"]


# ---- the pieces -------------------------------------------------------------------------------
def test_request_stream_rebuilds_requests_from_cache_and_simulator_call_orders():
    got = []
    s = RequestStream(got.append, window=1)
    # the cache: hits (access), then admits, then inserts of the admitted keys
    for pos in range(3):
        s.see(k(pos), pos, hit=True)
    for pos in range(3, 5):
        s.see(k(pos), pos, admitted=True)
    for pos in range(3, 5):
        s.inserted(k(pos), pos)             # the insert after its admit: not a new reference
    assert got == []
    # the simulator: admit and insert block by block; the next request starts at pos 0
    for pos in range(2):
        s.see(k(10 + pos), pos, admitted=True)
        s.inserted(k(10 + pos), pos)
    assert got == [[(p, k(p), p < 3) for p in range(5)]]      # one newer request: handed over
    s.see(k(0), 0, hit=True)
    s.flush()
    assert got[1:] == [[(0, k(10), False), (1, k(11), False)], [(0, k(0), True)]]
    s.flush()
    assert len(got) == 3


def test_request_stream_joins_the_batches_of_interleaved_requests():
    """Engine order: A's hits, B's hits, a promotion of A's (insert without admit), B's admits,
    A's admits, then the inserts of both."""
    got = []
    s = RequestStream(got.append)
    a, b = [k(100 + i) for i in range(6)], [k(200 + i) for i in range(4)]
    for pos in range(2):
        s.see(a[pos], pos, hit=True)
    s.see(b[0], 0, hit=True)
    s.inserted(a[2], 2)                    # promoted from below: a reference
    for pos in range(1, 4):
        s.see(b[pos], pos, admitted=True)
    for pos in range(3, 6):
        s.see(a[pos], pos, admitted=True)
    for key, pos in [(b[1], 1), (a[3], 3), (b[2], 2), (a[4], 4), (b[3], 3), (a[5], 5)]:
        s.inserted(key, pos)
    s.flush()
    assert [[e[1] for e in r] for r in got] == [a, b]
    assert [sum(e[2] for e in r) for r in got] == [2, 1]


def test_shadow_caches_score_what_the_simulator_scores():
    """Fed whole requests, a shadow of a policy hits exactly what that policy hits alone."""
    tr = GENERATORS["rag"](num_requests=800)
    for cls, name in ((LRU, "lru"), (PrefixAware, "prefix")):
        shadow = ShadowCache(cls(120))
        for r in tr.requests:
            if r.blocks:
                shadow.serve([(pos, h, False) for pos, h in enumerate(r.blocks)])
        assert shadow.num_hits == simulate(tr, name, 120)
        assert len(shadow) <= 120


def test_shadows_stop_counting_at_a_hole():
    shadow = ShadowCache(LRU(8))
    shadow.serve([(0, k(1), False), (1, k(2), False), (2, k(3), False)])
    assert shadow.serve([(0, k(1), False), (2, k(3), False)]) == 1   # pos 1 is missing: k(3) cannot count


def test_discarded_blocks_leave_like_evicted_ones():
    pol = PrefixAware(4)
    for i in range(3):
        pol.insert(k(i), i)
    pol.access(k(1), 1)
    pol.discard(k(1))
    pol.discard(k(99))                                     # unknown: no-op
    assert k(1) not in pol and len(pol) == 2
    assert sorted(pol.evict(2, lambda key: False)) == [k(0), k(2)]
    assert pol.evict(1, lambda key: False) is None        # no stale entry of k(1) comes back


def test_first_low_changes_nothing_where_frequency_says_nothing():
    tr = GENERATORS["chat"](num_requests=1500)
    for cap in (60, 300):
        plain = simulate(tr, "prefix", cap)
        low = simulate(tr, lambda c: PrefixAware(c, first_low=True), cap)
        assert abs(low - plain) <= 0.01 * plain
    with pytest.raises(ConfigError):
        PrefixAware(8, first_low="yes")


def test_below_another_tier_it_stays_lru():
    """A lower tier sees demotions and promotions, not requests: the shadows cannot judge there,
    and ``adaptive`` as the disk's policy must give exactly what LRU gives."""
    tr = GENERATORS["rag"](num_requests=1500)
    caps = (100 * 512, 600 * 512)
    lru = replay(tr, ReplayConfig(caps, lower_policy="lru"))
    ada = replay(tr, ReplayConfig(caps, lower_policy="adaptive"))
    assert ada.hit_blocks == lru.hit_blocks and lru.hit_blocks["disk"] > 0


def test_requests_that_do_not_start_at_their_first_block_keep_it_lru():
    """The same traffic with every request's first block cut off (as a tier below another sees
    it): the candidate would win, but the shadows are not trusted."""
    tr = GENERATORS["rag"](num_requests=2000)
    cap = int(distinct(tr) * 0.05)
    pol = Adaptive(cap)
    resident: set[bytes] = set()
    for r in tr.requests:
        keys = [k(h) for h in r.blocks]
        for pos, key in enumerate(keys[1:], 1):
            if key in resident:
                pol.access(key, pos)
                continue
            pol.admit(key, pos)
            if len(resident) >= cap:
                resident.difference_update(pol.evict(1, set(keys).__contains__))
            pol.insert(key, pos)
            resident.add(key)
    assert pol.num_switches == 0 and pol.mode == LRU_MODE
