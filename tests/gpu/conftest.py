"""The copier tests copy between engine tensors (registered by BlockLayout) and scratch slot
buffers made by the tests themselves, which are not registered: they run kvtier's native
range check in "known" mode (a span that starts in registered memory must end inside it).
Production callers register every buffer, and tests/core, tests/disk, tests/native and
tests/vllm run "strict"."""
from __future__ import annotations

import pytest

from kvtier.native import ranges


@pytest.fixture(autouse=True)
def _native_ranges_mode():
    with ranges.enforcing("known"):
        yield
