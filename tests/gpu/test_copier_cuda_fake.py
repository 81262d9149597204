"""KVCopier's CUDA ordering on a CPU: the fake device runs only when told, under an adversarial schedule.

Each test states one rule the connector relies on and would fail if the
copier broke it:

- a store is ordered after everything the compute stream issued before it;
- a transfer is not done before its end event completes;
- ``wait_for_layer(i)`` orders the compute stream after layer i's copy (and
  only layer i's: later layers may still be in flight);
- ``wait_on_stream`` keeps the compute stream from overwriting pages a store
  still reads;
- at ``max_inflight`` a new submission waits for the oldest transfer.

Engine tensors are CPU tensors whose layout claims to be on ``cuda:0``; the
fake runtime copies host memory.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier.bench.kv_layouts import ModelShape, make_kv
from kvtier.gpu import torch_ref
from kvtier.gpu.copier import KVCopier
from kvtier.layout import BlockLayout
from tests.gpu.fake_cuda import install

POISON = 0xA5
COMPUTE = 4242
SHAPE = ModelShape(num_layers=4, num_kv_heads=2, head_dim=16)
IDS = [5, 1, 6, 2]


@pytest.fixture
def device(monkeypatch):
    cupy, cuda_copy = install(monkeypatch, eager=False)
    return cupy.cuda.runtime


def cuda_layout(tensors, bd) -> BlockLayout:
    lay = BlockLayout(tensors, bd)
    lay.device = torch.device("cuda", 0)          # the fake device copies host memory
    return lay


def engine(seed=0, layout="LBNHC"):
    g = torch.Generator().manual_seed(seed)
    return make_kv(layout, 8, 4, SHAPE, generator=g)


class Slots:
    def __init__(self, block_bytes: int, n: int):
        self.block_bytes = block_bytes
        self.buf = np.full(n * block_bytes, POISON, dtype=np.uint8)

    def addrs(self, slots) -> np.ndarray:
        return np.uint64(self.buf.ctypes.data) + np.asarray(slots, dtype=np.uint64) * np.uint64(self.block_bytes)

    def slot(self, s: int) -> np.ndarray:
        return self.buf[s * self.block_bytes:(s + 1) * self.block_bytes]


def copier(lay, mech, **kw):
    return KVCopier(lay, mech, compute_stream=COMPUTE, **kw)


def streams(c):
    return c._cuda.streams["load"].ptr, c._cuda.streams["store"].ptr


@pytest.mark.parametrize("mech", ["dma", "kernel"])
def test_a_store_sees_what_the_compute_stream_wrote_before_it(device, mech):
    src, bd = engine()
    lay = cuda_layout(src, bd)
    slots = Slots(lay.block_bytes, len(IDS))
    device.registered.append((slots.buf.ctypes.data, slots.buf.size))
    for t in src:
        device.registered.append((t.data_ptr(), t.numel() * t.element_size()))
    c = copier(lay, mech)

    def compute_writes():
        for t in src:
            t.view(torch.uint8).fill_(0x3C)
    device.enqueue(COMPUTE, ("fn", compute_writes))       # queued, not yet run
    t = c.store(IDS, slots.addrs(range(len(IDS))))
    assert not t.done() and not t.wait(0.01), "done before the device ran the copy"
    device.run(first=streams(c))                          # copy streams before compute, if they may
    assert t.done() and t.ok, t.error
    for s in range(len(IDS)):
        assert (slots.slot(s) == 0x3C).all(), "the store ran before the compute stream's write"


@pytest.mark.parametrize("mech", ["dma", "kernel"])
def test_a_transfer_is_done_only_when_its_end_event_completes(device, mech):
    src, bd = engine(seed=1)
    lay = cuda_layout(src, bd)
    slots = Slots(lay.block_bytes, len(IDS))
    device.registered.append((slots.buf.ctypes.data, slots.buf.size))
    for t in src:
        device.registered.append((t.data_ptr(), t.numel() * t.element_size()))
    c = copier(lay, mech)
    t = c.store(IDS, slots.addrs(range(len(IDS))))
    for _ in range(3):
        assert not t.done() and t.ok is None
    assert (slots.buf == POISON).all()
    device.run()
    assert t.done() and t.ok and t.seconds is not None
    want = torch_ref.gather_blocks(src, bd, IDS).numpy()
    for i in range(len(IDS)):
        np.testing.assert_array_equal(slots.slot(i), want[i])


def test_wait_for_layer_orders_the_compute_stream_after_that_layer(device):
    src, bd = engine(seed=2)
    dst, _ = engine(seed=3)
    for t in dst:
        t.view(torch.uint8).fill_(POISON)
    lay = cuda_layout(src, bd)
    slots = Slots(lay.block_bytes, len(IDS))
    c_src = copier(lay, "dma")
    assert c_src.store(IDS, slots.addrs(range(len(IDS)))) is not None
    device.run()
    c = copier(cuda_layout(dst, bd), "dma")
    lw = c.load_layers(IDS, slots.addrs(range(len(IDS))))
    seen = {}
    for layer in range(SHAPE.num_layers):
        assert lw.wait_for_layer(layer, stream=COMPUTE)   # returns at once: the device waits
        device.enqueue(COMPUTE, ("fn", lambda layer=layer: seen.__setitem__(layer, dst[layer].clone())))
    assert not lw.done() and not seen, "the host waited or the device ran early"
    device.run(first=[COMPUTE])                           # compute before copies, if it may
    assert lw.done() and lw.ok
    for layer in range(SHAPE.num_layers):
        want = torch_ref.gather_blocks([src[layer]], bd, IDS).numpy()
        got = torch_ref.gather_blocks([seen[layer]], bd, IDS).numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"compute read layer {layer} before its copy")


def test_a_layer_wait_does_not_wait_for_later_layers(device):
    src, bd = engine(seed=4)
    lay = cuda_layout(src, bd)
    slots = Slots(lay.block_bytes, len(IDS))
    c = copier(lay, "dma")
    lw = c.load_layers(IDS, slots.addrs(range(len(IDS))))
    lw.wait_for_layer(0, stream=COMPUTE)
    waits = [call for call in device.calls if call[0] == "wait" and call[1] == COMPUTE]
    assert len(waits) == 1
    ends = [lw.layers[i]._end for i in range(SHAPE.num_layers)]
    assert waits[0][2] == ends[0]


def test_wait_on_stream_keeps_compute_from_overwriting_pages_a_store_reads(device):
    src, bd = engine(seed=5)
    lay = cuda_layout(src, bd)
    want = torch_ref.gather_blocks(src, bd, IDS).numpy()
    slots = Slots(lay.block_bytes, len(IDS))
    c = copier(lay, "dma")
    t = c.store(IDS, slots.addrs(range(len(IDS))))
    t.wait_on_stream(COMPUTE)                              # next step: pages may be reused after this

    def reuse_pages():
        for x in src:
            x.view(torch.uint8).fill_(0)
    device.enqueue(COMPUTE, ("fn", reuse_pages))
    device.run(first=[COMPUTE])
    assert t.done() and t.ok
    for i in range(len(IDS)):
        np.testing.assert_array_equal(slots.slot(i), want[i], err_msg="the store read reused pages")


def test_submissions_beyond_the_bound_wait_for_the_oldest(device):
    src, bd = engine(seed=6)
    lay = cuda_layout(src, bd)
    slots = Slots(lay.block_bytes, len(IDS))
    c = copier(lay, "dma", max_inflight=2)
    a = c.store(IDS[:1], slots.addrs([0]))
    b = c.store(IDS[1:2], slots.addrs([1]))
    assert not a.done() and not b.done() and c.pending() == 2
    c.store(IDS[2:3], slots.addrs([2]))                   # the fake's eventSynchronize runs the device
    assert a.done() and a.ok
    assert c.pending() <= 2
    assert not c.flush(0.01)                              # the device has not run the rest
    device.run()
    assert c.flush(5) and c.pending() == 0


def test_a_failure_after_submission_is_a_failed_transfer(device):
    src, bd = engine(seed=7)
    lay = cuda_layout(src, bd)
    slots = Slots(lay.block_bytes, 1)
    c = copier(lay, "dma")
    t = c.store(IDS[:1], slots.addrs([0]))
    real = device.eventQuery
    device.eventQuery = lambda e: 700 if e == t._end else real(e)   # cudaErrorIllegalAddress
    assert t.done() and t.ok is False and "700" in t.error
    assert c.stats()["failed"] == 1


def test_a_kernel_that_does_not_compile_leaves_auto_with_dma_and_fails_kernel_loudly(monkeypatch):
    cupy, cuda_copy = install(monkeypatch)

    class Broken:
        def __init__(self, code, options=()):
            raise RuntimeError("nvrtc: error: unknown option")
    cupy.RawModule = Broken
    src, bd = engine(seed=8)
    lay = cuda_layout(src, bd)
    c = copier(lay, "auto")
    assert c.candidates == ("dma",)
    slots = Slots(lay.block_bytes, 1)
    t = c.store(IDS[:1], slots.addrs([0]))
    assert t.wait(5) and t.ok and t.mechanism == "dma"
    from kvtier.errors import ConfigError
    with pytest.raises(ConfigError, match="compiles"):
        copier(lay, "kernel")
