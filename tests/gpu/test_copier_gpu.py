"""On a CUDA device: the copier's ordering against real streams, pinning, and the batch path.

Each ordering test delays one stream on purpose (``torch.cuda._sleep``) so
that a missing event would let the other stream run first and the bytes
would show it.  Skipped without a GPU.
"""
from __future__ import annotations

import mmap

import numpy as np
import pytest
import torch

from kvtier.bench.kv_layouts import ModelShape, make_kv
from kvtier.gpu import torch_ref
from kvtier.layout import BlockLayout

pytestmark = pytest.mark.gpu
SPIN = 200_000_000              # ~0.1 s of spinning on a stream


def engine(num_blocks=64, tokens=16, layers=4, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return make_kv("LBNHC", num_blocks, tokens, ModelShape(num_layers=layers), device="cuda", generator=g)


def pinned(nbytes):
    from kvtier.gpu.pinning import pin_host_range
    m = mmap.mmap(-1, nbytes)
    a = np.frombuffer(m, dtype=np.uint8)
    a.fill(0xA5)
    pin = pin_host_range(a.ctypes.data, nbytes)
    assert pin is not None and pin.check()
    return a, (m, pin)


def test_pinning_an_mmap_arena_makes_it_reachable_by_the_kernel():
    from kvtier.gpu import cuda_copy, pinning
    from kvtier.gpu.copier import KVCopier
    src, bd = engine()
    lay = BlockLayout(src, bd)
    ids = list(range(0, 64, 3))
    a, (m, pin) = pinned(len(ids) * lay.block_bytes)
    addrs = np.uint64(a.ctypes.data) + np.arange(len(ids), dtype=np.uint64) * np.uint64(lay.block_bytes)
    assert pinning.is_pinned(a.ctypes.data) and pinning.covered(addrs).all()
    again = pinning.pin_host_range(a.ctypes.data, a.size)           # once per process
    assert again is not None and again.owned == pin.owned
    again.close()
    assert pinning.is_pinned(a.ctypes.data)
    assert cuda_copy.device_copier(0).kernel_can_reach(lay.spans(ids, addrs, False))
    t = KVCopier(lay, "kernel").store(ids, addrs)
    assert t.wait(30) and t.ok, t.error
    np.testing.assert_array_equal(a.reshape(len(ids), -1), torch_ref.gather_blocks(src, bd, ids).cpu().numpy())
    pin.close()
    assert not pinning.is_pinned(a.ctypes.data)


def test_the_batch_path_is_used_with_no_failures():
    from kvtier.gpu import cuda_copy
    from kvtier.gpu.copier import KVCopier
    dc = cuda_copy.device_copier(0)
    if dc.batch_memcpy is None:
        pytest.skip("this CUDA runtime has no cudaMemcpyBatchAsync")
    src, bd = engine(seed=1)
    lay = BlockLayout(src, bd)
    ids = [9, 2, 40, 17, 33]
    a, keep = pinned(len(ids) * lay.block_bytes)
    addrs = np.uint64(a.ctypes.data) + np.arange(len(ids), dtype=np.uint64) * np.uint64(lay.block_bytes)
    before = dc.stats()
    t = KVCopier(lay, "dma").store(ids, addrs)
    assert t.wait(30) and t.ok, t.error
    after = dc.stats()
    assert after["batch"] == before["batch"] + 1
    assert after["batch_failures"] == 0 and not after["batch_disabled"], after
    np.testing.assert_array_equal(a.reshape(len(ids), -1), torch_ref.gather_blocks(src, bd, ids).cpu().numpy())
    keep[1].close()


@pytest.mark.parametrize("mech", ["dma", "kernel"])
def test_wait_on_stream_keeps_compute_from_overwriting_pages_a_store_reads(mech):
    from kvtier.gpu.copier import KVCopier
    src, bd = engine(seed=2)
    lay = BlockLayout(src, bd)
    ids = list(range(1, 64, 2))
    want = torch_ref.gather_blocks(src, bd, ids).cpu().numpy()
    a, keep = pinned(len(ids) * lay.block_bytes)
    addrs = np.uint64(a.ctypes.data) + np.arange(len(ids), dtype=np.uint64) * np.uint64(lay.block_bytes)
    c = KVCopier(lay, mech)
    torch.cuda.synchronize()
    from kvtier.gpu import cuda_copy
    side = torch.cuda.ExternalStream(cuda_copy.device_copier(0).streams["store"].ptr)
    with torch.cuda.stream(side):
        torch.cuda._sleep(SPIN)                   # the store queues behind this
    t = c.store(ids, addrs)
    t.wait_on_stream(torch.cuda.current_stream())
    for x in src:                                 # the next step reuses the pages
        x.view(torch.uint8).fill_(0)
    torch.cuda.synchronize()
    assert t.wait(30) and t.ok
    np.testing.assert_array_equal(a.reshape(len(ids), -1), want)
    keep[1].close()


def test_layers_complete_in_order_and_each_wait_is_for_its_layer():
    from kvtier.gpu.copier import KVCopier
    src, bd = engine(num_blocks=64, tokens=256, layers=6, seed=3)
    lay = BlockLayout(src, bd)
    ids = list(range(64))
    a, keep = pinned(len(ids) * lay.block_bytes)
    addrs = np.uint64(a.ctypes.data) + np.arange(len(ids), dtype=np.uint64) * np.uint64(lay.block_bytes)
    assert KVCopier(lay, "dma").store(ids, addrs).wait(30)
    dst, _ = engine(num_blocks=64, tokens=256, layers=6, seed=4)
    for x in dst:
        x.view(torch.uint8).fill_(0xA5)
    torch.cuda.synchronize()
    lw = KVCopier(BlockLayout(dst, bd), "dma").load_layers(ids, addrs)
    sums = []
    for layer in range(6):
        assert lw.wait_for_layer(layer)
        sums.append(dst[layer].view(torch.uint8).to(torch.int64).sum())    # on the compute stream
    torch.cuda.synchronize()
    for layer in range(6):
        assert int(sums[layer]) == int(src[layer].view(torch.uint8).to(torch.int64).sum()), f"layer {layer}"
    assert lw.wait(30) and lw.ok
    keep[1].close()
