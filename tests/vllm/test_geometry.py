"""Geometry, rank slices and rank accounting of the connector, without an engine.

Real vLLM KV cache spec classes, a stand-in for VllmConfig, CPU tensors and a
real shared arena: what each tensor-parallel rank and each KV cache group
copies, and when the scheduler side may call an op complete.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kvtier.errors import ConfigError

pytestmark = pytest.mark.vllm

BT = 32


def _spec(kind="full", heads=2, head=16, window=64):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, SlidingWindowSpec
    common = dict(block_size=BT, num_kv_heads=heads, head_size=head, dtype=torch.float32)
    if kind == "full":
        return FullAttentionSpec(**common)
    if kind == "sliding":
        return SlidingWindowSpec(**common, sliding_window=window)
    return MambaSpec(block_size=BT, shapes=((4, 8),), dtypes=(torch.float32,))


def _kv_config(*specs, layers=2):
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
    groups = [KVCacheGroupSpec([f"g{i}.l{j}" for j in range(layers)], s) for i, s in enumerate(specs)]
    return KVCacheConfig(num_blocks=16, kv_cache_tensors=[], kv_cache_groups=groups)


def _vllm_config(tp=1, pp=1, load_policy="recompute"):
    return SimpleNamespace(
        parallel_config=SimpleNamespace(pipeline_parallel_size=pp, tensor_parallel_size=tp,
                                        decode_context_parallel_size=1, prefill_context_parallel_size=1),
        cache_config=SimpleNamespace(enable_prefix_caching=True, kv_cache_layout=None,
                                     prefix_caching_hash_algo="sha256", cache_dtype="auto"),
        kv_transfer_config=SimpleNamespace(kv_load_failure_policy=load_policy),
        attention_config=SimpleNamespace(backend=None),
        model_config=SimpleNamespace(model="m", revision=None))


def _geometry(*specs, tp=1, load_mode="async", **kw):
    from kvtier.integrations.vllm.geometry import engine_geometry
    from kvtier.integrations.vllm.options import ConnectorOptions
    opts = ConnectorOptions.from_extra_config({"host": {"capacity_bytes": "1MiB"}, "load_mode": load_mode})
    return engine_geometry(_vllm_config(tp=tp, **kw), _kv_config(*specs), opts)


def test_hybrid_geometry_lays_groups_and_ranks_out_in_one_slot():
    g = _geometry(_spec("sliding"), _spec("full"), tp=2)
    page = 2 * BT * 2 * 16 * 4                     # K and V, 2 heads, 16 dims, float32
    assert [x.kind for x in g.groups] == ["sliding", "full"]
    assert g.groups[0].window == 64
    assert g.rank_bytes == 2 * 2 * page and g.block_bytes == 2 * g.rank_bytes
    assert g.group_offset(1) == 2 * page
    assert g.namespace.tp_size == 2


def test_namespace_differs_by_tp_size_and_group_layout():
    a = _geometry(_spec("full"), tp=1).namespace
    b = _geometry(_spec("full"), tp=2).namespace
    c = _geometry(_spec("sliding"), _spec("full")).namespace
    d = _geometry(_spec("sliding", window=128), _spec("full")).namespace
    assert len({a.salt, b.salt, c.salt, d.salt}) == 4


@pytest.mark.parametrize("kw, key", [
    (dict(pp=2), "pipeline_parallel_size"),
    (dict(load_policy="fail"), "kv_transfer_config.kv_load_failure_policy"),
])
def test_unsupported_parallel_layouts_name_the_setting(kw, key):
    with pytest.raises(ConfigError) as e:
        _geometry(_spec("full"), **kw)
    assert e.value.key == key


def test_mamba_group_is_refused_naming_the_spec():
    with pytest.raises(ConfigError) as e:
        _geometry(_spec("full"), _spec("mamba"))
    assert e.value.key == "kv_cache_groups[1].kv_cache_spec" and "MambaSpec" in str(e.value)


def test_hybrid_model_needs_async_loads():
    with pytest.raises(ConfigError) as e:
        _geometry(_spec("sliding"), _spec("full"), load_mode="sync")
    assert e.value.key == "kv_connector_extra_config.load_mode"
    assert _geometry(_spec("full"), load_mode="sync").groups[0].kind == "full"


def test_groups_with_other_block_sizes_are_refused():
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    other = FullAttentionSpec(block_size=2 * BT, num_kv_heads=2, head_size=16, dtype=torch.float32)
    with pytest.raises(ConfigError) as e:
        _geometry(_spec("sliding"), other)
    assert e.value.key == "kv_cache_groups[1].block_size"


# ---- workers: each rank its slice, each group its pages ----------------------------------
def _tensors(geo, rank: int, num_blocks=16):
    """Per-rank KV tensors (vLLM CPU layout [2, blocks, heads, block, head]) with recognisable bytes."""
    out = {}
    for g in geo.groups:
        for j, name in enumerate(g.layer_names):
            t = torch.empty((2, num_blocks, 2, BT, 16), dtype=torch.float32)
            t.copy_(torch.arange(t.numel(), dtype=torch.float32).reshape(t.shape) * (rank + 1) + 1000 * j + 7 * g.index)
            out[name] = t
    return out


def _arena(tmp_path, geo, slots=8):
    from kvtier.integrations.vllm.metadata import ArenaInfo
    from kvtier.integrations.vllm.shm import SharedArena
    path = str(tmp_path / "arena")
    arena = SharedArena.create(path, slots * geo.block_bytes)
    return arena, ArenaInfo(path, arena.nbytes, geo.block_bytes)


def _worker(geo, rank, kv):
    from kvtier.integrations.vllm.worker import KVTierWorker
    w = KVTierWorker(geo, 16, rank=rank)
    w.register_kv_caches(kv)
    return w


def test_tp_ranks_write_disjoint_slices_and_read_back_their_own(tmp_path):
    from kvtier.integrations.vllm.metadata import KVTierConnectorMetadata, LoadOp, StoreOp
    geo = _geometry(_spec("sliding"), _spec("full"), tp=2)
    arena, info = _arena(tmp_path, geo)
    kvs = [_tensors(geo, r) for r in (0, 1)]
    workers = [_worker(geo, r, kvs[r]) for r in (0, 1)]
    # Position 0: the sliding group holds no page (-1); positions 1, 2 hold both groups.
    store = StoreOp(1, "r", [[-1, 4, 5], [3, 4, 5]], [0, 1, 2])
    for w in workers:
        w.wait_for_save(KVTierConnectorMetadata(arena=info, stores=[store]))
    results = [_settle(w) for w in workers]
    slot = geo.block_bytes
    raw = arena.array
    for r in (0, 1):
        lo = 1 * slot + r * geo.rank_bytes                       # slot 1, rank r's slice
        full_page = kvs[r]["g1.l0"][:, 4].contiguous().view(torch.uint8).numpy().ravel()
        off = lo + geo.group_offset(1)
        assert np.array_equal(raw[off:off + full_page.size], full_page)
    assert not raw[:geo.group_offset(1)].any()                  # slot 0, rank 0: the sliding page was skipped
    assert [r.store_results for r in results] == [{1: {0: True}}, {1: {1: True}}]
    assert results[0].attached == {0} and results[1].attached == {1}

    # Load slot 1 into other engine blocks, on both ranks: each gets its own bytes back.
    for r, w in enumerate(workers):
        w.start_load_kv(KVTierConnectorMetadata(loads=[LoadOp(2, "q", [[9], [10]], [1], [], True)]))
        _settle(w)
        assert torch.equal(kvs[r]["g0.l1"][:, 9], kvs[r]["g0.l1"][:, 4])
        assert torch.equal(kvs[r]["g1.l0"][:, 10], kvs[r]["g1.l0"][:, 4])
    for w in workers:
        w.shutdown()
    arena.unlink()
    arena.close()


def _settle(w, timeout: float = 10.0):
    """Wait for a worker's copies to finish; everything it has reported since, merged."""
    import time
    from kvtier.integrations.vllm.metadata import KVTierWorkerMetadata
    out = KVTierWorkerMetadata()
    end = time.monotonic() + timeout
    while True:
        w.get_finished()
        r = w.take_results()
        if r is not None:
            out = out.aggregate(r)
        if w.pending() == 0:
            return out
        assert time.monotonic() < end, "copies never finished"
        time.sleep(0.005)


def test_a_failed_load_of_a_hybrid_model_fails_the_request_not_blocks(tmp_path):
    """vLLM maps block-level load errors to requests only for one group: hybrid loads fail per request."""
    from kvtier.integrations.vllm.metadata import KVTierConnectorMetadata, LoadOp
    geo = _geometry(_spec("sliding"), _spec("full"))
    arena, info = _arena(tmp_path, geo)
    w = _worker(geo, 0, _tensors(geo, 0))
    w.start_load_kv(KVTierConnectorMetadata(arena=info, loads=[LoadOp(1, "q", [[2], [3]], [0], [4, 5], True)]))
    _settle(w)
    assert w.take_load_errors() == set()
    assert w.take_failed_requests() == {"q"}
    single = _geometry(_spec("full"))
    w1 = _worker(single, 0, _tensors(single, 0))
    w1.start_load_kv(KVTierConnectorMetadata(arena=info, loads=[LoadOp(1, "q", [[2]], [0], [4], True)]))
    _settle(w1)
    assert w1.take_load_errors() == {4} and w1.take_failed_requests() == set()
    for x in (w, w1):
        x.shutdown()
    arena.unlink()
    arena.close()


def test_worker_refuses_a_rank_outside_the_tp_size():
    from kvtier.integrations.vllm.worker import KVTierWorker
    with pytest.raises(ConfigError):
        KVTierWorker(_geometry(_spec("full"), tp=2), 16, rank=2)


def test_worker_results_aggregate_per_rank():
    from kvtier.integrations.vllm.metadata import KVTierWorkerMetadata
    a, b = KVTierWorkerMetadata(), KVTierWorkerMetadata()
    a.report("store", 7, 0, True)
    b.report("store", 7, 1, False)
    b.report("load", 3, 1, True)
    m = a.aggregate(b)
    assert m.store_results == {7: {0: True, 1: False}} and m.load_results == {3: {1: True}}


def test_an_op_completes_only_when_every_rank_has_reported():
    from kvtier.integrations.vllm.metadata import RankTally
    tally = RankTally(2)
    assert tally.add({5: {0: True}}) == []                   # rank 1 still copying
    assert tally.add({6: {0: True, 1: True}}) == [(6, True)]
    assert tally.add({5: {1: False}}) == [(5, False)]        # one rank failed: failed for all
    assert len(tally) == 0


def test_a_hybrid_request_with_lost_blocks_is_reported_once_with_nothing_copied(tmp_path):
    """Blocks lost before the load (a failed promotion): the request recomputes whole, so
    nothing is copied and vLLM hears finished + failed once, in the same step."""
    from kvtier.integrations.vllm.metadata import KVTierConnectorMetadata, LoadOp
    geo = _geometry(_spec("sliding"), _spec("full"))
    arena, info = _arena(tmp_path, geo)
    kv = _tensors(geo, 0)
    before = kv["g1.l0"][:, 3].clone()
    arena.array[:] = 0x77
    w = _worker(geo, 0, kv)
    w.start_load_kv(KVTierConnectorMetadata(arena=info, loads=[LoadOp(1, "q", [[2], [3]], [0], [4, 5], True)]))
    assert w.get_finished() == (None, {"q"}) and w.take_failed_requests() == {"q"}
    assert w.pending() == 0 and torch.equal(kv["g1.l0"][:, 3], before)
    assert w.get_finished() == (None, None) and w.take_failed_requests() == set()
    w.shutdown()
    arena.unlink()
    arena.close()
