"""Flipped bytes in slab files are detected every time; no wrong byte is ever returned."""
from __future__ import annotations

import os
import random

import pytest

from tests.helpers import block, k
from tests.disk.helpers import flip, make, put, verify

ROUNDS = 40


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("bb,slots,rounds", [(8192, 32, ROUNDS), (5000, 32, ROUNDS), (5 << 19, 6, 8)])
def test_random_flips_are_detected_every_time(tmp_path, bb, slots, rounds, aligned):
    rng = random.Random(bb)
    t = make(tmp_path, bb=bb, slots=slots, per_slab=8)
    placed = put(t, range(slots), aligned=aligned)
    detected = 0
    for rnd in range(rounds):
        victims = rng.sample(sorted(placed), rng.randint(1, 4))
        for key in victims:
            for _ in range(rng.randint(1, 3)):
                flip(t, placed[key], rng.randrange(bb), rng)
        assert not t.check()["ok"]
        ok = verify(t, placed, aligned)          # asserts every ok block is byte-identical
        for key, good in zip(placed, ok):
            assert good == (key not in victims), f"round {rnd}: {key.hex()} good={good}"
        detected += len(victims)
        # flipped blocks are gone from the index; rewrite them to start the next round clean
        assert verify(t, {key: placed[key] for key in victims}, aligned) == [False] * len(victims)
        t.discard(victims, [placed[key] for key in victims])
        t.free([placed.pop(key) for key in victims])
        placed.update(put(t, [int.from_bytes(key, "little") for key in victims], aligned=aligned))
        assert t.check()["ok"]
    assert t.stats()["corrupt_blocks"] == detected


def test_flips_found_by_check_and_dropped_after_restart(tmp_path):
    rng = random.Random(7)
    t = make(tmp_path, bb=8192, slots=16, per_slab=4)
    placed = put(t, range(16))
    t.close()
    bad = set(rng.sample(sorted(placed), 5))
    t = make(tmp_path, bb=8192, slots=16, per_slab=4)
    for key in bad:
        flip(t, placed[key], rng.randrange(8192), rng)
    report = t.check()
    assert not report["ok"] and report["bad_blocks"] == 5
    found = dict(t.recover())
    ok = verify(t, found)
    assert {key for key, good in zip(found, ok) if not good} == bad


def test_block_moved_to_another_slot_is_not_returned(tmp_path):
    """Bytes copied over another slot (a misdirected write, a stale index) fail the checksum."""
    t = make(tmp_path, bb=8192, slots=8, per_slab=8)
    placed = put(t, range(2))
    g = t.geometry
    path = os.path.join(t.path, "slab-00000.kvt")
    with open(path, "r+b") as f:
        f.seek(g.offset_of(placed[k(0)]))
        raw = f.read(g.slot_bytes)
        f.seek(g.offset_of(placed[k(1)]))
        f.write(raw)
    dst = bytearray(8192)
    assert t.read([k(1)], [placed[k(1)]], [memoryview(dst)]) == [False]
    assert t.read([k(0)], [placed[k(0)]], [memoryview(dst)]) == [True]
    assert bytes(dst) == block(k(0), 8192)
