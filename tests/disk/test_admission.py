"""TinyLFU admission: one-hit blocks stay out, repeated ones get in, popularity ages."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import ConfigError
from kvtier.policy.admission import MAX_COUNT, TinyLFU

from tests.helpers import k


def test_used_once_is_rejected_used_twice_is_admitted():
    f = TinyLFU(1024)
    f.record([k(i) for i in range(100)])
    f.record([k(i) for i in range(50)])
    assert [f.admit(k(i)) for i in range(100)] == [True] * 50 + [False] * 50
    assert f.stats()["admitted"] == 50 and f.stats()["rejected"] == 50
    assert not f.admit(k(10_000))                 # never seen


def test_min_uses_is_configurable():
    f = TinyLFU(64, min_uses=3)
    f.record([k(1), k(1), k(2), k(2), k(2)])
    assert not f.admit(k(1)) and f.admit(k(2))


def test_popularity_fades_with_aging():
    f = TinyLFU(16, sample_factor=1)              # ages every 16 records
    f.record([k(1), k(1)])
    assert f.admit(k(1))
    f.record([k(1000 + i) for i in range(16)])    # other traffic: one aging step
    assert f.stats()["resets"] >= 1
    assert not f.admit(k(1))                       # two old uses no longer count
    f.record([k(1), k(1)])
    assert f.admit(k(1))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=400))
def test_estimate_never_undercounts_before_aging(ids):
    f = TinyLFU(512)                               # sample size 5120: no aging within 400 records
    f.record([k(i) for i in ids])
    for i, c in Counter(ids).items():
        assert f.estimate(k(i)) >= min(c, MAX_COUNT + 1)


def hashed(i: int) -> bytes:
    """A key as kvtier makes them: 16 bytes of a cryptographic hash (the sketch indexes by
    the key's bytes, so tiny integer keys would collide by construction)."""
    import hashlib
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).digest()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=200, unique=True))
def test_distinct_keys_seen_once_are_rarely_admitted(ids):
    f = TinyLFU(4096)
    f.record([hashed(i) for i in ids])
    admitted = sum(f.admit(hashed(i)) for i in ids)
    assert admitted <= max(1, len(ids) // 20)     # only doorkeeper collisions can slip through


@pytest.mark.parametrize("kw", [{"capacity": 0}, {"capacity": 8, "min_uses": 0},
                                {"capacity": 8, "sample_factor": 0}])
def test_bad_parameters_are_config_errors(kw):
    cap = kw.pop("capacity")
    with pytest.raises(ConfigError):
        TinyLFU(cap, **kw)
