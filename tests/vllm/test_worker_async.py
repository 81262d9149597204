"""The connector's worker on the one asynchronous copier (CPU: host transfer threads).

Copies are held back with a gate on kvtier's native span copy, so each test
controls when bytes land and checks what the worker may report meanwhile:
a store is never reported (so never published) before its bytes are in the
slot, an async load is never finished before its pages are in place, a
layer's wait never returns before that layer is copied, and the next step
does not start while the previous step's stores still read engine pages.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from kvtier import native
from tests.helpers import hold_native_copies

from .test_geometry import _arena, _geometry, _spec, _tensors, _worker

pytestmark = pytest.mark.vllm


@pytest.fixture
def gate(monkeypatch):
    """Native span copies wait for ``gate.set()``; ``gate.calls`` counts them."""
    return hold_native_copies(monkeypatch)


def _wait_until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition never became true"
        time.sleep(0.005)


@pytest.fixture
def setup(tmp_path):
    geo = _geometry(_spec("full"))
    arena, info = _arena(tmp_path, geo)
    kv = _tensors(geo, 0)
    w = _worker(geo, 0, kv)
    yield geo, arena, info, kv, w
    w.shutdown()
    arena.unlink()
    arena.close()


class _Empty:
    store_results: dict = {}


def test_a_store_is_reported_only_after_its_bytes_are_in_the_slot(setup, gate):
    from kvtier.integrations.vllm.metadata import KVTierConnectorMetadata, StoreOp
    geo, arena, info, kv, w = setup
    w.wait_for_save(KVTierConnectorMetadata(arena=info, stores=[StoreOp(1, "r", [[3, 4]], [0, 1])]))
    assert w.take_results().store_results == {}            # attached; nothing stored yet
    assert not arena.array[:2 * geo.block_bytes].any()
    gate.set()
    seen = {}
    _wait_until(lambda: seen.update((w.take_results() or _Empty()).store_results) or 1 in seen)
    assert seen == {1: {0: True}}
    page = kv["g0.l0"][:, 4].contiguous().view(torch.uint8).numpy().ravel()
    assert np.array_equal(arena.array[geo.block_bytes:geo.block_bytes + page.size], page)


def test_the_next_step_waits_for_the_previous_steps_stores(setup, gate):
    from kvtier.integrations.vllm.metadata import KVTierConnectorMetadata, StoreOp
    geo, arena, info, kv, w = setup
    w.wait_for_save(KVTierConnectorMetadata(arena=info, stores=[StoreOp(1, "r", [[3]], [0])]))
    started = threading.Event()
    finished = threading.Event()

    def next_step():
        started.set()
        w.before_step()
        finished.set()
    t = threading.Thread(target=next_step)
    t.start()
    started.wait(5)
    time.sleep(0.1)
    assert not finished.is_set()                    # the forward may not overwrite pages yet
    gate.set()
    t.join(10)
    assert finished.is_set()


def test_an_async_load_finishes_only_after_its_pages_are_in_place(setup, gate):
    from kvtier.integrations.vllm.metadata import KVTierConnectorMetadata, LoadOp
    geo, arena, info, kv, w = setup
    arena.array[:geo.block_bytes] = 0x5A
    w.start_load_kv(KVTierConnectorMetadata(arena=info, loads=[LoadOp(1, "q", [[9]], [0], [], True)]))
    assert w.get_finished() == (None, None)
    gate.set()
    got = set()
    _wait_until(lambda: got.update(w.get_finished()[1] or ()) or "q" in got)
    assert (kv["g0.l0"][:, 9].contiguous().view(torch.uint8) == 0x5A).all()


def test_a_layer_wait_returns_only_once_that_layer_is_copied(tmp_path, monkeypatch):
    from kvtier.integrations.vllm.metadata import KVTierConnectorMetadata, LoadOp
    geo = _geometry(_spec("full"))
    arena, info = _arena(tmp_path, geo)
    kv = _tensors(geo, 0)
    w = _worker(geo, 0, kv)
    real = native.copy_spans

    def slow(*a, **k):
        time.sleep(0.2)
        real(*a, **k)
    monkeypatch.setattr(native, "copy_spans", slow)
    arena.array[:geo.block_bytes] = 0x33
    w.start_load_kv(KVTierConnectorMetadata(arena=info, loads=[LoadOp(1, "q", [[9]], [0], [], False)]))
    for j, name in enumerate(geo.groups[0].layer_names):
        w.wait_for_layer_load(name)
        assert (kv[name][:, 9].contiguous().view(torch.uint8) == 0x33).all(), f"layer {j} not in place"
    w.wait_for_save(KVTierConnectorMetadata())
    r = w.take_results()
    assert r.load_results == {1: {0: True}} and w.take_load_errors() == set()
    w.shutdown()
    arena.unlink()
    arena.close()


def test_a_layer_nobody_waited_for_is_recomputed(setup):
    """If the forward never asked for a layer, its pages may have been read too early: recompute."""
    from kvtier.integrations.vllm.metadata import KVTierConnectorMetadata, LoadOp
    geo, arena, info, kv, w = setup
    w.start_load_kv(KVTierConnectorMetadata(arena=info, loads=[LoadOp(1, "q", [[9, 10]], [0, 1], [], False)]))
    w.wait_for_layer_load(geo.groups[0].layer_names[0])          # layer 1 never waited for
    w.wait_for_save(KVTierConnectorMetadata())
    assert w.take_load_errors() == {9, 10}
    assert w.take_results().load_results == {1: {0: False}}


def test_a_failed_copy_is_a_failed_op_never_an_exception(setup, monkeypatch):
    from kvtier.integrations.vllm.metadata import KVTierConnectorMetadata, LoadOp, StoreOp

    def broken(*a, **k):
        raise OSError("copy failed")
    monkeypatch.setattr(native, "copy_spans", broken)
    geo, arena, info, kv, w = setup
    w.wait_for_save(KVTierConnectorMetadata(arena=info, stores=[StoreOp(1, "r", [[3]], [0])]))
    w.start_load_kv(KVTierConnectorMetadata(loads=[LoadOp(2, "q", [[5]], [1], [], True)]))
    results = {}
    _wait_until(lambda: results.update({("s", k): v for k, v in (w.take_results() or _Empty()).store_results.items()})
                or ("s", 1) in results)
    assert results[("s", 1)] == {0: False}
    done = set()
    _wait_until(lambda: done.update(w.get_finished()[1] or ()) or "q" in done)
    assert w.take_load_errors() == {5}
    # Bad block ids are a failed op too, not an exception into vLLM.
    w.start_load_kv(KVTierConnectorMetadata(loads=[LoadOp(3, "z", [[10 ** 6]], [0], [], True)]))
    done = set()
    _wait_until(lambda: done.update(w.get_finished()[1] or ()) or "z" in done)
    assert 10 ** 6 in w.take_load_errors()
