"""Shared fixtures and hardware gates (markers are skipped at collection time)."""
from __future__ import annotations

import importlib.util
import shutil

import pytest


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    gates = {
        "gpu": (_cuda(), "needs a CUDA GPU"),
        "vllm": (importlib.util.find_spec("vllm") is not None, "needs vllm installed"),
        "redis": (shutil.which("redis-server") is not None, "needs redis-server on PATH"),
    }
    for item in items:
        for mark, (ok, why) in gates.items():
            if mark in item.keywords and not ok:
                item.add_marker(pytest.mark.skip(reason=why))


def block(key: bytes, nbytes: int) -> bytes:
    """Deterministic bytes for a key, so any loaded block can be verified."""
    import hashlib
    out = bytearray()
    counter = 0
    while len(out) < nbytes:
        out += hashlib.blake2b(key + counter.to_bytes(4, "little"), digest_size=64).digest()
        counter += 1
    return bytes(out[:nbytes])


def k(i: int) -> bytes:
    """A tiny integer key as a 16-byte BlockKey."""
    return i.to_bytes(16, "little")
