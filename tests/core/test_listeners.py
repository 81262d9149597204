"""Cache listeners: every block event with the right tier and keys; a failing listener breaks nothing."""
from __future__ import annotations

import logging
import threading

import pytest

from kvtier import ConfigError, TieredCache
from kvtier.listeners import CacheListener
from kvtier.tiers import HostTier

from tests.helpers import block, k, load_and_verify

BB = 4096


class Recorder(CacheListener):
    """Every event as (event, tier name, [key ids]), and the thread it came on."""

    def __init__(self):
        self.events: list[tuple[str, str, list[int]]] = []
        self.threads: dict[str, set[str]] = {}

    def _note(self, event, tier, keys):
        self.events.append((event, tier.name, [int.from_bytes(x, "little") for x in keys]))
        self.threads.setdefault(event, set()).add(threading.current_thread().name)

    def stored(self, tier, keys):
        self._note("stored", tier, keys)

    def demoted(self, tier, keys):
        self._note("demoted", tier, keys)

    def promoted(self, tier, keys):
        self._note("promoted", tier, keys)

    def evicted(self, tier, keys):
        self._note("evicted", tier, keys)

    def dropped(self, tier, keys):
        self._note("dropped", tier, keys)

    def take(self):
        out, self.events = self.events, []
        return out


class Broken(CacheListener):
    """Raises on every event."""

    def __init__(self):
        self.calls = 0

    def _fail(self, tier, keys):
        self.calls += 1
        raise RuntimeError("listener bug")

    stored = demoted = promoted = evicted = dropped = _fail


class UnreadableTier(HostTier):
    """A host tier that cannot read back the keys in ``bad`` (as if they were corrupt)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.bad: set[bytes] = set()

    def read(self, keys, slots, dsts):
        ok = super().read(keys, slots, dsts)
        return [o and key not in self.bad for key, o in zip(keys, ok)]


def make(slots=(2, 4), threads=0, listeners=(), lower=HostTier) -> TieredCache:
    tiers = [HostTier("host", BB, slots[0], memory="pageable")]
    tiers += [lower(f"low{i}", BB, n, memory="pageable") for i, n in enumerate(slots[1:])]
    return TieredCache(tiers, "lru", transfer_threads=threads, listeners=listeners)


def store(cache, ids) -> None:
    h = cache.prepare_store([k(i) for i in ids], "w")
    assert h is not None
    for key, view in zip(h.keys, h.views):
        view[:] = block(key, BB)
    assert cache.complete_store(h, True)


def verify_load(cache, ids) -> int:
    """Load ids, check every byte of the blocks that came back; returns num_ok."""
    return load_and_verify(cache, ids, BB)


def test_store_evict_demote_promote_and_discard_events():
    rec = Recorder()
    c = make(listeners=[rec])
    store(c, [1, 2])
    assert rec.take() == [("stored", "host", [1, 2])]
    store(c, [3])                                   # host is full: 1 goes down to low0
    assert rec.take() == [("demoted", "low0", [1]), ("evicted", "host", [1]), ("stored", "host", [3])]
    assert verify_load(c, [1]) == 1                 # promoted back; 2 makes room for it
    assert rec.take() == [("demoted", "low0", [2]), ("evicted", "host", [2]), ("promoted", "host", [1])]
    assert c.discard([k(1)]) == 2                   # one copy in each tier
    assert rec.take() == [("dropped", "host", [1]), ("dropped", "low0", [1])]
    assert c.discard([k(9)]) == 0 and rec.take() == []
    c.close()


def test_a_block_the_lower_tier_cannot_read_is_dropped_not_promoted():
    rec = Recorder()
    c = make(listeners=[rec], lower=UnreadableTier)
    store(c, [1, 2])
    store(c, [3])                                   # 1 is demoted
    c.tiers[1].bad.add(k(1))
    rec.take()
    assert verify_load(c, [1]) == 0
    events = rec.take()
    assert ("dropped", "low0", [1]) in events
    assert not [e for e in events if e[0] == "promoted"]
    assert c.lookup([k(1)]).num_blocks == 0
    c.close()


def test_write_through_copies_are_demoted_events():
    rec = Recorder()
    c = make(slots=(4, 4), listeners=[rec])
    c.tiers[1].write_through = True
    store(c, [1, 2])
    assert rec.take() == [("stored", "host", [1, 2]), ("demoted", "low0", [1, 2])]
    c.close()


def test_transfer_events_fire_on_transfer_threads():
    rec = Recorder()
    c = make(threads=1, listeners=[rec])
    store(c, [1, 2])
    store(c, [3])                                   # 1 is demoted
    assert c.flush(10)
    assert verify_load(c, [1]) == 1
    assert c.flush(10)
    assert rec.threads["stored"] == {threading.current_thread().name}
    assert all(name.startswith("kvtier-xfer") for name in rec.threads["demoted"] | rec.threads["promoted"])
    assert ("promoted", "host", [1]) in rec.events
    c.close()


def test_add_and_remove_listener():
    rec = Recorder()
    c = make()
    store(c, [1])
    c.add_listener(rec)
    store(c, [2])
    c.remove_listener(rec)
    c.remove_listener(rec)                          # unknown: ignored
    store(c, [3])
    assert rec.events == [("stored", "host", [2])]
    c.close()


def test_a_listener_must_have_the_events():
    with pytest.raises(ConfigError) as e:
        make(listeners=[object()])
    assert e.value.key == "listeners"


@pytest.mark.parametrize("threads", [0, 1])
def test_a_raising_listener_breaks_no_store_and_no_load(threads, caplog):
    bad, rec = Broken(), Recorder()
    c = make(threads=threads, listeners=[bad, rec])    # the good one after the bad one still hears all
    with caplog.at_level(logging.DEBUG, logger="kvtier.listeners"):
        store(c, [1, 2])
        store(c, [3, 4])                            # evicts and demotes 1, 2
        assert c.flush(10)
        assert verify_load(c, [1, 2]) == 2          # promotes them back
        assert c.flush(10)
        assert c.discard([k(3)]) == 1
    assert c.lookup([k(i) for i in (1, 2)]).tiers == ("host", "host")
    assert c.lookup([k(4)]).tiers == ("low0",) and c.lookup([k(3)]).num_blocks == 0
    assert verify_load(c, [1, 2]) == 2 and verify_load(c, [4]) == 1
    assert bad.calls > 1
    s = c.stats()
    assert s["listener_errors"] == bad.calls
    assert s["low0.stored_blocks"] == 4 and s["low0.promoted_blocks"] == 3
    assert {e[0] for e in rec.events} == {"stored", "demoted", "evicted", "promoted", "dropped"}
    logged = [r for r in caplog.records if r.name == "kvtier.listeners" and r.levelno >= logging.WARNING]
    assert len(logged) == 1 and "listener bug" in caplog.text    # once, with its traceback
    c.close()
