"""kvtier.gpu.cuda_copy's control flow on a CPU: CuPy replaced by a stand-in that copies host memory.

The stand-in (tests/gpu/fake_cuda.py) keeps CUDA's rules that bugs in this
module would break: events must be created before use and destroyed exactly
once, a stream may only wait on a live event, a kernel reads its chunk table
when it runs, and nothing runs before the device does.  These tests run it
eagerly (the device runs after every call) and check wiring, bookkeeping,
the bytes and the batch path's record; test_copier_cuda_fake.py runs it
lazily, under an adversarial schedule, to check ordering.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from kvtier.layout import Spans
from tests.gpu.fake_cuda import install

POISON = 0xA5


@pytest.fixture
def fake(monkeypatch):
    return install(monkeypatch)


def spans_between(rng, src_buf, dst_buf, n):
    lens = rng.integers(1, 200_000, n).astype(np.uint64)
    offs = (np.cumsum(lens) - lens).astype(np.uint64)
    order = rng.permutation(n)
    dst_offs = (np.cumsum(lens[order]) - lens[order]).astype(np.uint64)[np.argsort(order)]
    return Spans(np.uint64(src_buf.ctypes.data) + offs, np.uint64(dst_buf.ctypes.data) + dst_offs, lens)


def check(spans, src_buf, dst_buf):
    for s, d, n in zip(spans.src, spans.dst, spans.lengths):
        so, do = int(s) - src_buf.ctypes.data, int(d) - dst_buf.ctypes.data
        np.testing.assert_array_equal(dst_buf[do:do + int(n)], src_buf[so:so + int(n)])


@pytest.mark.parametrize("mech", ["dma", "kernel"])
@pytest.mark.parametrize("after", [None, 77])
def test_submit_copies_and_releases_everything(fake, mech, after):
    cupy, cuda_copy = fake
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, 4 << 20, dtype=np.uint8)
    dst = np.full(4 << 20, POISON, dtype=np.uint8)
    cupy.cuda.runtime.registered += [(src.ctypes.data, src.size), (dst.ctypes.data, dst.size)]
    sp = spans_between(rng, src, dst, 25)
    dc = cuda_copy.device_copier(0)
    t = dc.submit(sp, mech, "store", after=after)
    assert (t.wait() if after is None else t.wait(5)) and t.ok and t.seconds == pytest.approx(0.25e-3)
    assert t.mechanism == mech and t.nbytes == sp.nbytes
    check(sp, src, dst)
    assert (dst[int(sp.nbytes):] == POISON).all()
    assert cupy.cuda.runtime.live == set(), "events leaked"
    assert t._keep == ()
    t.wait_on_stream(5)                  # complete: nothing to wait for, no dead event touched
    if mech == "kernel":
        assert cupy.launches == 1


def test_kernel_refuses_unmapped_memory(fake):
    cupy, cuda_copy = fake
    from kvtier.errors import ConfigError
    src, dst = np.ones(4096, dtype=np.uint8), np.zeros(4096, dtype=np.uint8)
    sp = Spans(np.array([src.ctypes.data], dtype=np.uint64), np.array([dst.ctypes.data], dtype=np.uint64),
               np.array([4096], dtype=np.uint64))
    with pytest.raises(ConfigError, match="pageable"):
        cuda_copy.device_copier(0).submit(sp, "kernel", "load", after=None)
    assert (dst == 0).all()


@pytest.mark.parametrize("batch_status", [0, 1])
def test_batch_submission_and_its_fallback(fake, batch_status):
    cupy, cuda_copy = fake
    rng = np.random.default_rng(2)
    src = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    dst = np.full(1 << 20, POISON, dtype=np.uint8)
    sp = spans_between(rng, src, dst, 9)
    calls = []

    def batch(dsts, srcs, sizes, stream):
        calls.append(sizes.size)
        if batch_status == 0:
            for d, s, n in zip(dsts, srcs, sizes):
                ctypes.memmove(int(d), int(s), int(n))
        return batch_status
    dc = cuda_copy.device_copier(0)
    dc.batch_memcpy = batch
    t = dc.submit(sp, "dma", "load", after=None)
    assert t.wait(5) and t.ok
    check(sp, src, dst)
    assert calls == [9]
    assert cupy.cuda.runtime.memcpys == (0 if batch_status == 0 else 9)
    assert dc.stats()["batch"] == 1 - batch_status and dc.stats()["batch_failures"] == batch_status


def test_a_failing_runtime_is_a_failed_transfer(fake):
    cupy, cuda_copy = fake

    def broken(*a):
        raise RuntimeError("cudaErrorIllegalAddress")
    cupy.cuda.runtime.memcpyAsync = broken
    src, dst = np.ones(64, dtype=np.uint8), np.zeros(64, dtype=np.uint8)
    sp = Spans(np.array([src.ctypes.data], dtype=np.uint64), np.array([dst.ctypes.data], dtype=np.uint64),
               np.array([64], dtype=np.uint64))
    t = cuda_copy.device_copier(0).submit(sp, "dma", "store", after=3)
    assert t.done() and t.ok is False and "IllegalAddress" in t.error
    assert cupy.cuda.runtime.live == set(), "events leaked"


def test_auto_on_the_span_copier_path_learns_both(fake):
    cupy, cuda_copy = fake
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    dst = np.full(1 << 20, POISON, dtype=np.uint8)
    cupy.cuda.runtime.registered += [(src.ctypes.data, src.size), (dst.ctypes.data, dst.size)]
    sp = spans_between(rng, src, dst, 5)
    dc = cuda_copy.device_copier(0)
    key = dc.cost.bucket("copy", sp.nbytes, len(sp))
    used = []
    for _ in range(5):
        m = dc.cost.choose(key)
        t = dc.submit(sp, m, "store", after=None)
        assert t.wait(5) and t.ok
        dc.cost.record(key, t.mechanism, t.nbytes, t.seconds)
        used.append(m)
    assert used[:4] == ["dma", "dma", "kernel", "kernel"]
    assert dc.cost.best(key) == "dma"                    # equal cost: the copy engines keep it
    check(sp, src, dst)


@pytest.mark.parametrize("direction", ["store", "load"])
def test_copies_are_queued_after_the_compute_stream(fake, direction):
    """An event recorded on the compute stream, waited on by the copy stream, before any copy.

    This is the ordering the ``gpu`` race tests observe on a device; here its
    removal fails in CI too.
    """
    cupy, cuda_copy = fake
    src, dst = np.ones(4096, dtype=np.uint8), np.zeros(4096, dtype=np.uint8)
    sp = Spans(np.array([src.ctypes.data, src.ctypes.data + 2048], dtype=np.uint64),
               np.array([dst.ctypes.data + 2048, dst.ctypes.data], dtype=np.uint64),
               np.array([2048, 2048], dtype=np.uint64))
    dc = cuda_copy.device_copier(0)
    compute = 4242
    t = dc.submit(sp, "dma", direction, after=compute)
    assert t.wait(5) and t.ok
    calls = cupy.cuda.runtime.calls
    copy_stream = dc.streams[direction].ptr
    first_copy = next(i for i, c in enumerate(calls) if c[0] == "copy")
    ready = [c[2] for c in calls[:first_copy] if c[0] == "record" and c[1] == compute]
    assert ready, "no event recorded on the compute stream before the copy"
    assert ("wait", copy_stream, ready[0]) in calls[:first_copy], "copy stream does not wait for compute"
    assert all(c[1] == copy_stream for c in calls if c[0] == "copy")
    assert dc.streams["load"].ptr != dc.streams["store"].ptr


# ---- the batch path's record ----------------------------------------------------------

def test_repeated_identical_batch_refusals_stop_the_batch_path(fake, caplog):
    cupy, cuda_copy = fake
    rng = np.random.default_rng(4)
    src = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    dst = np.full(1 << 20, POISON, dtype=np.uint8)
    sp = spans_between(rng, src, dst, 6)
    calls = []

    def refuses(dsts, srcs, sizes, stream):
        calls.append(sizes.size)
        return 1                           # cudaErrorInvalidValue, every time
    dc = cuda_copy.device_copier(0)
    dc.batch_memcpy = refuses
    for _ in range(cuda_copy.BATCH_GIVE_UP + 2):
        t = dc.submit(sp, "dma", "store", after=None)
        assert t.wait(5) and t.ok
        check(sp, src, dst)
    assert len(calls) == cuda_copy.BATCH_GIVE_UP, "the batch call is retried after repeated identical refusals"
    st = dc.stats()
    assert st["batch"] == 0 and st["batch_failures"] == cuda_copy.BATCH_GIVE_UP and st["batch_disabled"]
    assert "no longer tried" in caplog.text


def test_a_refusal_between_successes_keeps_the_batch_path(fake):
    cupy, cuda_copy = fake
    rng = np.random.default_rng(5)
    src = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    dst = np.full(1 << 20, POISON, dtype=np.uint8)
    sp = spans_between(rng, src, dst, 4)
    statuses = iter([1, 1, 0, 1, 1, 0, 1, 1, 0])

    def flaky(dsts, srcs, sizes, stream):
        status = next(statuses)
        if status == 0:
            for d, s, n in zip(dsts, srcs, sizes):
                ctypes.memmove(int(d), int(s), int(n))
        return status
    dc = cuda_copy.device_copier(0)
    dc.batch_memcpy = flaky
    for _ in range(9):
        assert dc.submit(sp, "dma", "load", after=None).wait(5)
    check(sp, src, dst)
    assert dc.stats() == {"batch": 3, "batch_failures": 6, "batch_disabled": False, "batch_runtime": None}


# ---- compilation happens before timing -------------------------------------------------

def test_the_kernel_is_compiled_before_the_start_event(fake):
    cupy, cuda_copy = fake
    src = np.arange(1 << 16, dtype=np.uint8)
    dst = np.zeros(1 << 16, dtype=np.uint8)
    cupy.cuda.runtime.registered += [(src.ctypes.data, src.size), (dst.ctypes.data, dst.size)]
    sp = Spans(np.array([src.ctypes.data], dtype=np.uint64), np.array([dst.ctypes.data], dtype=np.uint64),
               np.array([src.size], dtype=np.uint64))
    dc = cuda_copy.device_copier(0)
    t = dc.submit(sp, "kernel", "store", after=None)
    assert t.wait(5) and t.ok and (dst == src).all()
    calls = cupy.cuda.runtime.calls
    compiled = calls.index(("compile", None, "kvtier_copy_chunks"))
    stream = dc.streams["store"].ptr
    first_record = next(i for i, c in enumerate(calls) if c[0] == "record" and c[1] == stream)
    assert compiled < first_record, "NVRTC would be timed as copy time"
    dc.submit(sp, "kernel", "store", after=None).wait(5)
    assert cupy.compiles == 1, "compiled once per device"


def test_a_compile_error_is_a_failed_transfer(fake):
    cupy, cuda_copy = fake

    class Broken:
        def __init__(self, code, options=()):
            raise RuntimeError("nvrtc: error: identifier undefined")
    cupy.RawModule = Broken
    buf = np.zeros(4096, dtype=np.uint8)
    cupy.cuda.runtime.registered.append((buf.ctypes.data, buf.size))
    sp = Spans(np.array([buf.ctypes.data], dtype=np.uint64), np.array([buf.ctypes.data + 2048], dtype=np.uint64),
               np.array([1024], dtype=np.uint64))
    t = cuda_copy.device_copier(0).submit(sp, "kernel", "load", after=None)
    assert t.done() and t.ok is False and "nvrtc" in t.error
    assert cupy.cuda.runtime.live == set()


# ---- the kernel reaches every allocation it touches ------------------------------------

def three_buffers(cupy, pinned_middle: bool):
    bufs = [np.zeros(1 << 16, dtype=np.uint8) for _ in range(3)]
    for i, b in enumerate(bufs):
        if i != 1 or pinned_middle:
            cupy.cuda.runtime.registered.append((b.ctypes.data, b.size))
    # device memory owns whole 2 MiB pages of address space, as the driver's reservations do
    dev = np.zeros(3 << 21, dtype=np.uint8)
    base = (dev.ctypes.data + (1 << 21) - 1) & ~((1 << 21) - 1)
    cupy.cuda.runtime.device_ranges.append((base, 1 << 21))
    src = np.array([base + (i << 16) for i in range(3)], dtype=np.uint64)
    dst = np.array([b.ctypes.data for b in bufs], dtype=np.uint64)
    return Spans(src, dst, np.full(3, 4096, dtype=np.uint64)), bufs, dev


@pytest.mark.parametrize("pinned_middle", [True, False])
def test_kernel_can_reach_checks_a_middle_span(fake, pinned_middle):
    cupy, cuda_copy = fake
    sp, bufs, dev = three_buffers(cupy, pinned_middle)
    assert cuda_copy.device_copier(0).kernel_can_reach(sp) is pinned_middle


def test_kernel_can_reach_remembers_device_memory_and_skips_pinned_ranges(fake, monkeypatch):
    cupy, cuda_copy = fake
    from kvtier.gpu import pinning
    sp, bufs, dev = three_buffers(cupy, True)
    dc = cuda_copy.device_copier(0)
    rt = cupy.cuda.runtime
    assert dc.kernel_can_reach(sp)
    first = rt.queries
    assert first >= 3 + 1                   # three host buffers, the device side at least once
    assert dc.kernel_can_reach(sp)
    assert rt.queries - first == 6, "device memory asked about again"     # host ends only
    monkeypatch.setattr(pinning, "covered", lambda addrs: np.ones(np.shape(addrs), dtype=bool))
    before = rt.queries
    assert dc.kernel_can_reach(sp)
    assert rt.queries == before, "ranges this process pinned need no call"


def test_contiguous_ranges_merge_touching_and_overlapping_spans():
    from kvtier.gpu.cuda_copy import contiguous_ranges
    addrs = np.array([100, 0, 50, 300, 120, 400], dtype=np.uint64)
    lens = np.array([30, 50, 10, 100, 10, 1], dtype=np.uint64)
    starts, lasts = contiguous_ranges(addrs, lens)
    assert starts.tolist() == [0, 100, 300] and lasts.tolist() == [59, 129, 400]


def test_missing_cupy_names_the_extra_for_the_cuda_version(monkeypatch):
    import sys
    import torch
    from kvtier.errors import MissingDependencyError
    from kvtier.gpu import cuda_copy
    monkeypatch.setitem(sys.modules, "cupy", None)
    for version, extra in (("13.0", "cuda13"), ("12.8", "cuda"), (None, "cuda")):
        monkeypatch.setattr(torch.version, "cuda", version)
        with pytest.raises(MissingDependencyError, match=f"kvtier\\[{extra}\\]'"):
            cuda_copy.require_cupy()
