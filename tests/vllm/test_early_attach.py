"""The worker maps the host arena as soon as the scheduler creates it, never a stale file."""
from __future__ import annotations

import os
import time

import pytest

from .test_geometry import _geometry, _spec, _tensors, _worker

pytestmark = pytest.mark.vllm


def _wait_until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition never became true"
        time.sleep(0.01)


def _create(path, nbytes, geo):
    from kvtier.integrations.vllm.metadata import ArenaInfo
    from kvtier.integrations.vllm.shm import SharedArena
    arena = SharedArena.create(path, nbytes)
    return arena, ArenaInfo(path, nbytes, geo.block_bytes, arena.identity)


def _round_trip(w, info, kv):
    """A store then a load through the worker's arena: the bytes come back."""
    from kvtier.integrations.vllm.metadata import KVTierConnectorMetadata, LoadOp, StoreOp
    layer = next(iter(kv))
    before = kv[layer][:, 3].clone()
    w.start_load_kv(KVTierConnectorMetadata(arena=info))
    w.wait_for_save(KVTierConnectorMetadata(stores=[StoreOp(1, "r", [[3]], [0])]))
    w.before_step()
    for t in kv.values():
        t[:, 5] = -1.0
    meta = KVTierConnectorMetadata(loads=[LoadOp(2, "r", [[5]], [0], [], True)])
    w.start_load_kv(meta)
    _wait_until(lambda: w.get_finished()[1])
    assert (kv[layer][:, 5] == before).all()


@pytest.fixture
def spy_attach(monkeypatch):
    from kvtier.integrations.vllm.shm import SharedArena
    calls = []
    real = SharedArena.attach.__func__

    def attach(cls, path, nbytes):
        calls.append(path)
        return real(cls, path, nbytes)
    monkeypatch.setattr(SharedArena, "attach", classmethod(attach))
    return calls


def test_the_arena_is_mapped_when_it_appears_and_adopted_at_the_first_step(tmp_path, spy_attach):
    geo = _geometry(_spec("full"))
    kv = _tensors(geo, 0)
    w = _worker(geo, 0, kv)
    path, nbytes = str(tmp_path / "arena"), 8 * geo.block_bytes
    w.expect_arena(path, nbytes)              # before the scheduler has created it
    time.sleep(0.1)
    assert spy_attach == []
    arena, info = _create(path, nbytes, geo)
    try:
        _wait_until(lambda: spy_attach)       # mapped before any step asked for it
        _round_trip(w, info, kv)
        assert spy_attach == [path]           # the first step adopted that mapping
        assert w.arena.identity == arena.identity
    finally:
        w.shutdown()
        arena.unlink()
        arena.close()


def test_a_stale_file_mapped_early_is_dropped_for_the_one_the_scheduler_created(tmp_path, spy_attach):
    geo = _geometry(_spec("full"))
    kv = _tensors(geo, 0)
    path, nbytes = str(tmp_path / "arena"), 8 * geo.block_bytes
    with open(path, "wb") as f:              # left by a killed engine with the same id, just now
        f.truncate(nbytes)
    w = _worker(geo, 0, kv)
    w.expect_arena(path, nbytes)
    _wait_until(lambda: spy_attach)           # it looked right, so it was mapped
    stale_identity = (os.stat(path).st_dev, os.stat(path).st_ino)
    arena, info = _create(path, nbytes, geo)  # the scheduler replaces it
    assert info.identity != stale_identity
    try:
        _round_trip(w, info, kv)
        assert spy_attach == [path, path]     # attached again, to the scheduler's file
        assert w.arena.identity == arena.identity
    finally:
        w.shutdown()
        arena.unlink()
        arena.close()


def test_a_file_older_than_the_worker_is_never_mapped_early(tmp_path, spy_attach):
    geo = _geometry(_spec("full"))
    kv = _tensors(geo, 0)
    path, nbytes = str(tmp_path / "arena"), 8 * geo.block_bytes
    with open(path, "wb") as f:
        f.truncate(nbytes)
    time.sleep(1.2)                           # older than the worker by more than the clock slack
    w = _worker(geo, 0, kv)
    w.expect_arena(path, nbytes)
    time.sleep(0.3)
    assert spy_attach == []
    w.shutdown()                              # stops the watch; nothing mapped, nothing left running
    assert not any(t.name == "kvtier-early-attach" and t.is_alive() for t in __import__("threading").enumerate())
