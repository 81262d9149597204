"""The worker maps the host arena as soon as the scheduler creates it, never a stale file."""
from __future__ import annotations

import os
import threading
import time

import pytest

from .test_geometry import _geometry, _spec, _tensors, _worker

pytestmark = pytest.mark.vllm


def _wait_until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition never became true"
        time.sleep(0.01)


class _Engine:
    """One engine's worker side and the scheduler's arena file, cleaned up by the fixture."""

    def __init__(self, tmp_path):
        self.geo = _geometry(_spec("full"))
        self.kv = _tensors(self.geo, 0)
        self.path, self.nbytes = str(tmp_path / "arena"), 8 * self.geo.block_bytes
        self.worker = self.arena = None

    def stale_file(self) -> None:
        """A file at the arena's path, as a killed engine with the same id leaves one."""
        with open(self.path, "wb") as f:
            f.truncate(self.nbytes)

    def start_worker(self):
        self.worker = _worker(self.geo, 0, self.kv)
        self.worker.expect_arena(self.path, self.nbytes)
        return self.worker

    def create_arena(self):
        """The scheduler's arena, and the ArenaInfo its first step's metadata carries."""
        from kvtier.integrations.vllm.metadata import ArenaInfo
        from kvtier.integrations.vllm.shm import SharedArena
        self.arena = SharedArena.create(self.path, self.nbytes)
        return ArenaInfo(self.path, self.nbytes, self.geo.block_bytes, self.arena.identity)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
        if self.arena is not None:
            self.arena.unlink()
            self.arena.close()


@pytest.fixture
def engine(tmp_path):
    e = _Engine(tmp_path)
    yield e
    e.close()


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


def test_the_arena_is_mapped_when_it_appears_and_adopted_at_the_first_step(engine, spy_attach):
    w = engine.start_worker()                 # before the scheduler has created the arena
    time.sleep(0.1)
    assert spy_attach == []
    info = engine.create_arena()
    _wait_until(lambda: spy_attach)           # mapped before any step asked for it
    _round_trip(w, info, engine.kv)
    assert spy_attach == [engine.path]        # the first step adopted that mapping
    assert w.arena.identity == engine.arena.identity


def test_a_stale_file_mapped_early_is_dropped_for_the_one_the_scheduler_created(engine, spy_attach):
    engine.stale_file()                       # left just now: it looks right, so it is mapped
    w = engine.start_worker()
    _wait_until(lambda: spy_attach)
    stale_identity = (os.stat(engine.path).st_dev, os.stat(engine.path).st_ino)
    info = engine.create_arena()              # the scheduler replaces it
    assert info.identity != stale_identity
    _round_trip(w, info, engine.kv)
    assert spy_attach == [engine.path, engine.path]     # attached again, to the scheduler's file
    assert w.arena.identity == engine.arena.identity


def test_a_file_older_than_the_worker_is_never_mapped_early(engine, spy_attach):
    engine.stale_file()
    time.sleep(1.2)                           # older than the worker by more than the clock slack
    w = engine.start_worker()
    time.sleep(0.3)
    assert spy_attach == []
    w.shutdown()                              # stops the watch; nothing mapped, nothing left running
    assert not any(t.name == "kvtier-early-attach" and t.is_alive() for t in threading.enumerate())
