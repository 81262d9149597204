"""The embedding API end to end: engine pages -> tiers -> engine pages."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier import ConfigError, HostConfig, KVTierConfig, Namespace, PagedKVCache

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
    }
    for name, call in calls.items():
        with pytest.raises(CacheClosedError, match="closed") as e:
            call()
        assert isinstance(e.value, KVTierError), name
    c.close()                                  # a second close() is a no-op, like a file's
    with pytest.raises(CacheClosedError):
        c.lookup(prompt)
