"""KVCopier against the torch reference: every layout, every mechanism that runs here.

Engine tensors hold random bytes; slot buffers and load destinations are
poisoned first, so unwritten or misplaced bytes show.  Block ids are unsorted,
gapped and repeated; slots are unsorted too.  CPU tests run everywhere; tests
marked ``gpu`` run the CUDA mechanisms on a CUDA device.
"""
from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import torch

from kvtier.bench.kv_layouts import LAYOUTS, ModelShape, make_kv
from kvtier import native
from kvtier.gpu import torch_ref
from kvtier.errors import ConfigError, MissingDependencyError
from kvtier.gpu.copier import KVCopier
from kvtier.gpu.cost import CostModel
from kvtier.layout import BlockLayout, Spans

POISON = 0xA5
SMALL = ModelShape(num_layers=3, num_kv_heads=2, head_dim=16, latent_dim=24)
NUM_BLOCKS = 12
# unsorted, gapped (no 0, 2, 4, 6..), repeated (7 twice)
STORE_IDS = [7, 3, 11, 7, 1, 9, 5]
SLOTS = [4, 0, 6, 2, 5, 1, 3]


class Arena:
    """Slot buffers at arbitrary addresses: host memory, or device memory on ``device``."""

    def __init__(self, block_bytes: int, num_slots: int, device="cpu"):
        self.slot_bytes = (block_bytes + 4095) // 4096 * 4096
        self.device = torch.device(device)
        n = self.slot_bytes * num_slots
        if self.device.type == "cuda":
            self.tensor = torch.full((n,), POISON, dtype=torch.uint8, device=self.device)
        else:
            self.tensor = torch.full((n,), POISON, dtype=torch.uint8,
                                     pin_memory=torch.cuda.is_available())
        self.block_bytes = block_bytes

    def addrs(self, slots) -> np.ndarray:
        return np.uint64(self.tensor.data_ptr()) + np.asarray(slots, dtype=np.uint64) * np.uint64(self.slot_bytes)

    def slot(self, s: int) -> np.ndarray:
        off = s * self.slot_bytes
        return self.tensor[off:off + self.block_bytes].cpu().numpy()


def kv(layout: str, device="cpu", seed=0, block_tokens=4):
    g = torch.Generator(device=device).manual_seed(seed)
    return make_kv(layout, NUM_BLOCKS, block_tokens, SMALL, device=device, generator=g)


def poison(tensors):
    for t in tensors:
        raw = torch.full(t.shape[:-1] + (t.shape[-1] * t.element_size(),), POISON, dtype=torch.uint8,
                         device=t.device)
        t.copy_(raw.view(t.dtype))


def page(tensors, block_dim, b) -> np.ndarray:
    return torch_ref.gather_blocks(tensors, block_dim, [b]).cpu().numpy()[0]


def verify_slots(arena, tensors, block_dim, ids, slots):
    ref = torch_ref.gather_blocks(tensors, block_dim, ids).cpu().numpy()
    for i, s in enumerate(slots):
        np.testing.assert_array_equal(arena.slot(s), ref[i], err_msg=f"slot {s} (block {ids[i]})")


def verify_loaded(dst, src, block_dim, loaded_ids):
    for b in range(NUM_BLOCKS):
        got = page(dst, block_dim, b)
        if b in loaded_ids:
            np.testing.assert_array_equal(got, page(src, block_dim, b), err_msg=f"block {b}")
        else:
            assert (got == POISON).all(), f"block {b} was not loaded but changed"


def round_trip(layout, store_mech, load_mech, device="cpu"):
    src, bd = kv(layout, device, seed=1)
    dst, _ = kv(layout, device, seed=2)
    poison(dst)
    lay_src, lay_dst = BlockLayout(src, bd), BlockLayout(dst, bd)
    arena = Arena(lay_src.block_bytes, max(SLOTS) + 2)
    addrs = arena.addrs(SLOTS)
    t = KVCopier(lay_src, store_mech).store(STORE_IDS, addrs)
    assert t.wait(30) and t.ok, t.error
    verify_slots(arena, src, bd, STORE_IDS, SLOTS)
    untouched = max(SLOTS) + 1
    assert (arena.slot(untouched) == POISON).all()
    # load back into other, unsorted block ids of a poisoned cache; engine block 2 is loaded
    # twice, from slots 4 and 2, which both hold block 7's bytes
    load_ids = [2, 10, 0, 2, 6, 4, 8]
    perm_src = dict(zip(SLOTS, STORE_IDS))
    t = KVCopier(lay_dst, load_mech).load(load_ids, addrs)
    assert t.wait(30) and t.ok, t.error
    for b, s in zip(load_ids, SLOTS):
        np.testing.assert_array_equal(page(dst, bd, b), page(src, bd, perm_src[s]), err_msg=f"block {b}")
    for b in set(range(NUM_BLOCKS)) - set(load_ids):
        assert (page(dst, bd, b) == POISON).all(), f"block {b} changed"


# ---- CPU: the same engine, CPU tensors standing in for device ones ------------------

@pytest.mark.parametrize("load_mech", ["native", "torch", "auto"])
@pytest.mark.parametrize("store_mech", ["native", "torch", "auto"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_cpu(layout, store_mech, load_mech):
    round_trip(layout, store_mech, load_mech)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_agrees_with_span_arithmetic(layout):
    """gpu_ref derives block bytes from tensor semantics; layout.spans from strides."""
    src, bd = kv(layout, seed=3)
    lay = BlockLayout(src, bd)
    ids = [5, 0, 5, 11]
    buf = np.full(len(ids) * lay.block_bytes, POISON, dtype=np.uint8)
    addrs = buf.ctypes.data + np.arange(len(ids), dtype=np.uint64) * np.uint64(lay.block_bytes)
    sp = lay.spans(ids, addrs, to_engine=False)
    native.copy_spans(sp.src, sp.dst, sp.lengths)
    np.testing.assert_array_equal(buf.reshape(len(ids), -1), torch_ref.gather_blocks(src, bd, ids).numpy())


def test_reference_handles_permuted_views():
    """A page whose logical order differs from its memory order is copied in memory order."""
    base = torch.arange(6 * 4 * 3, dtype=torch.int32).reshape(6, 3, 4)
    t = base.transpose(1, 2)                    # logical [6, 4, 3], memory [6, 3, 4]
    data = torch_ref.gather_blocks([t], 0, [2])
    np.testing.assert_array_equal(data.view(torch.int32).numpy()[0], base[2].reshape(-1).numpy())
    lay = BlockLayout([t], 0)
    buf = np.zeros(lay.block_bytes, dtype=np.uint8)
    sp = lay.spans([2], np.array([buf.ctypes.data], dtype=np.uint64), to_engine=False)
    native.copy_spans(sp.src, sp.dst, sp.lengths)
    np.testing.assert_array_equal(buf, data.numpy()[0])


@pytest.mark.parametrize("mech", ["native", "torch"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layerwise_matches_whole_blocks(layout, mech):
    src, bd = kv(layout, seed=4)
    dst, _ = kv(layout, seed=5)
    poison(dst)
    lay = BlockLayout(src, bd)
    arena = Arena(lay.block_bytes, len(SLOTS))
    addrs = arena.addrs(SLOTS)
    c = KVCopier(lay, mech)
    saves = [c.save_layer(layer, STORE_IDS, addrs)        # any order: each layer has its own place
             for layer in reversed(range(lay.num_layers))]
    assert all(t.wait(30) and t.ok for t in saves)
    verify_slots(arena, src, bd, STORE_IDS, SLOTS)
    ids = [0, 2, 4, 6, 8, 10, 1]
    lw = KVCopier(BlockLayout(dst, bd), mech).load_layers(ids, addrs)
    perm = dict(zip(SLOTS, STORE_IDS))
    for layer in range(lay.num_layers):
        assert lw.wait_for_layer(layer)
        assert lw.layer_done(layer)
        for b, s in zip(ids, SLOTS):                      # this layer is in place on return
            got = torch_ref.gather_blocks([dst[layer]], bd, [b]).numpy()
            want = torch_ref.gather_blocks([src[layer]], bd, [perm[s]]).numpy()
            np.testing.assert_array_equal(got, want, err_msg=f"layer {layer} block {b}")
    assert lw.wait(30) and lw.done() and lw.ok
    for b, s in zip(ids, SLOTS):
        np.testing.assert_array_equal(page(dst, bd, b), page(src, bd, perm[s]))


def test_auto_probes_every_candidate_then_settles():
    src, bd = kv("LBHNC", seed=6)
    lay = BlockLayout(src, bd)
    arena = Arena(lay.block_bytes, len(SLOTS))
    # a wide margin keeps the preferred mechanism unless the other is 10x faster: no timing flakes
    cm = CostModel(("native", "torch"), probes=2, margin=0.9)
    c = KVCopier(lay, "auto", candidates=("native", "torch"), cost_model=cm)
    used = []
    for _ in range(6):
        t = c.store(STORE_IDS, arena.addrs(SLOTS))
        assert t.wait(30) and t.ok
        used.append(t.mechanism)
    assert used[:4] == ["native", "native", "torch", "torch"]
    key = CostModel.bucket("store", len(STORE_IDS) * lay.block_bytes,
                           len(lay.spans(STORE_IDS, arena.addrs(SLOTS), False)))
    assert [len(cm._buckets[key].samples[m]) for m in ("native", "torch")] == [4, 2]
    assert used[4:] == ["native", "native"] and cm.best(key) == "native"
    verify_slots(arena, src, bd, STORE_IDS, SLOTS)


@pytest.mark.parametrize("bad, match", [
    (dict(block_ids=[NUM_BLOCKS]), "block_ids"),
    (dict(block_ids=[-1]), "block_ids"),
    (dict(block_ids=[1, 2], n_addrs=3), "slot_addrs"),
])
def test_bad_input_is_a_config_error(bad, match):
    src, bd = kv("LBNHC")
    lay = BlockLayout(src, bd)
    arena = Arena(lay.block_bytes, 4)
    ids = bad["block_ids"]
    with pytest.raises(ConfigError, match=match):
        KVCopier(lay).store(ids, arena.addrs(range(bad.get("n_addrs", len(ids)))))
    assert (arena.tensor.numpy() == POISON).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
@pytest.mark.parametrize("mech", ["dma", "kernel", "bogus"])
def test_unrunnable_mechanism_fails_loudly(mech):
    src, bd = kv("LBNHC")
    with pytest.raises(ConfigError, match="mechanism"):
        KVCopier(BlockLayout(src, bd), mech)


def test_empty_transfer_is_done():
    src, bd = kv("MLA")
    t = KVCopier(BlockLayout(src, bd)).load([], np.zeros(0, dtype=np.uint64))
    assert t.done() and t.ok and t.nbytes == 0


def test_failed_copy_is_a_failed_transfer(monkeypatch):
    src, bd = kv("LBHNC")
    lay = BlockLayout(src, bd)
    arena = Arena(lay.block_bytes, 2)

    def boom(*a, **k):
        raise RuntimeError("device fell off the bus")
    monkeypatch.setattr(torch_ref, "store", boom)
    t = KVCopier(lay, "torch").store([1, 2], arena.addrs([0, 1]))
    assert t.wait(30) and t.done() and t.ok is False and "fell off" in t.error


# ---- the kernel's chunk table (CPU code) --------------------------------------------

def test_chunk_table_covers_every_byte_once():
    from kvtier.gpu.cuda_copy import chunk_table
    rng = np.random.default_rng(7)
    lens = rng.integers(1, 300_000, 40).astype(np.uint64)
    src = (np.cumsum(lens) - lens).astype(np.uint64) + np.uint64(1 << 20)
    dst = (np.cumsum(lens[::-1])[::-1] * 2).astype(np.uint64)
    table = chunk_table(Spans(src, dst, lens), chunk=65536)
    n = table.size // 3
    s, d, l = table[:n], table[n:2 * n], table[2 * n:]
    assert l.max() <= 65536 and int(l.sum()) == int(lens.sum())
    assert set((d - s).tolist()) == set((dst - src).tolist())
    # chunks start at multiples of the chunk size inside their span: alignment carries over
    for i in range(lens.size):
        mine = s[(s >= src[i]) & (s < src[i] + lens[i])]
        assert ((mine - src[i]) % 65536 == 0).all()
        assert mine.size == (int(lens[i]) + 65535) // 65536


def test_without_cupy_or_a_cuda_runtime_span_copies_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    from kvtier.gpu import cuda_copy, cudart, span_copy
    monkeypatch.setattr(cudart.PointerKinds, "load", classmethod(lambda cls, path=None: None))
    assert not cuda_copy.available()
    with pytest.raises(MissingDependencyError, match="kvtier\\[cuda\\]"):
        span_copy.span_copier()


def test_without_cupy_span_copies_fall_back_to_torch(monkeypatch):
    """AUTO falls back quietly: spans are copied by torch, each side placed by the runtime."""
    from kvtier.gpu import cudart, span_copy
    monkeypatch.setitem(sys.modules, "cupy", None)
    asked = []

    class HostOnly:
        def __call__(self, addr):
            asked.append(addr)
            return "host", None
    monkeypatch.setattr(cudart.PointerKinds, "load", classmethod(lambda cls, path=None: HostOnly()))
    copy = span_copy.span_copier()
    rng = np.random.default_rng(5)
    src = rng.integers(0, 256, 1 << 16, dtype=np.uint8)
    dst = np.full(1 << 16, POISON, dtype=np.uint8)
    lens = np.array([100, 4096, 7, 30000], dtype=np.uint64)
    so = np.array([0, 200, 5000, 9000], dtype=np.uint64)
    do = np.array([40000, 0, 39000, 5000], dtype=np.uint64)
    copy(Spans(np.uint64(src.ctypes.data) + so, np.uint64(dst.ctypes.data) + do, lens))
    for s, d, n in zip(so, do, lens):
        np.testing.assert_array_equal(dst[int(d):int(d + n)], src[int(s):int(s + n)])
    assert (dst[4096:5000] == POISON).all() and len(asked) == 2


# ---- CUDA -----------------------------------------------------------------------------

GPU_MECHS = ["dma", "kernel", "torch", "auto"]


@pytest.mark.gpu
@pytest.mark.parametrize("load_mech", GPU_MECHS)
@pytest.mark.parametrize("store_mech", GPU_MECHS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_gpu(layout, store_mech, load_mech):
    round_trip(layout, store_mech, load_mech, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("mech", ["dma", "kernel", "torch"])
def test_store_is_ordered_after_compute_writes(mech):
    """The compute stream sleeps, then overwrites the pages; the store must see the new bytes."""
    src, bd = make_kv("LBHNC", 64, 16, ModelShape(num_layers=8), device="cuda")
    lay = BlockLayout(src, bd)
    ids = list(range(0, 64, 2))
    arena = Arena(lay.block_bytes, len(ids))
    c = KVCopier(lay, mech)
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)                  # ~0.1 s of spinning on the compute stream
    for t in src:
        t.view(torch.uint8).fill_(0x3C)
    tr = c.store(ids, arena.addrs(range(len(ids))))
    assert tr.wait(30) and tr.ok, tr.error
    for s in range(len(ids)):
        assert (arena.slot(s) == 0x3C).all(), f"slot {s} holds bytes from before the compute stream's write"


@pytest.mark.gpu
@pytest.mark.parametrize("mech", ["dma", "kernel", "torch"])
def test_compute_reads_after_layer_load(mech):
    """The compute stream, told to wait for each layer, reads the loaded bytes, not the old ones."""
    shape = ModelShape(num_layers=4)
    src, bd = make_kv("LBNHC", 32, 256, shape, device="cuda")
    dst, _ = make_kv("LBNHC", 32, 256, shape, device="cuda")
    lay = BlockLayout(src, bd)
    ids = list(range(32))
    arena = Arena(lay.block_bytes, len(ids))
    assert KVCopier(lay, mech).store(ids, arena.addrs(ids)).wait(30)
    poison(dst)
    torch.cuda.synchronize()
    lw = KVCopier(BlockLayout(dst, bd), mech).load_layers(ids, arena.addrs(ids))
    seen = []
    for layer in range(shape.num_layers):
        assert lw.wait_for_layer(layer)
        seen.append(dst[layer].clone())             # on the compute stream
    torch.cuda.synchronize()
    for layer in range(shape.num_layers):
        assert torch.equal(seen[layer].view(torch.uint8), src[layer].view(torch.uint8)), f"layer {layer}"


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["LBNHC", "MLA"])
def test_span_copies_without_cupy_go_through_torch(monkeypatch, layout):
    """The fallback places each side with the CUDA runtime torch loaded, then copies per span."""
    from kvtier.gpu import span_copy
    monkeypatch.setitem(sys.modules, "cupy", None)
    copy = span_copy.span_copier()
    src, bd = kv(layout, device="cuda", seed=9)
    lay = BlockLayout(src, bd)
    arena = Arena(lay.block_bytes, len(SLOTS))
    copy(lay.spans(STORE_IDS, arena.addrs(SLOTS), to_engine=False))
    verify_slots(arena, src, bd, STORE_IDS, SLOTS)


@pytest.mark.gpu
def test_kernel_refuses_pageable_host_memory():
    src, bd = kv("LBHNC", device="cuda")
    lay = BlockLayout(src, bd)
    buf = np.full(lay.block_bytes * 2, POISON, dtype=np.uint8)       # pageable
    addrs = buf.ctypes.data + np.arange(2, dtype=np.uint64) * np.uint64(lay.block_bytes)
    with pytest.raises(ConfigError, match="pageable"):
        KVCopier(lay, "kernel").store([1, 2], addrs)
    t = KVCopier(lay, "auto").store([1, 2], addrs)                   # auto falls back quietly
    assert t.wait(30) and t.ok and t.mechanism == "dma"
    np.testing.assert_array_equal(buf.reshape(2, -1), torch_ref.gather_blocks(src, bd, [1, 2]).cpu().numpy())


# ---- CostModel: the auto choice, on synthetic measurements ---------------------------

def settle(cm, key, rates, n=None):
    """Run the probe phase, recording ``rates`` (bytes/s) for whatever is chosen."""
    for _ in range(n or cm.probes * len(cm.candidates)):
        m = cm.choose(key)
        cm.record(key, m, 1000, 1000 / rates[m])


def test_cost_model_keeps_the_preferred_mechanism_within_margin():
    cm = CostModel(("dma", "kernel"), probes=2, margin=0.05)
    key = cm.bucket("load", 1 << 28, 512)
    settle(cm, key, {"dma": 50e9, "kernel": 52e9})
    assert cm.best(key) == "dma" and cm.choose(key) == "dma"
    key2 = cm.bucket("load", 1 << 28, 8192)
    settle(cm, key2, {"dma": 30e9, "kernel": 48e9})
    assert cm.best(key2) == "kernel" and cm.choose(key2) == "kernel"
    assert cm.best(key) == "dma"                           # buckets are independent


def test_cost_model_reprobes_and_follows_a_change():
    cm = CostModel(("dma", "kernel"), probes=1, reprobe_every=8)
    key = cm.bucket("store", 1 << 26, 100)
    rates = {"dma": 20e9, "kernel": 40e9}
    settle(cm, key, rates)
    picks = []
    for _ in range(30):
        m = cm.choose(key)
        picks.append(m)
        cm.record(key, m, 1000, 1000 / rates[m])
        if len(picks) == 10:
            rates["dma"] = 80e9                            # e.g. the SMs got busy: DMA now wins
    assert "dma" in picks[:10] and picks[:10].count("kernel") >= 8   # one re-probe among kernel picks
    assert picks[-8:].count("dma") == 7                   # and one re-probe of kernel per 8


def test_cost_model_before_measurements_uses_the_first_candidate():
    cm = CostModel(("dma", "kernel"), probes=1)
    key = cm.bucket("load", 4096, 1)
    assert [cm.choose(key) for _ in range(4)] == ["dma", "kernel", "dma", "dma"]
    assert cm.best(key) is None


@pytest.mark.parametrize("kw", [dict(candidates=()), dict(probes=0), dict(reprobe_every=1), dict(margin=1.5)])
def test_cost_model_rejects_bad_settings(kw):
    args = dict(candidates=("dma",)) | kw
    with pytest.raises(ConfigError):
        CostModel(**args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
def test_unrunnable_mechanism_per_call_fails_loudly():
    src, bd = kv("LBHNC")
    lay = BlockLayout(src, bd)
    arena = Arena(lay.block_bytes, 2)
    with pytest.raises(ConfigError, match="mechanism"):
        KVCopier(lay).load([1], arena.addrs([0]), mechanism="kernel")
    assert (page(src, bd, 1) != POISON).any()


def test_auto_records_transfers_that_complete_later(monkeypatch):
    """Asynchronous transfers feed the cost model when they complete, not when submitted."""
    src, bd = kv("LBHNC")
    lay = BlockLayout(src, bd)
    arena = Arena(lay.block_bytes, 2)
    c = KVCopier(lay, "auto", candidates=("native", "torch"))
    gate = threading.Event()
    real = native.copy_spans

    def held(*a, **k):
        assert gate.wait(30)
        real(*a, **k)
    monkeypatch.setattr(native, "copy_spans", held)
    t = c.store([1, 2], arena.addrs([0, 1]))
    assert not t.done() and c.cost.summary()
    key = next(iter(c.cost._buckets))
    assert not c.cost._buckets[key].samples["native"]
    gate.set()
    assert t.wait(30) and t.ok
    assert list(c.cost._buckets[key].samples["native"]) == [t.nbytes / t.seconds]

    def broken(*a, **k):
        raise OSError("boom")
    monkeypatch.setattr(native, "copy_spans", broken)
    failed = c.store([1, 2], arena.addrs([0, 1]))
    assert failed.wait(30) and failed.ok is False and "boom" in failed.error
    assert len(c.cost._buckets[key].samples["native"]) == 1      # failures are not costs
    assert c.stats()["failed"] == 1


def test_span_copies_are_routed_by_the_engine_memory_device():
    from kvtier.gpu.span_copy import copy_spans
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, 1 << 14, dtype=np.uint8)
    dst = np.full(1 << 14, POISON, dtype=np.uint8)
    spans = Spans(np.array([src.ctypes.data + 10], dtype=np.uint64), np.array([dst.ctypes.data + 20], dtype=np.uint64),
                  np.array([5000], dtype=np.uint64))
    copy_spans("cpu", spans)
    np.testing.assert_array_equal(dst[20:5020], src[10:5010])
    assert (dst[:20] == POISON).all() and (dst[5020:] == POISON).all()
    with pytest.raises(ConfigError, match="kv_caches.device"):
        copy_spans("tpu", spans)
