"""Connector settings: every mistake is a ConfigError naming the key (no engine needed)."""
from __future__ import annotations

import importlib.util

import pytest

from kvtier.errors import ConfigError

pytestmark = pytest.mark.vllm


def _opts(extra):
    from kvtier.integrations.vllm.options import ConnectorOptions
    return ConnectorOptions.from_extra_config(extra)


def test_defaults():
    o = _opts({})
    assert o.load_mode == "auto" and not o.is_async and o.inline_load_bytes == 256 << 20
    assert o.cache.host.capacity_bytes == 1 << 30 and o.cache.disk is None


def test_load_plan_settings_and_off():
    from kvtier.load_plan import LoadPlanConfig
    assert _opts({"load_plan": {"margin": 1.5}}).load_plan == LoadPlanConfig(margin=1.5)
    assert _opts({}).load_plan == LoadPlanConfig()
    assert _opts({"load_plan": False}).load_plan is False


def test_inline_cache_sections_are_parsed():
    o = _opts({"load_mode": "sync", "host": {"capacity_bytes": "64MiB"}, "lease_timeout_s": 5})
    assert not o.is_async and o.cache.host.capacity_bytes == 64 << 20 and o.cache.lease_timeout_s == 5


@pytest.mark.parametrize("extra, key", [
    ({"no_such": 1}, "kv_connector_extra_config.no_such"),
    ({"load_mode": "later"}, "kv_connector_extra_config.load_mode"),
    ({"load_timeout_s": 0}, "kv_connector_extra_config.load_timeout_s"),
    ({"tenant": ""}, "kv_connector_extra_config.tenant"),
    ({"min_load_blocks": 0}, "kv_connector_extra_config.min_load_blocks"),
    ({"inline_load_bytes": "lots"}, "kv_connector_extra_config.inline_load_bytes"),
    ({"inline_load_bytes": -1}, "kv_connector_extra_config.inline_load_bytes"),
    ({"load_plan": {"margin": 0.5}}, "kv_connector_extra_config.load_plan.margin"),
    ({"load_plan": {"marginn": 2}}, "kv_connector_extra_config.load_plan.marginn"),
    ({"load_plan": "fast"}, "kv_connector_extra_config.load_plan"),
    ({"host": {"capacity_bytes": "lots"}}, "kv_connector_extra_config.host.capacity_bytes"),
    ({"host": {"capacity": 1}}, "kv_connector_extra_config.host.capacity"),
    ({"disk": {"capacity_bytes": "1GiB"}}, "kv_connector_extra_config.disk.path"),
    ({"gpu": {"capacity_bytes": "1GiB"}}, "kv_connector_extra_config.gpu"),
    ({"config_file": "/nonexistent/kvtier.yaml"}, "config file"),
])
def test_bad_settings_name_the_key(extra, key):
    with pytest.raises(ConfigError) as e:
        _opts(extra)
    assert e.value.key == key
    assert key in str(e.value)


def test_missing_optional_dependency_names_the_extra(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lmdb" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        _opts({"disk": {"path": str(tmp_path)}})
    assert e.value.key == "kv_connector_extra_config.disk"
    assert "kvtier[disk]" in str(e.value)


def test_host_capacity_below_one_block_is_refused():
    from kvtier.integrations.vllm.shm import host_geometry
    o = _opts({"host": {"capacity_bytes": 4096}})
    with pytest.raises(ConfigError) as e:
        host_geometry(o.cache, block_bytes=32768)
    assert e.value.key == "kv_connector_extra_config.host.capacity_bytes"
    assert host_geometry(_opts({"host": {"capacity_bytes": 1 << 20}}).cache, 32768) == (32768, 32)


def test_shared_arena_is_one_memory_for_two_mappings(tmp_path, monkeypatch):
    from kvtier.integrations.vllm import shm
    path = str(tmp_path / "arena")
    a = shm.SharedArena.create(path, 1 << 16)
    b = shm.SharedArena.attach(path, 1 << 16)
    a.array[100:104] = [1, 2, 3, 4]
    assert list(b.array[100:104]) == [1, 2, 3, 4]
    with pytest.raises(Exception):
        shm.SharedArena.attach(path, 1 << 17)
    a.unlink()
    b.array[0] = 9                      # still mapped after unlink
    assert a.array[0] == 9
    a.close()
    b.close()


def test_host_arena_larger_than_free_shared_memory_is_refused(tmp_path):
    from kvtier.integrations.vllm import shm
    with pytest.raises(ConfigError) as e:
        shm.SharedArena.create(str(tmp_path / "arena"), 1 << 60, key="kv_connector_extra_config.host.capacity_bytes")
    assert e.value.key == "kv_connector_extra_config.host.capacity_bytes"
    assert not (tmp_path / "arena").exists()


def _geometry(page_shape=(2, 32, 64), dtype="float32", layers=2):
    from kvtier.integrations.vllm.geometry import FULL, EngineGeometry, GroupGeometry
    from kvtier.keys import Namespace
    ns = Namespace(model="m", block_tokens=32, dtype=dtype, layout="vllm/cpu/auto/LBHNC",
                   page_shape=page_shape)
    item = 4 if dtype == "float32" else 2
    page = page_shape[0] * page_shape[1] * page_shape[2] * item
    group = GroupGeometry(0, FULL, tuple(f"l{i}" for i in range(layers)), page, page_shape, dtype)
    return EngineGeometry(ns, 32, (group,))


@pytest.mark.parametrize("shape, dtype, ok", [
    ((8, 2, 32, 64), "float32", True),
    ((8, 2, 32, 64), "bfloat16", False),      # same shape, other dtype
    ((8, 2, 16, 64), "float32", False),       # smaller pages
])
def test_worker_refuses_tensors_that_do_not_match_the_namespace(shape, dtype, ok):
    import torch
    from kvtier.layout import BlockLayout
    layout = BlockLayout([torch.zeros(shape, dtype=getattr(torch, dtype)) for _ in range(2)])
    g = _geometry()
    if ok:
        g.check_group(0, layout)
    else:
        with pytest.raises(ConfigError):
            g.check_group(0, layout)


def test_layout_and_page_shape_are_part_of_every_key():
    from kvtier.keys import Namespace, salt_hashes
    h = [b"\x01" * 32]
    a = Namespace(model="m", block_tokens=32, dtype="float32", layout="vllm/cpu/auto/LBHNC", page_shape=(2, 32, 64))
    b = Namespace(model="m", block_tokens=32, dtype="float32", layout="vllm/cpu/auto/LBNHC", page_shape=(2, 32, 64))
    c = Namespace(model="m", block_tokens=32, dtype="float32", layout="vllm/cpu/auto/LBHNC", page_shape=(4, 32, 32))
    assert len({salt_hashes(ns, h)[0] for ns in (a, b, c)}) == 3


def test_shared_cache_round_trip_through_the_arena(tmp_path):
    """The scheduler's cache and a worker-side mapping see the same slot bytes."""
    from kvtier.config import KVTierConfig
    from kvtier.keys import Namespace
    from kvtier.integrations.vllm import shm

    path = str(tmp_path / "arena")
    cfg = KVTierConfig.from_dict({"host": {"capacity_bytes": 8 * 8192}})
    ns = Namespace(model="m", block_tokens=32)
    cache, arena = shm.build_shared_cache(cfg, ns, 8192, path)
    host = cache.tiers[0]
    assert host.num_slots == 8 and host.addresses([0])[0] == arena.base
    worker = shm.SharedArena.attach(path, arena.nbytes)
    keys = [bytes([i]) * 16 for i in range(3)]
    h = cache.prepare_store(keys, owner="w")
    for i, slot in enumerate(h.slots):          # the worker writes through its own mapping
        worker.array[slot * host.slot_bytes:slot * host.slot_bytes + 8192] = i + 1
    cache.complete_store(h, True)
    assert cache.lookup(keys).num_blocks == 3
    ld = cache.prepare_load(keys, owner="r")
    assert ld.ready() and ld.num_ok == 3
    assert [bytes(v[:4]) for v in ld.views] == [bytes([i + 1]) * 4 for i in range(3)]
    cache.complete_load(ld)
    cache.close()
    arena.unlink()
    arena.close()
    worker.close()
    assert not (tmp_path / "arena").exists()
