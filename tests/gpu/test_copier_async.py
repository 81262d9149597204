"""KVCopier on the CPU: asynchronous on host transfer threads, with the CUDA path's contract.

Copies are slowed down or held back on purpose (a patched native span copy)
so that a call that blocked, a wait that returned early or a failure that
escaped would show.  No test asserts a duration.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from kvtier import native
from tests.helpers import hold_native_copies
from kvtier.bench.kv_layouts import LAYOUTS, ModelShape, make_kv
from kvtier.errors import ConfigError
from kvtier.gpu import torch_ref
from kvtier.gpu.copier import KVCopier
from kvtier.gpu.host_stream import HostStream
from kvtier.gpu.transfer import Transfer
from kvtier.layout import BlockLayout

POISON = 0xA5
SHAPE = ModelShape(num_layers=4, num_kv_heads=2, head_dim=16, latent_dim=24)
IDS = [6, 2, 9, 2, 4]
SLOTS = [3, 0, 4, 1, 2]


def engine(layout="LBNHC", seed=0):
    g = torch.Generator().manual_seed(seed)
    return make_kv(layout, 12, 4, SHAPE, generator=g)


def slots_for(lay, n):
    buf = np.full(n * lay.block_bytes, POISON, dtype=np.uint8)
    addrs = np.uint64(buf.ctypes.data) + np.arange(n, dtype=np.uint64) * np.uint64(lay.block_bytes)
    return buf, addrs


@pytest.fixture
def gate(monkeypatch):
    """Native span copies wait for ``gate.set()``; ``gate.calls`` counts them."""
    return hold_native_copies(monkeypatch)


@pytest.fixture
def slow(monkeypatch):
    """Every native span copy sleeps first; ``slow.order`` records what finished, in order."""
    order = []
    real = native.copy_spans

    def delayed(src, dst, lengths, *a, **k):
        time.sleep(0.03)
        real(src, dst, lengths, *a, **k)
        order.append(int(dst[0]))
    monkeypatch.setattr(native, "copy_spans", delayed)
    delayed.order = order
    return delayed


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mech", ["native", "torch"])
def test_async_copies_give_the_reference_bytes(layout, mech):
    src, bd = engine(layout, seed=1)
    dst, _ = engine(layout, seed=2)
    lay = BlockLayout(src, bd)
    buf, addrs = slots_for(lay, len(SLOTS))
    c = KVCopier(lay, mech)
    t = c.store(IDS, addrs[SLOTS])
    assert t.wait(30) and t.ok, t.error
    want = torch_ref.gather_blocks(src, bd, IDS).numpy()
    for i, s in enumerate(SLOTS):
        np.testing.assert_array_equal(buf[s * lay.block_bytes:(s + 1) * lay.block_bytes], want[i])
    t = KVCopier(BlockLayout(dst, bd), mech).load([0, 1, 3, 5, 7], addrs[SLOTS])
    assert t.wait(30) and t.ok, t.error
    np.testing.assert_array_equal(torch_ref.gather_blocks(dst, bd, [0, 1, 3, 5, 7]).numpy(), want)


def test_store_and_load_return_before_the_copy(gate):
    src, bd = engine(seed=3)
    lay = BlockLayout(src, bd)
    buf, addrs = slots_for(lay, len(IDS))
    c = KVCopier(lay)
    t = c.store(IDS, addrs)                        # returns although the copy is held
    lw = c.load_layers(IDS[:2], addrs[:2])
    assert not t.done() and t.ok is None and not t.wait(0.01)
    assert not lw.done() and lw.ok is None
    assert (buf == POISON).all()
    gate.set()
    assert t.wait(30) and t.ok and lw.wait(30) and lw.ok
    np.testing.assert_array_equal(buf.reshape(len(IDS), -1), torch_ref.gather_blocks(src, bd, IDS).numpy())


def test_wait_for_layer_returns_only_once_that_layer_is_in_place(slow):
    src, bd = engine(seed=4)
    dst, _ = engine(seed=5)
    for t in dst:
        t.view(torch.uint8).fill_(POISON)
    lay = BlockLayout(src, bd)
    buf, addrs = slots_for(lay, len(IDS))
    assert KVCopier(lay).store(IDS, addrs).wait(30)
    slow.order.clear()
    ids = [0, 3, 5, 7, 11]
    lw = KVCopier(BlockLayout(dst, bd)).load_layers(ids, addrs)
    assert not lw.layer_done(0)                   # every layer copy sleeps before it moves a byte
    for layer in range(SHAPE.num_layers):
        assert lw.wait_for_layer(layer)
        got = torch_ref.gather_blocks([dst[layer]], bd, ids).numpy()
        want = torch_ref.gather_blocks([src[layer]], bd, IDS).numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"wait_for_layer({layer}) returned before its bytes")
    assert len(slow.order) == SHAPE.num_layers
    layer_starts = [dst[layer].data_ptr() for layer in range(SHAPE.num_layers)]
    firsts = [next(i for i, p in enumerate(layer_starts) if p <= a < p + dst[i].numel() * dst[i].element_size())
              for a in slow.order]
    assert firsts == sorted(firsts), "layers were copied out of order"
    assert lw.wait(30) and lw.ok


def test_a_failed_copy_finishes_failed_and_never_raises(monkeypatch):
    src, bd = engine(seed=6)
    lay = BlockLayout(src, bd)
    buf, addrs = slots_for(lay, len(IDS))

    def broken(*a, **k):
        raise OSError("EIO on the arena")
    monkeypatch.setattr(native, "copy_spans", broken)
    c = KVCopier(lay)
    t = c.store(IDS, addrs)
    lw = c.load_layers(IDS, addrs)
    assert t.wait(30) and t.ok is False and "EIO" in t.error
    assert not lw.wait_for_layer(0)                # a failed layer: recompute, no exception
    assert lw.wait(30) and lw.ok is False and "layer 0" in lw.error
    t.wait_on_stream()                             # returns: the copy is over, failed or not
    assert c.stats()["failed"] == 1 + SHAPE.num_layers


def test_wait_on_stream_blocks_the_host_until_the_copy_is_done(gate):
    src, bd = engine(seed=7)
    lay = BlockLayout(src, bd)
    buf, addrs = slots_for(lay, len(IDS))
    t = KVCopier(lay).store(IDS, addrs)
    returned = threading.Event()
    waiter = threading.Thread(target=lambda: (t.wait_on_stream(), returned.set()))
    waiter.start()
    assert not returned.wait(0.05), "wait_on_stream returned while the store still reads the pages"
    gate.set()
    waiter.join(30)
    assert returned.is_set() and t.ok


def test_submissions_beyond_the_bound_wait_for_the_oldest(gate):
    src, bd = engine(seed=8)
    lay = BlockLayout(src, bd)
    buf, addrs = slots_for(lay, len(IDS))
    c = KVCopier(lay, max_inflight=2)
    first = c.store(IDS[:1], addrs[:1])
    c.store(IDS[1:2], addrs[1:2])
    third = []
    submitter = threading.Thread(target=lambda: third.append(c.store(IDS[2:3], addrs[2:3])))
    submitter.start()
    submitter.join(0.05)
    assert submitter.is_alive() and not third, "a third transfer was queued beyond the bound"
    gate.set()
    submitter.join(30)
    assert third and first.done()
    assert c.flush(30) and c.pending() == 0 and third[0].ok


def test_loads_do_not_wait_behind_stores(monkeypatch):
    """One host stream per direction: a held store does not delay a load."""
    src, bd = engine(seed=9)
    lay = BlockLayout(src, bd)
    buf, addrs = slots_for(lay, len(IDS))
    release = threading.Event()
    real = native.copy_spans
    store_dst = int(addrs[0])

    def maybe_held(s, d, n, *a, **k):
        if int(d.min()) >= store_dst and int(d.min()) < store_dst + buf.size:
            assert release.wait(30)                 # stores write into the slots
        real(s, d, n, *a, **k)
    monkeypatch.setattr(native, "copy_spans", maybe_held)
    c = KVCopier(lay)
    store = c.store(IDS, addrs)
    load = c.load([0], addrs[:1])
    assert load.wait(30) and load.ok and not store.done()
    release.set()
    assert store.wait(30) and store.ok


def test_host_stream_runs_jobs_in_order_and_survives_failures():
    s = HostStream("test")
    seen = []
    ts = [Transfer("native", 1, 1) for _ in range(5)]
    for i, t in enumerate(ts):
        s.submit(t, (lambda i=i: seen.append(i)) if i != 2 else (lambda: 1 / 0))
    assert s.flush(30)
    assert seen == [0, 1, 3, 4]
    assert [t.ok for t in ts] == [True, True, False, True, True] and "ZeroDivisionError" in ts[2].error
    s.close()


def test_bad_arguments_still_raise_at_the_call():
    src, bd = engine()
    lay = BlockLayout(src, bd)
    with pytest.raises(ConfigError, match="max_inflight"):
        KVCopier(lay, max_inflight=0)
    with pytest.raises(ConfigError, match="block_ids"):
        KVCopier(lay).store([99], np.zeros(1, dtype=np.uint64))
