"""TieredCache: the one owner of "where does key K live, and what happens to it next".

Primitives, in lifecycle order:

    lookup(keys)                 longest stored prefix, and the tier of each block
    prepare_store(keys, owner)   reserve top-tier slots (evicting if needed);
                                 the blocks are PENDING: invisible to lookup
    complete_store(h, success)   publish them, or roll back
    prepare_load(keys, owner)    lease the stored prefix; blocks in lower tiers
                                 are promoted into top-tier slots in the background
    complete_load(h)             release the leases
    release(owner)               abort everything an owner still holds
    add_listener(listener)       hear where blocks appear and disappear
                                 (stored, demoted, promoted, evicted, dropped:
                                 see :mod:`kvtier.listeners`)

The index (:mod:`kvtier.index`) records every (tier, key); the movement
(:mod:`kvtier.movement`) reserves slots, evicts, demotes and promotes.
Eviction picks victims through each tier's EvictionPolicy.  A victim's bytes
are copied into a staging pool (:mod:`kvtier.staging`, grown on demand up to
``staging_bytes``: by default a quarter of the top tier) and its slot is freed
at once; the TransferEngine then writes it to the next tier (demotion) in the
background.  When the pool is at its bound the block is written from its own
slot instead, which stays taken until then: stores get fewer slots for a
while (back-pressure), and no demotion is lost.  ``staging_full="drop"``
drops such demotions instead (counted as ``<tier>.demotions_dropped``).
Leases and pending stores carry a deadline; an owner that disappears cannot
pin slots for longer than ``lease_timeout_s``.

One lock guards the index; bytes move outside it (the caller's copies into
handle views) or on transfer threads.  Listeners are called with it held.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import Counter, defaultdict
from typing import Hashable, Sequence

from .errors import CacheClosedError, ConfigError
from .handles import LoadHandle, Lookup, StoreHandle
from .index import PENDING, PROMOTING, READY, BlockIndex, Entry
from .jobs import TransferEngine
from .keys import Namespace, check_keys
from .listeners import CacheListener, Listeners
from .movement import TierMovement
from .policy import make_policy
from .staging import StagingPool, auto_bytes
from .tiers.base import Tier

STAGING_FULL = ("wait", "drop")

log = logging.getLogger(__name__)


class TieredCache:
    """An ordered stack of tiers (fastest first) behind one index."""

    def __init__(self, tiers: Sequence[Tier], policy: str | Sequence[str] = "lru", *,
                 lease_timeout_s: float = 30.0, staging_bytes: int | None = None,
                 staging_full: str = "wait", transfer_threads: int = 2,
                 namespace: Namespace | None = None, listeners: Sequence[CacheListener] = ()):
        """``staging_bytes``: the bound of the staging pool (None: a quarter of the top
        tier); ``staging_full``: "wait" (back-pressure, no demotion lost) or "drop"."""
        tiers = list(tiers)
        if not tiers:
            raise ConfigError("tiers", "[]", "at least one tier")
        if not tiers[0].addressable or tiers[0].num_slots is None:
            raise ConfigError("tiers[0]", tiers[0].name, "an addressable tier with slots (host or gpu)")
        bb = tiers[0].block_bytes
        for t in tiers:
            if t.block_bytes != bb:
                raise ConfigError(f"{t.name}.block_bytes", t.block_bytes, f"{bb}, like {tiers[0].name}")
        if len({t.name for t in tiers}) != len(tiers):
            raise ConfigError("tiers", [t.name for t in tiers], "distinct tier names")
        names = [policy] * len(tiers) if isinstance(policy, str) else list(policy)
        if len(names) != len(tiers):
            raise ConfigError("policy", names, f"one policy name or {len(tiers)} names")
        if not (isinstance(lease_timeout_s, (int, float)) and lease_timeout_s > 0):
            raise ConfigError("lease_timeout_s", lease_timeout_s, "a positive number of seconds")
        if staging_full not in STAGING_FULL:
            raise ConfigError("staging_full", staging_full, "one of " + ", ".join(STAGING_FULL))
        self.tiers = tiers
        self.namespace = namespace
        self.block_bytes = bb
        self.lease_timeout_s = float(lease_timeout_s)
        self._stats: Counter = Counter()
        self._lock = threading.RLock()
        self._events = Listeners(self._stats, listeners)
        policies = [make_policy(p, t.num_slots) if t.num_slots is not None else None
                    for p, t in zip(names, tiers)]
        self._index = BlockIndex(tiers, policies, self._events)
        self._policies = self._index.policies
        # admission filters of lower tiers (e.g. TinyLFU on disk), fed with every use of a block
        self._admission = [t.admission for t in tiers if t.admission is not None]
        stores_bytes = tiers[0].stores_bytes
        if staging_bytes is None:
            staging_bytes = auto_bytes(tiers[0].slot_bytes, tiers[0].num_slots)
        # no bytes to hold: as many slots as the top tier has
        self._staging = StagingPool(bb, staging_bytes, stores_bytes=stores_bytes,
                                    min_slots=0 if stores_bytes else tiers[0].num_slots)
        self._bytes = stores_bytes
        self._engine = TransferEngine(transfer_threads)
        self._moves = TierMovement(self._index, self._staging, self._engine, self._lock, self._stats,
                                   self._events, block_bytes=bb, stores_bytes=stores_bytes,
                                   drop_when_full=staging_full == "drop")
        self._deadlines: list[tuple[float, int, object]] = []
        self._seq = itertools.count()
        self._owners: dict[Hashable, set] = defaultdict(set)
        self._closed = False
        self._index.recover()

    # ---- construction from config --------------------------------------------------
    @classmethod
    def from_config(cls, cfg, namespace: Namespace, block_bytes: int, *,
                    listeners: Sequence[CacheListener] = ()) -> "TieredCache":
        """Build the tier stack a :class:`~kvtier.config.KVTierConfig` describes."""
        from .tiers.factory import build_tiers
        tiers, policies = build_tiers(cfg, namespace, block_bytes)
        return cls(tiers, policies, lease_timeout_s=cfg.lease_timeout_s,
                   staging_bytes=cfg.staging_bytes, staging_full=cfg.staging_full,
                   transfer_threads=cfg.transfer_threads, namespace=namespace, listeners=listeners)

    # ---- listeners -------------------------------------------------------------------
    def add_listener(self, listener: CacheListener) -> None:
        """Call ``listener`` on every later block event (contract: :mod:`kvtier.listeners`)."""
        self._check_open("add_listener")
        with self._lock:
            self._events.add(listener)

    def remove_listener(self, listener: CacheListener) -> None:
        """Stop calling ``listener``; unknown listeners are ignored."""
        self._check_open("remove_listener")
        with self._lock:
            self._events.remove(listener)

    # ---- lookup ---------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> Lookup:
        """The longest prefix of ``keys`` stored in any tier, and the tier of each block."""
        self._check_open("lookup")
        check_keys(keys)
        found: list[int] = []                    # tier index of each leading stored block
        with self._lock:
            self._expire()
            indexes = list(self._index)
            for key in keys:
                for t, index in enumerate(indexes):
                    e = index.get(key)
                    if e is not None and e.state is READY:
                        found.append(t)
                        break
                else:
                    break
        rest = list(keys[len(found):])
        for t, tier in enumerate(self.tiers):      # shared tiers: asked outside the lock
            if not rest or tier.num_slots is not None:
                continue
            n = self._ask(tier, rest)
            with self._lock:
                for key in rest[:n]:
                    self._index[t].setdefault(key, Entry(0, READY, 0))
            found += [t] * n
            rest = rest[n:]
        names = [t.name for t in self.tiers]
        where = [names[t] for t in found]
        with self._lock:
            self._stats["lookups"] += 1
            self._stats["lookup_blocks"] += len(keys)
            for t, count in Counter(found).items():
                self._stats[f"{names[t]}.hit_blocks"] += count
            self._stats["miss_blocks"] += len(keys) - len(found)
        return Lookup(len(where), tuple(where))

    def _ask(self, tier: Tier, keys: list[bytes]) -> int:
        """How many leading keys a shared tier holds; a failing tier holds none."""
        try:
            have = tier.contains(keys)
        except Exception as e:  # a dead peer is a miss
            self._stats[f"{tier.name}.errors"] += 1
            log.debug("%s: contains failed: %s", tier.name, e)
            return 0
        n = 0
        while n < len(keys) and have[n]:
            n += 1
        return n

    # ---- store ----------------------------------------------------------------------
    def prepare_store(self, keys: Sequence[bytes], owner: Hashable, start: int = 0) -> StoreHandle | None:
        """Reserve top-tier slots for the keys not stored yet; None if none can be.

        Keys already stored (or being stored) are skipped.  If the tier cannot
        make room for all of them, the leading ones get slots.
        """
        self._check_open("prepare_store")
        check_keys(keys)
        top, policy = self.tiers[0], self._policies[0]
        with self._lock:
            self._expire()
            self._record_use(keys)
            seen: set[bytes] = set()
            todo = []
            for i, key in enumerate(keys):
                if key in seen or self._present(key):
                    continue
                seen.add(key)
                if policy.admit(key, start + i):
                    todo.append(i)
                else:
                    self._stats[f"{top.name}.not_admitted"] += 1
            slots = self._moves.reserve(0, len(todo)) if todo else []
            if not slots:
                if todo:
                    self._stats["store_rejected_blocks"] += len(todo)
                return None
            self._stats["store_rejected_blocks"] += len(todo) - len(slots)
            todo = todo[:len(slots)]
            hkeys = [keys[i] for i in todo]
            for key, slot, i in zip(hkeys, slots, todo):
                self._index[0][key] = Entry(slot, PENDING, start + i)
            views = [top.view(s) for s in slots] if self._bytes else None
            h = StoreHandle(owner, hkeys, slots, todo, self._deadline(), views)
            self._track(h)
            return h

    def complete_store(self, handle: StoreHandle, success: bool) -> bool:
        """Publish the handle's blocks (or roll back). False if the handle had expired."""
        self._check_open("complete_store")
        with self._lock:
            if handle.closed:
                return False
            self._untrack(handle)
            index, policy = self._index[0], self._policies[0]
            if not success:
                self._rollback_store(handle)
                return True
            for key in handle.keys:
                e = index[key]
                e.state = READY
                policy.insert(key, e.pos)
            n = len(handle.keys)
            self._stats[f"{self.tiers[0].name}.stored_blocks"] += n
            self._stats[f"{self.tiers[0].name}.bytes_in"] += n * self.block_bytes
            self._events.emit("stored", self.tiers[0], handle.keys)
            for t in range(1, len(self.tiers)):
                if self.tiers[t].write_through:
                    self._moves.copy_down(0, t, [(k, index[k]) for k in handle.keys], through=True)
            return True

    def _rollback_store(self, handle: StoreHandle) -> None:
        index = self._index[0]
        for key in handle.keys:
            e = index.pop(key)
            self.tiers[0].free([e.slot])
        self._stats["store_failed_blocks"] += len(handle.keys)

    def _record_use(self, keys: Sequence[bytes]) -> None:
        for f in self._admission:
            f.record(keys)

    def _present(self, key: bytes) -> bool:
        return self._moves.moving(key) or self._index.holds(key)

    # ---- load -----------------------------------------------------------------------
    def prepare_load(self, keys: Sequence[bytes], owner: Hashable, start: int = 0) -> LoadHandle | None:
        """Lease the stored prefix of ``keys``; promote lower-tier blocks to the top tier.

        Returns None when the first key is not stored.  The handle covers the
        longest prefix that could be leased; poll ``ready()`` before copying.
        """
        self._check_open("prepare_load")
        check_keys(keys)
        with self._lock:
            self._expire()
            entries, slots, tiers, jobs = [], [], [], []
            promote: dict[int, list[tuple[bytes, Entry, Entry]]] = defaultdict(list)
            for i, key in enumerate(keys):
                top = self._index[0].get(key)
                if top is not None and top.state in (READY, PROMOTING):
                    top.leases += 1
                    if top.state == READY:
                        self._policies[0].access(key, start + i)
                    elif top.job is not None and top.job not in jobs:
                        jobs.append(top.job)
                    entries.append(top)
                    tiers.append(self.tiers[0].name)
                    continue
                t = self._index.find(key)
                if t is None:
                    break
                src = self._index[t][key]
                src.leases += 1                    # before reserving: the cascade may evict below
                got = self._moves.reserve(0, 1)
                if not got:
                    self._index.unlease(t, src)
                    break
                if self._policies[t] is not None:
                    self._policies[t].access(key, start + i)
                e = Entry(got[0], PROMOTING, start + i, leases=1)
                self._index[0][key] = e
                promote[t].append((key, src, e))
                entries.append(e)
                tiers.append(self.tiers[t].name)
            if not entries:
                self._stats["load_miss"] += 1
                return None
            for t, items in promote.items():
                job = self._moves.promote(t, items)
                if not job.done():
                    jobs.append(job)
            n = len(entries)
            hkeys = list(keys[:n])
            self._record_use(hkeys)
            slots = [e.slot for e in entries]
            views = [self.tiers[0].view(s) for s in slots] if self._bytes else None
            h = LoadHandle(owner, hkeys, slots, list(range(n)), self._deadline(), views,
                           entries, jobs, tuple(tiers))
            self._track(h)
            return h

    def complete_load(self, handle: LoadHandle, success: bool = True) -> bool:
        """Release the handle's leases. False if it had already expired or closed."""
        self._check_open("complete_load")
        with self._lock:
            if handle.closed:
                return False
            self._untrack(handle)
            self._release_load(handle)
            if success:
                self._stats["loaded_blocks"] += handle.num_ok
            return True

    def _release_load(self, handle: LoadHandle) -> None:
        for e in handle.entries:
            self._index.unlease(0, e)

    def discard(self, keys: Sequence[bytes]) -> int:
        """Forget stored blocks in every tier; returns how many copies were dropped.

        A leased copy leaves the index at once; its slot is freed when the last
        lease is released.  Blocks still pending or on their way down are left alone.
        """
        self._check_open("discard")
        check_keys(keys)
        n = 0
        with self._lock:
            for key in keys:
                for t in range(len(self.tiers)):
                    e = self._index[t].get(key)
                    if e is not None and e.state == READY:
                        self._index.drop(t, key)
                        n += 1
            self._stats["discarded_blocks"] += n
        return n

    # ---- leases, owners, deadlines ---------------------------------------------------
    def release(self, owner: Hashable) -> int:
        """Abort every handle ``owner`` still holds; returns how many."""
        self._check_open("release")
        with self._lock:
            handles = list(self._owners.pop(owner, ()))
            for h in handles:
                self._abort(h)
            return len(handles)

    def _deadline(self) -> float:
        return time.monotonic() + self.lease_timeout_s

    def _track(self, h) -> None:
        self._owners[h.owner].add(h)
        heapq.heappush(self._deadlines, (h.deadline, next(self._seq), h))

    def _untrack(self, h) -> None:
        h.closed = True
        hs = self._owners.get(h.owner)
        if hs is not None:
            hs.discard(h)
            if not hs:
                del self._owners[h.owner]

    def _abort(self, h) -> None:
        h.closed = True
        if isinstance(h, StoreHandle):
            self._rollback_store(h)
        else:
            self._release_load(h)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, h = heapq.heappop(self._deadlines)
            if h.closed:
                continue
            self._untrack(h)
            h.expired = True
            self._abort(h)
            self._stats["lease_timeouts"] += 1
            log.warning("lease of owner %r expired after %.1fs: released", h.owner, self.lease_timeout_s)

    # ---- housekeeping ---------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait for background demotions and promotions to finish."""
        self._check_open("flush")
        return self._engine.flush(timeout)

    def stats(self) -> dict:
        """A snapshot: counters plus per-tier occupancy."""
        self._check_open("stats")
        with self._lock:
            out = dict(self._stats)
            for t, tier in enumerate(self.tiers):
                out[f"{tier.name}.resident_blocks"], out[f"{tier.name}.leased_blocks"] = self._index.occupancy(t)
            out["inflight_blocks"] = self._moves.num_moving
            out.update({f"staging.{k}": v for k, v in self._staging.stats().items()})
            out["open_handles"] = sum(len(v) for v in self._owners.values())
            return out

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self, method: str) -> None:
        if self._closed:
            raise CacheClosedError(f"TieredCache.{method}() called after close(): the cache is closed")

    def close(self) -> None:
        """Finish background moves, close every tier; every other method then raises
        CacheClosedError.  A second close() does nothing."""
        if self._closed:
            return
        self._engine.flush(timeout=60)
        with self._lock:
            self._closed = True
        self._engine.close()
        for t in self.tiers:
            t.close()
        self._staging.close()

    def __enter__(self) -> "TieredCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
