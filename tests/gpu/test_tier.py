"""GpuTier alone and as tiers[0] of a TieredCache above host memory.

On machines without CUDA the pool lives on the CPU (device="cpu") and the very
same tier, cache and copy paths run; tests marked ``gpu`` repeat the stack on
a CUDA device.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier.bench.kv_layouts import ModelShape, make_kv
from kvtier.gpu import torch_ref
from kvtier.cache import TieredCache
from kvtier.config import GpuConfig, KVTierConfig
from kvtier.errors import ConfigError, KVTierError
from kvtier.gpu.copier import KVCopier
from kvtier.keys import Namespace
from kvtier.layout import BlockLayout
from kvtier.paged import PagedKVCache
from kvtier.tiers.gpu import SLOT_ALIGN, GpuTier
from kvtier.tiers.host import HostTier

POISON = 0xA5
SHAPE = ModelShape(num_layers=2, num_kv_heads=2, head_dim=8)


def rand_bytes(rng, n) -> bytearray:
    return bytearray(rng.integers(0, 256, n, dtype=np.uint8).tobytes())


# ---- the tier alone ---------------------------------------------------------------

def test_write_read_round_trip_cpu():
    rng = np.random.default_rng(0)
    tier = GpuTier("gpu", 1000, 4, device="cpu")
    blocks = [rand_bytes(rng, 1000) for _ in range(3)]
    blocks[1] = bytes(blocks[1])                       # read-only sources are fine
    assert tier.write([b"a", b"b", b"c"], [2, 0, 3], [memoryview(b) for b in blocks]) == [True] * 3
    outs = [bytearray([POISON]) * 1000 for _ in range(3)]
    assert tier.read([b"c", b"a", b"b"], [3, 2, 0], [memoryview(o) for o in outs]) == [True] * 3
    assert [bytes(o) for o in outs] == [bytes(blocks[2]), bytes(blocks[0]), bytes(blocks[1])]
    assert bytes(tier.view(2)) == bytes(blocks[0])


def test_a_batch_of_slots_moves_in_one_transfer():
    rng = np.random.default_rng(1)
    tier = GpuTier("gpu", 3000, 8, device="cpu")
    staging = np.frombuffer(rand_bytes(rng, 3000 * 5), dtype=np.uint8)
    srcs = [memoryview(staging[i * 3000:(i + 1) * 3000]) for i in range(5)]
    slots = [4, 5, 6, 0, 2]
    assert tier.write([b"k"] * 5, slots, srcs) == [True] * 5
    assert tier.copier().stats()["transfers"] == 1
    outs = [bytearray([POISON]) * 3000 for _ in range(5)]
    assert tier.read([b"k"] * 5, slots[::-1], [memoryview(o) for o in outs]) == [True] * 5
    assert tier.copier().stats()["transfers"] == 2
    assert [bytes(o) for o in outs] == [bytes(m) for m in srcs[::-1]]


def test_a_failed_batch_is_a_tier_io_error(monkeypatch):
    from kvtier import native
    from kvtier.errors import TierIOError
    tier = GpuTier("gpu", 64, 2, device="cpu")

    def broken(*a, **k):
        raise OSError("bus error")
    monkeypatch.setattr(native, "copy_spans", broken)
    with pytest.raises(TierIOError, match="bus error"):
        tier.write([b"a"], [0], [memoryview(bytes(64))])


def test_the_factory_passes_the_mechanism_through(monkeypatch):
    from kvtier.tiers import gpu as gpu_tier
    from kvtier.tiers.factory import build_tiers
    seen = {}

    class OnCpu(GpuTier):
        def __init__(self, name, block_bytes, num_slots, device=0, mechanism="auto"):
            seen.update(device=device, mechanism=mechanism)
            super().__init__(name, block_bytes, num_slots, device="cpu", mechanism=mechanism)
    monkeypatch.setattr(gpu_tier, "GpuTier", OnCpu)
    cfg = KVTierConfig(gpu=GpuConfig(capacity_bytes=1 << 20, mechanism="kernel"))
    tiers, _ = build_tiers(cfg, Namespace("m", 16), 4096)
    assert seen == {"device": 0, "mechanism": "kernel"}
    assert tiers[0].mechanism == "auto"             # a CPU stand-in has no kernel to run
    with pytest.raises(ConfigError, match="gpu.mechanism"):
        GpuTier("gpu", 64, 2, device="cpu", mechanism="warp")


def test_slots_are_aligned_and_disjoint():
    tier = GpuTier("gpu", 1000, 5, device="cpu")
    a = tier.addresses([0, 1, 4]).astype(np.int64)
    assert (a % SLOT_ALIGN == 0).all()
    assert np.diff(a).min() >= 1000
    assert tier.stats()["capacity_bytes"] == 5 * tier.slot_bytes


@pytest.mark.parametrize("slot", [-1, 4])
def test_slot_out_of_range(slot):
    tier = GpuTier("gpu", 64, 4, device="cpu")
    with pytest.raises(KVTierError):
        tier.addresses([slot])
    with pytest.raises(KVTierError):
        tier.view(slot)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", 3.5, "mps"])
def test_bad_device_is_a_config_error(device):
    with pytest.raises(ConfigError, match="gpu.device"):
        GpuTier("gpu", 64, 4, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_device_without_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match="gpu.device.*none"):
        GpuTier("gpu", 64, 4, device=0)
    with pytest.raises(ConfigError, match="gpu.device"):
        TieredCache.from_config(KVTierConfig(gpu=GpuConfig(capacity_bytes=1 << 20)), Namespace("m", 16), 4096)


def test_capacity_that_cannot_be_allocated_is_a_config_error():
    with pytest.raises(ConfigError, match="gpu.capacity_bytes"):
        GpuTier("gpu", 1 << 30, 1 << 22, device="cpu")        # 4 PiB


def test_closed_tier_refuses():
    tier = GpuTier("gpu", 64, 2, device="cpu")
    tier.close()
    with pytest.raises(KVTierError, match="closed"):
        tier.view(0)


# ---- in a stack -------------------------------------------------------------------

def stack(device, gpu_slots=2, host_slots=8):
    src, bd = make_kv("LBNHC", 16, 4, SHAPE, device=device)
    dst, _ = make_kv("LBNHC", 16, 4, SHAPE, device=device)
    for t in dst:
        t.view(torch.uint8).fill_(POISON)
    lay = BlockLayout(src, bd)
    tiers = [GpuTier("gpu", lay.block_bytes, gpu_slots, device=device),
             HostTier("host", lay.block_bytes, host_slots)]
    ns = Namespace("tiny", 4)
    cache = TieredCache(tiers, "lru", transfer_threads=1, namespace=ns)
    return src, dst, bd, cache, ns


def verify_pages(dst, src, bd, dst_ids, src_ids):
    got = torch_ref.gather_blocks(dst, bd, dst_ids).cpu().numpy()
    want = torch_ref.gather_blocks(src, bd, src_ids).cpu().numpy()
    np.testing.assert_array_equal(got, want)


def run_stack(device):
    """Store 6 blocks through a 2-slot GPU tier: 4 are demoted to host, then all come back."""
    src, dst, bd, cache, ns = stack(device)
    with cache:
        lay_src, lay_dst = BlockLayout(src, bd), BlockLayout(dst, bd)
        store = KVCopier(lay_src, buffer_device=str(cache.tiers[0].device))
        keys = [i.to_bytes(16, "little") for i in range(6)]
        src_ids = [9, 2, 14, 5, 0, 11]
        for key, b in zip(keys, src_ids):           # one block per request, like decode-time stores
            h = cache.prepare_store([key], ("s", b))
            t = store.store([b], cache.tiers[0].addresses(h.slots))
            assert t.wait(30) and t.ok
            cache.complete_store(h, True)
        assert cache.flush(30)
        st = cache.stats()
        assert st["gpu.evicted_blocks"] == 4 and st["host.stored_blocks"] == 4
        assert cache.lookup(keys).num_blocks == 6
        h = cache.prepare_load(keys[:2], "reader")    # evicted earliest: promoted back from host
        assert h is not None and h.wait(30) and h.num_ok == 2
        assert h.tiers == ("host", "host")
        dst_ids = [3, 7]
        load = KVCopier(lay_dst, buffer_device=str(cache.tiers[0].device))
        t = load.load(dst_ids, cache.tiers[0].addresses(h.slots[:2]))
        assert t.wait(30) and t.ok
        cache.complete_load(h)
        verify_pages(dst, src, bd, dst_ids, src_ids[:2])
        untouched = [b for b in range(16) if b not in dst_ids]
        assert (torch_ref.gather_blocks(dst, bd, untouched).cpu().numpy() == POISON).all()


def test_stack_cpu_stand_in():
    run_stack("cpu")


def paged_over_gpu_tier(device):
    """PagedKVCache with the GPU tier on top: spans go engine <-> pool, evictions go to host."""
    src, dst, bd, cache, ns = stack(device, gpu_slots=3)
    pc = PagedKVCache(cache, BlockLayout(src, bd), ns)
    tokens = list(range(4 * 5))
    assert pc.store(tokens[:12], [4, 8, 1]) == 3
    assert pc.store(tokens, [4, 8, 1, 13, 6]) == 2           # evicts two of the first three
    assert cache.flush(30)
    pc_dst = PagedKVCache(cache, BlockLayout(dst, bd), ns)
    assert pc_dst.lookup(tokens) == 5
    assert pc_dst.load(tokens[:8], [0, 15]) == 2              # both come back from host
    assert cache.stats()["host.promoted_blocks"] == 2
    verify_pages(dst, src, bd, [0, 15], [4, 8])
    untouched = [b for b in range(16) if b not in (0, 15)]
    assert (torch_ref.gather_blocks(dst, bd, untouched).cpu().numpy() == POISON).all()
    pc.close()


def test_paged_cache_over_gpu_tier_cpu():
    paged_over_gpu_tier("cpu")


@pytest.mark.gpu
def test_stack_cuda():
    run_stack("cuda")


@pytest.mark.gpu
def test_paged_cache_over_gpu_tier_cuda():
    paged_over_gpu_tier("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("mech", ["dma", "kernel", "torch"])
def test_device_buffers_every_mechanism(mech):
    src, bd = make_kv("BLHNC", 8, 16, SHAPE, device="cuda")
    lay = BlockLayout(src, bd)
    tier = GpuTier("gpu", lay.block_bytes, 4, device=0)
    tier.tensor.fill_(POISON)
    c = KVCopier(lay, mech, buffer_device="cuda:0")
    t = c.store([6, 1, 6], tier.addresses([3, 0, 1]))
    assert t.wait(30) and t.ok, t.error
    want = torch_ref.gather_blocks(src, bd, [6, 1, 6]).cpu().numpy()
    for i, s in enumerate([3, 0, 1]):
        np.testing.assert_array_equal(tier._slot(s).cpu().numpy(), want[i])
    assert (tier._slot(2).cpu().numpy() == POISON).all()


@pytest.mark.gpu
@pytest.mark.parametrize("mech", ["auto", "dma", "kernel"])
def test_from_config_on_cuda(mech):
    src, bd = make_kv("LBNHC", 4, 4, ModelShape(num_layers=1, num_kv_heads=2, head_dim=64), device="cuda")
    lay = BlockLayout(src, bd)
    cache = TieredCache.from_config(KVTierConfig(gpu=GpuConfig(capacity_bytes=1 << 20, mechanism=mech)),
                                    Namespace("m", 16), lay.block_bytes)
    with cache:
        assert cache.tiers[0].medium == "gpu" and cache.tiers[0].device.type == "cuda"
        assert cache.tiers[0].mechanism == mech
        pc = PagedKVCache(cache, lay, Namespace("m", 16))
        assert pc.copier.mechanism == mech and pc.copier.buffer_device == "cuda:0"
