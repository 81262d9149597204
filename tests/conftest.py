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
            if item.get_closest_marker(mark) is not None and not ok:   # a marker, not a folder name
                item.add_marker(pytest.mark.skip(reason=why))



@pytest.fixture(autouse=True)
def _native_ranges_mode():
    """Every native span op in the tests must stay inside registered memory ("strict");
    a folder whose tests copy through scratch buffers of their own overrides this fixture."""
    from kvtier.native import ranges
    with ranges.enforcing("strict"):
        yield
