"""Every native span op in these tests must stay inside registered memory
(kvtier.native.ranges in "strict" mode)."""
from __future__ import annotations

import pytest

from kvtier.native import ranges

# Modules whose code under test copies through memory it does not register, run in
# "known" mode (none: every caller registers what it copies).
KNOWN_ONLY: tuple[str, ...] = ()


@pytest.fixture(autouse=True)
def _strict_native_ranges(request):
    name = request.module.__name__.rsplit(".", 1)[-1]
    with ranges.enforcing("known" if KNOWN_ONLY and name.startswith(KNOWN_ONLY) else "strict"):
        yield
