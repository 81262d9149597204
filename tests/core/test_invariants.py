"""Property-based tests: allocator, policies and the cache keep their invariants
under any sequence of operations."""
from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvtier import TieredCache, make_policy
from kvtier.tiers import HostTier
from kvtier.tiers.base import SlotAllocator

from tests.helpers import block, k

POLICIES = ["lru", "s3fifo", "prefix", "adaptive"]


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 6)), max_size=200))
def test_no_slot_allocated_twice_and_capacity_never_exceeded(ops):
    a = SlotAllocator(16)
    held: list[int] = []
    for alloc, n in ops:
        if alloc:
            got = a.allocate(n)
            if got is None:
                assert n > 16 - len(held)
                continue
            assert len(set(got)) == n and not set(got) & set(held)
            held += got
        elif held:
            give, held = held[:n], held[n:]
            a.free(give)
        assert a.num_free == 16 - len(held)
        assert all(0 <= s < 16 for s in held)


@pytest.mark.parametrize("name", POLICIES)
@given(ops=st.lists(st.tuples(st.sampled_from("iaer"), st.integers(0, 30), st.integers(1, 5)), max_size=300),
       prot=st.sets(st.integers(0, 30), max_size=10))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
def test_policy_evict_is_all_or_nothing_and_never_protected(name, ops, prot):
    p = make_policy(name, 20)
    resident: set[bytes] = set()
    protected = {k(i) for i in prot}
    for op, i, n in ops:
        key = k(i)
        if op == "i" and key not in resident:
            p.insert(key, i)
            resident.add(key)
        elif op == "a":
            p.access(key, i)
        elif op == "r":
            p.remove(key)
            resident.discard(key)
        elif op == "e":
            before = set(resident)
            got = p.evict(n, lambda x: x in protected)
            evictable = before - protected
            if got is None:
                assert len(evictable) < n
                assert {x for x in resident if x in p} == resident
            else:
                assert len(got) == n == len(set(got))
                assert set(got) <= evictable
                resident -= set(got)
        assert len(p) == len(resident)
        assert all(x in p for x in resident)


class CacheMachine(RuleBasedStateMachine):
    """Random interleavings of the two-phase operations against a model."""

    BB = 256

    def __init__(self):
        super().__init__()
        tiers = [HostTier("t0", self.BB, 4, memory="pageable"), HostTier("t1", self.BB, 6, memory="pageable")]
        self.c = TieredCache(tiers, "s3fifo", transfer_threads=0)
        self.stores = []           # open store handles
        self.loads = []            # open load handles
        self.completed: set[bytes] = set()

    @rule(ids=st.lists(st.integers(0, 12), min_size=1, max_size=4))
    def prepare_store(self, ids):
        h = self.c.prepare_store([k(i) for i in ids], "w")
        if h is not None:
            for key, v in zip(h.keys, h.views):
                v[:] = block(key, self.BB)
            self.stores.append(h)

    @precondition(lambda self: self.stores)
    @rule(ok=st.booleans(), data=st.data())
    def complete_store(self, ok, data):
        h = self.stores.pop(data.draw(st.integers(0, len(self.stores) - 1)))
        self.c.complete_store(h, ok)
        if ok:
            self.completed |= set(h.keys)

    @rule(ids=st.lists(st.integers(0, 12), min_size=1, max_size=4))
    def prepare_load(self, ids):
        h = self.c.prepare_load([k(i) for i in ids], "r")
        if h is not None:
            self.loads.append(h)

    @precondition(lambda self: self.loads)
    @rule(data=st.data())
    def complete_load(self, data):
        h = self.loads.pop(data.draw(st.integers(0, len(self.loads) - 1)))
        assert h.ready()
        for key, v in zip(h.keys[:h.num_ok], h.views[:h.num_ok]):
            assert bytes(v) == block(key, self.BB)      # a leased block was never overwritten
        self.c.complete_load(h)

    @rule(ids=st.lists(st.integers(0, 12), min_size=1, max_size=6))
    def lookup(self, ids):
        keys = [k(i) for i in ids]
        n = self.c.lookup(keys).num_blocks
        assert set(keys[:n]) <= self.completed          # never a block whose store did not complete

    @invariant()
    def within_capacity(self):
        for t, tier in enumerate(self.c.tiers):
            assert tier.num_free >= 0
            ready = sum(1 for e in self.c._index[t].values())
            assert ready <= tier.num_slots

    def teardown(self):
        for h in self.loads:
            self.c.complete_load(h)
        for h in self.stores:
            self.c.complete_store(h, False)
        assert self.c.stats()["open_handles"] == 0
        for t, tier in enumerate(self.c.tiers):
            used = tier.num_slots - tier.num_free
            assert used == len(self.c._index[t])        # no leaked slot
        self.c.close()


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
