"""Small helpers shared by kvtier's tests: deterministic block bytes, tiny integer keys, the repo root."""
from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]          # the repository root


def block(key: bytes, nbytes: int) -> bytes:
    """Deterministic bytes for a key, so any loaded block can be verified."""
    out = bytearray()
    counter = 0
    while len(out) < nbytes:
        out += hashlib.blake2b(key + counter.to_bytes(4, "little"), digest_size=64).digest()
        counter += 1
    return bytes(out[:nbytes])


def k(i: int) -> bytes:
    """A tiny integer key as a 16-byte BlockKey."""
    return i.to_bytes(16, "little")


def load_and_verify(cache, ids, block_bytes: int, owner="r") -> int:
    """Load ``ids`` through a TieredCache and check every byte of the blocks that came back
    against :func:`block`; returns how many leading blocks came back."""
    handle = cache.prepare_load([k(i) for i in ids], owner)
    if handle is None:
        return 0
    assert handle.wait(10)
    n = handle.num_ok
    for key, view in zip(handle.keys[:n], handle.views[:n]):
        assert bytes(view) == block(key, block_bytes)
    cache.complete_load(handle)
    return n


def hold_native_copies(monkeypatch):
    """Make kvtier's native span copies wait until the returned event is set (``.calls`` counts them)."""
    import threading

    from kvtier import native

    ev = threading.Event()
    ev.calls = 0
    real = native.copy_spans

    def held(*a, **k):
        ev.calls += 1
        assert ev.wait(30), "the test never released the copy"
        real(*a, **k)
    monkeypatch.setattr(native, "copy_spans", held)
    return ev
