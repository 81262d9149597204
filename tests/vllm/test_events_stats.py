"""Connector events, stats and worker metadata, without an engine."""
from __future__ import annotations

import pytest

from kvtier import TieredCache
from kvtier.tiers.host import HostTier

pytestmark = pytest.mark.vllm

BB = 4096


def _key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def _store(cache, keys):
    h = cache.prepare_store(keys, owner="t")
    assert h is not None
    for v in h.views:
        v[:] = b"\x01" * BB
    assert cache.complete_store(h, True)


def test_eviction_becomes_block_removed_with_vllm_hashes():
    from vllm.distributed.kv_events import BlockRemoved, BlockStored
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash
    from kvtier.integrations.vllm.events import EventLog, TierRecords

    records = TierRecords()
    cache = TieredCache([HostTier("host", BB, 2, memory="pageable")], "lru", listeners=[records])
    log = EventLog(block_tokens=32, max_keys=16)
    keys, hashes = [_key(i) for i in range(3)], [bytes([i]) * 32 for i in range(3)]
    ext = [maybe_convert_block_hash(h) for h in hashes]      # what vLLM publishes
    log.remember(keys, hashes)
    _store(cache, keys[:2])
    log.stored(hashes[:2], None, list(range(64)))
    _store(cache, keys[2:])                     # no room: the least recently used block goes
    log.add_records(records.take())
    events = log.take()
    assert isinstance(events[0], BlockStored) and events[0].block_hashes == ext[:2]
    removed = [e for e in events if isinstance(e, BlockRemoved)]
    assert [e.block_hashes for e in removed] == [[ext[0]]]
    assert removed[0].medium == "CPU"
    assert log.take() == []                     # taken once
    cache.close()


def test_unknown_keys_make_no_events():
    from kvtier.integrations.vllm.events import EventLog, TierRecords

    records = TierRecords()
    cache = TieredCache([HostTier("host", BB, 1, memory="pageable")], "lru")
    cache.add_listener(records)
    log = EventLog(block_tokens=32, max_keys=4)
    _store(cache, [_key(1)])
    _store(cache, [_key(2)])
    log.add_records(records.take())
    assert log.take() == []
    cache.close()


def test_stats_aggregate_reduce_and_take():
    from kvtier.integrations.vllm.stats import KVTierConnectorStats

    a, b = KVTierConnectorStats(), KVTierConnectorStats()
    assert a.is_empty() and a.take() is None
    a.add("lookup_blocks", 10)
    a.add("hit_blocks", 4)
    b.add("load_bytes", 2e9)
    b.add("load_seconds", 1.0)
    c = a.aggregate(b)
    r = c.reduce()
    assert r["hit_rate"] == 0.4 and r["load_gbps"] == 2.0
    taken = c.take()
    assert taken.data["lookup_blocks"] == 10 and c.is_empty()


def test_worker_metadata_aggregate_keeps_every_ranks_result():
    """Results are kept per rank, so the scheduler side can wait for every rank (RankTally)."""
    from kvtier.integrations.vllm.metadata import KVTierWorkerMetadata, RankTally

    a = KVTierWorkerMetadata({1: {0: True}, 2: {0: True}}, {5: {0: True}}, attached={0})
    b = KVTierWorkerMetadata({1: {1: False}}, {5: {1: True}, 6: {1: False}}, attached={1})
    m = a.aggregate(b)
    assert m.load_results == {1: {0: True, 1: False}, 2: {0: True}}
    assert m.store_results == {5: {0: True, 1: True}, 6: {1: False}}
    assert m.attached == {0, 1}
    tally = RankTally(2)
    assert sorted(tally.add(m.load_results)) == [(1, False)]      # op 2 still waits for rank 1
    assert sorted(tally.add(m.store_results)) == [(5, True)]


def test_prometheus_counters_follow_observed_stats():
    from types import SimpleNamespace

    from prometheus_client import REGISTRY, Counter, Gauge, Histogram
    from kvtier.integrations.vllm.stats import KVTierPromMetrics

    prom = KVTierPromMetrics(SimpleNamespace(kv_transfer_config=None),
                             {Gauge: Gauge, Counter: Counter, Histogram: Histogram},
                             ["model_name", "engine"], {0: ["m", "0"]})
    prom.observe({"hit_blocks": 3, "load_bytes": 4096}, engine_idx=0)
    prom.observe({"hit_blocks": 2}, engine_idx=0)
    labels = {"model_name": "m", "engine": "0"}
    assert REGISTRY.get_sample_value("vllm:kvtier_hit_blocks_total", labels) == 5
    assert REGISTRY.get_sample_value("vllm:kvtier_load_bytes_total", labels) == 4096
    prom.observe({"plan_disk_load_gbps": 1.5, "plan_prefill_s_per_token": 2e-4}, engine_idx=0)
    prom.observe({"plan_disk_load_gbps": 0.25}, engine_idx=0)
    assert REGISTRY.get_sample_value("vllm:kvtier_plan_disk_load_gbps", labels) == 0.25
    assert REGISTRY.get_sample_value("vllm:kvtier_plan_prefill_s_per_token", labels) == 2e-4


def test_load_plan_measurements_travel_as_gauges():
    """Counters add up across workers and intervals; the plan's measurements are the latest value."""
    from kvtier.integrations.vllm.stats import KVTierConnectorStats, plan_gauges
    from kvtier.load_plan import LoadPlanner

    planner = LoadPlanner()
    for _ in range(3):
        planner.observe_prefill(1000, 0.5)
    planner.observe("disk", 1 << 20, 0.01)
    g = plan_gauges(planner.stats())
    assert g["plan_prefill_s_per_token"] == pytest.approx(5e-4)
    assert "plan_disk_load_gbps" in g and "plan_remote_load_gbps" not in g
    a = KVTierConnectorStats(data={"hit_blocks": 2})
    a.set_gauges({"plan_disk_load_gbps": 1.0, "not_a_gauge": 7})
    b = KVTierConnectorStats(data={"hit_blocks": 3})
    b.set_gauges({"plan_disk_load_gbps": 0.5})
    a.aggregate(b)
    assert a.data["hit_blocks"] == 5 and a.data["plan_disk_load_gbps"] == 0.5 and "not_a_gauge" not in a.data
    assert a.reduce()["plan_disk_load_gbps"] == 0.5
