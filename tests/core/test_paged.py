"""The embedding API end to end: engine pages -> tiers -> engine pages."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kvtier import CacheClosedError, ConfigError, HostConfig, KVTierConfig, Namespace, PagedKVCache

NS = Namespace(model="tiny", block_tokens=16, dtype="bfloat16")


def engine(num_blocks=16, layers=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(num_blocks, 2, 2, 16, 8, generator=g).to(torch.bfloat16) for _ in range(layers)]


def make(kv, blocks=4, **kw):
    bb = sum(t[0].numel() * t.element_size() for t in kv)
    cfg = KVTierConfig(host=HostConfig(capacity_bytes=blocks * max(bb, 4096)), **kw)
    return PagedKVCache.create(cfg, NS, kv)


def test_store_lookup_load_round_trip():
    kv = engine()
    c = make(kv, blocks=8)
    prompt = np.arange(16 * 3 + 5) % 1000                 # 3 full blocks and a partial one
    assert c.store(prompt, [5, 2, 7]) == 3
    assert c.store(prompt, [5, 2, 7]) == 0                # already there
    assert c.lookup(prompt) == 3
    assert c.lookup(np.concatenate([prompt[:16], prompt[:16]])) == 1
    want = [t[[5, 2, 7]].clone() for t in kv]
    for t in kv:
        t[[9, 10, 11]] = 0
    assert c.load(prompt, [9, 10, 11]) == 3
    for t, w in zip(kv, want):
        assert torch.equal(t[[9, 10, 11]].view(torch.int16), w.view(torch.int16))


def test_eviction_keeps_the_newest_and_load_stops_at_the_first_gap():
    kv = engine()
    c = make(kv, blocks=2)
    a = np.arange(32)
    b = np.arange(1000, 1032)
    c.store(a, [0, 1])
    c.store(b, [2, 3])
    assert c.lookup(a) == 0 and c.lookup(b) == 2
    assert c.load(a, [4, 5]) == 0


def test_bad_tensors_rejected_cache_intact():
    kv = engine()
    c = make(kv, blocks=4)
    prompt = np.arange(32)
    c.store(prompt, [0, 1])
    with pytest.raises(ConfigError, match="block_ids"):
        c.store(prompt, [0, 99])
    with pytest.raises(ConfigError, match="block_ids"):
        c.load(prompt, [-1, 0])
    with pytest.raises(ConfigError, match="dtype"):
        PagedKVCache(c.cache, type(c.layout)([t.float() for t in kv]), NS)
    with pytest.raises(ConfigError, match="bytes per block"):
        PagedKVCache(c.cache, type(c.layout)([t[:, :1] for t in kv]), NS)
    with pytest.raises(ConfigError, match="token_ids"):
        c.store("not tokens", [0, 1])
    assert c.lookup(prompt) == 2
    assert c.load(prompt, [2, 3]) == 2
    assert torch.equal(kv[0][2].view(torch.int16), kv[0][0].view(torch.int16))


def test_every_method_raises_after_close():
    """Issue 19: store and lookup after close() answered 1 from a closed cache."""
    from kvtier.errors import KVTierError
    from kvtier import CacheClosedError
    kv = engine()
    c = make(kv, blocks=4)
    prompt = np.arange(32)
    assert c.store(prompt, [0, 1]) == 2
    keys = c.keys(prompt)
    c.close()
    assert c.closed
    calls = {
        "store": lambda: c.store(np.arange(100, 132), [2, 3]),
        "lookup": lambda: c.lookup(prompt),
        "lookup(keys=)": lambda: c.lookup(keys=keys),
        "load": lambda: c.load(prompt, [4, 5]),
        "keys": lambda: c.keys(prompt),
        "stats": lambda: c.stats(),
        "plan": lambda: c.plan(prompt),
    }
    for name, call in calls.items():
        with pytest.raises(CacheClosedError, match="closed") as e:
            call()
        assert isinstance(e.value, KVTierError), name
    c.close()                                  # a second close() is a no-op, like a file's
    with pytest.raises(CacheClosedError):
        c.lookup(prompt)


def test_a_failed_copy_drops_the_store_and_reports_no_load(monkeypatch):
    """Copies go through the asynchronous copier; a failure is a miss or a recompute, never an exception."""
    from kvtier import native
    kv = engine()
    c = make(kv, blocks=8)
    prompt = np.arange(48)
    real = native.copy_spans

    def broken(*a, **k):
        raise OSError("EIO")
    monkeypatch.setattr(native, "copy_spans", broken)
    assert c.store(prompt, [1, 2, 3]) == 0
    assert c.lookup(prompt) == 0                      # dropped: never visible
    monkeypatch.setattr(native, "copy_spans", real)
    assert c.store(prompt, [1, 2, 3]) == 3
    monkeypatch.setattr(native, "copy_spans", broken)
    assert c.load(prompt, [4, 5, 6]) == 0
    monkeypatch.setattr(native, "copy_spans", real)
    assert c.load(prompt, [4, 5, 6]) == 3
    assert c.copier.stats()["failed"] == 2
    c.close()


# ---- load or recompute (kvtier.load_plan) -----------------------------------------------------
def test_plan_before_any_measurement_loads_every_hit_and_load_follows_it():
    kv = engine()
    c = make(kv, blocks=8)
    prompt = np.arange(16 * 3 + 5)
    assert c.plan(prompt).reason == "miss"
    c.store(prompt, [5, 2, 7])
    plan = c.plan(prompt)
    assert (plan.num_blocks, plan.num_hit_blocks, plan.reason) == (3, 3, "load")
    assert plan.block_tokens == 16 and set(plan.tiers) == {"host"}
    assert c.load(prompt, [9, 10, 11], plan=plan) == 3
    assert torch.equal(kv[0][9].view(torch.int16), kv[0][5].view(torch.int16))
    assert c.plan(keys=c.keys(prompt)[:2]).num_blocks == 2
    c.close()


def test_load_takes_no_more_than_the_plan_and_nothing_while_it_waits():
    kv = engine()
    c = make(kv, blocks=8)
    prompt = np.arange(48)
    c.store(prompt, [1, 2, 3])
    full = c.plan(prompt)
    for t in kv:
        t[[9, 10, 11]] = 0
    part = dataclasses.replace(full, num_blocks=2, reason="partial")
    assert c.load(prompt, [9, 10, 11], plan=part) == 2
    assert not kv[0][11].any()                                   # the third block was left to recompute
    waiting = dataclasses.replace(full, wait=True, reason="wait")
    assert c.load(prompt, [9, 10, 11], plan=waiting) == 0
    assert c.load(prompt, [9, 10, 11]) == 3                       # no plan: every hit, as before
    c.close()


def test_a_plan_says_recompute_when_compute_is_cheaper_than_the_copy():
    from kvtier.load_plan import LoadPlanConfig
    kv = engine()
    bb = sum(t[0].numel() * t.element_size() for t in kv)
    cfg = KVTierConfig(host=HostConfig(capacity_bytes=8 * max(bb, 4096)))
    c = PagedKVCache.create(cfg, NS, kv, load_plan=LoadPlanConfig(prefill_s_per_token=1e-12))
    prompt = np.arange(48)
    c.store(prompt, [1, 2, 3])
    plan = c.plan(prompt)
    assert (plan.num_blocks, plan.reason) == (0, "recompute") and plan.hit_recompute_s < plan.hit_load_s
    assert c.load(prompt, [9, 10, 11], plan=plan) == 0
    c.close()


def test_every_load_is_measured_for_the_planner():
    kv = engine()
    c = make(kv, blocks=8)
    prompt = np.arange(48)
    c.store(prompt, [1, 2, 3])
    assert c.planner.stats().get("host.load_observations", 0) == 0
    assert c.load(prompt, [9, 10, 11]) == 3
    s = c.planner.stats()
    assert s["host.load_observations"] == 1 and s["host.load_measured"] == 1
    assert s["host.inflight_bytes"] == 0 and s["host.inflight_ops"] == 0
    c.planner.observe_prefill(1024, 1.0)                          # compute far slower than a copy
    for _ in range(2):
        c.planner.observe_prefill(1024, 1.0)
    assert c.plan(prompt).reason == "load"
    c.close()
    with pytest.raises(CacheClosedError):
        c.plan(prompt)
