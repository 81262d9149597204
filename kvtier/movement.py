"""How blocks move between tiers: eviction, demotion and promotion.

:class:`TierMovement` is built by :class:`~kvtier.cache.TieredCache`, which
passes in everything it touches: the :class:`~kvtier.index.BlockIndex` (tiers,
entries, policies), the staging pool, the TransferEngine, the cache's lock, its
stats counter and its listeners.  The cache calls, with its lock held:

    reserve(t, n)          up to n slots in tier t, evicting unprotected blocks;
                           a victim's demotion is queued before it leaves the
                           index (listeners hear ``evicted``)
    copy_down(t, d, items, through)
                           copy blocks into staging and queue their write to tier d
                           (write-through: lease them, and the transfer thread copies)
    promote(t, items)      queue the read of tier-t blocks into their top-tier
                           slots; returns the job a load waits for
    moving(key), num_moving
                           whether a block is on its way down (held in staging),
                           and how many are

Staging full: a demotion is never dropped unless the cache was built with
``staging_full="drop"``.  Instead the block is written from the slot it
already has ("in place", counted as ``<lower>.demotions_in_place``): an
evicted block keeps its slot until the write is done, so ``reserve`` hands
out fewer slots meanwhile (and evicts no more for slots that are on their way
to being freed); a write-through block stays leased until it is written.
That is the back-pressure: the tier above waits for the tier below.

The transfer-thread bodies below take the lock only to change the index:

    _write_down / _written_down
                           write staged blocks into the lower tier; publish them
                           (``demoted``) or roll back
    _read_up / _promoted   read blocks into their top-tier slots; publish them
                           (``promoted``) or doom the top-tier copy (a block the
                           lower tier could not read back is ``dropped`` there)
"""
from __future__ import annotations

import threading
from collections import Counter
from typing import Sequence

from . import native
from .errors import TierIOError
from .index import PENDING, PROMOTING, READY, BlockIndex, Entry
from .jobs import Job, TransferEngine
from .listeners import Listeners
from .staging import StagingPool
from .tiers.base import Tier

_LEASED, _COPYING, _DONE = "leased", "copying", "done"


class _InPlace:
    """A block written down from its own slot: evicted (the slot is freed after the
    write) or write-through (the entry is leased until the write)."""
    __slots__ = ("key", "entry", "slot", "evicted")

    def __init__(self, key: bytes, entry: Entry, slot: int, evicted: bool):
        self.key, self.entry, self.slot, self.evicted = key, entry, slot, evicted


class _StagedCopy:
    """A write-through block, leased until its bytes are copied into a staging slot."""
    __slots__ = ("key", "entry", "slot", "state")

    def __init__(self, key: bytes, entry: Entry, slot: int):
        self.key, self.entry, self.slot, self.state = key, entry, slot, _LEASED


def _waiting(e: Entry) -> "_StagedCopy | None":
    """The entry's staging copy, if nobody has started making it yet."""
    return e.staging if e.staging is not None and e.staging.state == _LEASED else None


class TierMovement:
    """Eviction, demotion and promotion between a cache's tiers (see module docstring)."""

    def __init__(self, index: BlockIndex, staging: StagingPool, engine: TransferEngine, lock: threading.RLock,
                 stats: Counter, events: Listeners, *, block_bytes: int, stores_bytes: bool,
                 drop_when_full: bool = False):
        """``staging``: a pool of ``block_bytes`` slots for blocks in flight;
        ``stores_bytes`` False: metadata only, no bytes are copied;
        ``drop_when_full``: drop (and count) demotions staging has no room for,
        instead of writing them from their own slots."""
        self._index = index
        self._tiers = index.tiers
        self._policies = index.policies
        self._admission = [t.admission for t in self._tiers]   # taken once, as the cache does
        self._staging = staging
        self._engine = engine
        self._lock = lock
        self._stats = stats
        self._events = events
        self._block_bytes = block_bytes
        self._bytes = stores_bytes
        self._drop_when_full = drop_when_full
        self._inflight: dict[bytes, int | None] = {}   # key -> staging slot (None: in place), while moving down
        self._held = [0] * len(self._tiers)            # evicted slots per tier, freed when written down

    # ---- what the cache calls (lock held) ----------------------------------------------
    def moving(self, key: bytes) -> bool:
        """Whether ``key`` is on its way down (staged, not yet written)."""
        return key in self._inflight

    @property
    def num_moving(self) -> int:
        return len(self._inflight)

    def reserve(self, t: int, n: int) -> list[int]:
        """Up to n slots in tier t, evicting (and demoting) unprotected blocks."""
        tier, policy = self._tiers[t], self._policies[t]
        if tier.num_slots is None:
            return [0] * n
        short = n - tier.num_free - self._held[t]      # slots being written down free up soon
        if short > 0:
            index = self._index[t]

            def protected(k: bytes) -> bool:
                e = index.get(k)
                if e is None or e.state != READY:
                    return True
                return e.leases > (1 if _waiting(e) else 0)      # a waiting copy is made on eviction
            victims = policy.evict(short, protected)
            if victims is None:                    # not all: take what can be had
                victims = []
                while len(victims) < short:
                    one = policy.evict(1, protected)
                    if not one:
                        break
                    victims += one
            if victims:
                self._evict(t, victims)
        return tier.allocate(min(n, tier.num_free)) or []

    def copy_down(self, t: int, down: int, items: Sequence[tuple[bytes, Entry]], through: bool = False) -> set[bytes]:
        """Copy blocks of tier t into staging and queue their write to tier ``down``.

        Demotions pass the lower tier's policy and admission filter; write-through
        copies pass only the policy.  An evicted block's slot is reused at once, so
        its bytes are copied here; a write-through block stays where it is, so it is
        leased instead and the transfer thread copies it (the caller, an engine's
        scheduler completing a store, does not wait for the copy).  Without room in
        staging a block is written from its own slot (see the module docstring);
        returns the evicted blocks that keep their slot until then.
        """
        lower, src = self._tiers[down], self._tiers[t]
        policy = self._policies[down]
        admission = None if through else self._admission[down]
        batch = []
        leased: list[_StagedCopy] = []
        for key, e in items:
            if key in self._inflight or self._index.holds(key, down):
                continue                           # already below (or on its way)
            if (policy is not None and not policy.admit(key, e.pos)) or \
                    (admission is not None and not admission.admit(key)):
                self._stats[f"{lower.name}.not_admitted"] += 1
                continue
            got = self._staging.allocate(1)
            if not got:
                if self._drop_when_full:
                    self._stats[f"{lower.name}.demotions_dropped"] += 1
                    continue
                self._stats[f"{lower.name}.demotions_in_place"] += 1
                held = _InPlace(key, e, e.slot, evicted=not through)
                if through:
                    e.leases += 1                  # its bytes stay put until they are written
                else:
                    self._held[t] += 1
                self._inflight[key] = None
                batch.append((key, None, e.pos, held))
                continue
            if self._bytes and through:
                e.leases += 1                      # its bytes stay put until the copy is made
                e.staging = _StagedCopy(key, e, got[0])
                leased.append(e.staging)
            elif self._bytes:
                self._stage_one(src, key, e, got[0])
            self._inflight[key] = got[0]
            batch.append((key, got[0], e.pos, None))
        if batch:
            def done(job: Job) -> None:
                self._unlease_staged(t, leased)    # the copy never ran: let go of the blocks
                self._written_down(job, t, down, batch)
            self._engine.submit(f"demote {src.name}->{lower.name}",
                                lambda: self._write_down(down, batch, t, leased), done)
        return {b[3].key for b in batch if b[3] is not None and b[3].evicted}

    def promote(self, t: int, items: list[tuple[bytes, Entry, Entry]]) -> Job:
        """Queue the read of tier-t blocks into top-tier slots.

        ``items``: (key, leased tier-t entry, PROMOTING top-tier entry).  When the
        job finishes the tier-t leases are released and each top-tier entry is
        READY or doomed; a still-PROMOTING entry carries the job in ``Entry.job``.
        """
        job = self._engine.submit(f"promote {self._tiers[t].name}->{self._tiers[0].name}",
                                  lambda: self._read_up(t, items),
                                  lambda job: self._promoted(job, t, items))
        for _, _, e in items:
            if e.state == PROMOTING:
                e.job = job
        return job

    # ---- eviction ---------------------------------------------------------------------
    def _evict(self, t: int, victims: list[bytes]) -> None:
        tier, index = self._tiers[t], self._index[t]
        self._stats[f"{tier.name}.evicted_blocks"] += len(victims)
        down = t + 1 if t + 1 < len(self._tiers) else None
        moving = []
        for key in victims:
            e = index[key]
            copy = _waiting(e)
            if copy is not None:                   # its write-through copy cannot wait: make it now
                self._stage_one(tier, key, e, copy.slot)
                self._finish_staged(t, copy)
            if down is not None and not self._tiers[down].write_through:
                moving.append((key, e))
        in_place = self.copy_down(t, down, moving) if moving else set()
        slots = [index.pop(key).slot for key in victims]
        tier.discard(victims, slots)
        tier.free([s for key, s in zip(victims, slots) if key not in in_place])
        self._events.emit("evicted", tier, victims)

    # ---- demotion ---------------------------------------------------------------------
    def _stage_one(self, src: Tier, key: bytes, e: Entry, st: int) -> None:
        if src.addressable and src.medium == "host":
            native.memcpy(self._staging.view(st), src.view(e.slot))
        else:
            src.read([key], [e.slot], [self._staging.view(st)])

    def _finish_staged(self, t: int, copy: _StagedCopy) -> None:
        """(lock held) A write-through copy was made (or will never be): release its lease."""
        copy.state = _DONE
        if copy.entry.staging is copy:
            copy.entry.staging = None
        self._index.unlease(t, copy.entry)

    def _unlease_staged(self, t: int, leased: list[_StagedCopy]) -> None:
        with self._lock:
            for copy in leased:
                if copy.state == _LEASED:
                    self._finish_staged(t, copy)

    def _write_down(self, down: int, batch, t: int = 0, leased: Sequence[_StagedCopy] = ()) -> list[bool]:
        """Transfer thread: copy leased blocks into staging (releasing them), reserve
        slots in the lower tier and write the staged bytes."""
        for copy in leased:
            with self._lock:
                if copy.state != _LEASED:          # an eviction made this copy already
                    continue
                copy.state = _COPYING              # protected from eviction while it runs
            try:
                self._stage_one(self._tiers[t], copy.key, copy.entry, copy.slot)
            finally:
                with self._lock:
                    self._finish_staged(t, copy)
        lower = self._tiers[down]
        with self._lock:
            slots = self.reserve(down, len(batch))
            for (key, _, pos, _), slot in zip(batch, slots):
                self._index[down][key] = Entry(slot, PENDING, pos)
        keys = [k for k, _, _, _ in batch[:len(slots)]]
        if not self._bytes:
            return [True] * len(slots)
        views = [self._staging.view(st) if st is not None else self._own_bytes(self._tiers[t], held)
                 for _, st, _, held in batch[:len(slots)]]
        return lower.write(keys, slots, views)

    def _own_bytes(self, src: Tier, held: _InPlace):
        """A block written from its own slot: the slot itself, or a copy of it where the
        tier's memory is not host memory (a GPU pool)."""
        if src.addressable and src.medium == "host":
            return src.view(held.slot)
        buf = memoryview(bytearray(self._block_bytes))
        if not src.read([held.key], [held.slot], [buf])[0]:
            raise TierIOError(f"{src.name}: slot {held.slot} could not be read for its demotion")
        return buf

    def _written_down(self, job: Job, t: int, down: int, batch) -> None:
        lower, policy = self._tiers[down], self._policies[down]
        with self._lock:
            results: dict[bytes, bool] = {}
            if isinstance(job.result, list):
                for (key, _, _, _), good in zip(batch, job.result):
                    results[key] = good
            published = []
            for key, st, pos, held in batch:
                self._inflight.pop(key, None)
                if st is not None:
                    self._staging.free([st])
                elif held.evicted:                 # its slot was kept for this write
                    self._held[t] -= 1
                    self._tiers[t].free([held.slot])
                else:
                    self._index.unlease(t, held.entry)
                e = self._index[down].get(key)
                if e is None or e.state != PENDING:
                    continue
                if job.ok and results.get(key):
                    e.state = READY
                    if policy is not None:
                        policy.insert(key, pos)
                    self._stats[f"{lower.name}.stored_blocks"] += 1
                    self._stats[f"{lower.name}.bytes_in"] += self._block_bytes
                    published.append(key)
                else:
                    del self._index[down][key]
                    lower.free([e.slot])
                    self._stats[f"{lower.name}.failed_writes"] += 1
            self._events.emit("demoted", lower, published)

    # ---- promotion --------------------------------------------------------------------
    def _read_up(self, t: int, items) -> list[bool]:
        """Transfer thread: read blocks from tier t straight into their top-tier slots."""
        src, top = self._tiers[t], self._tiers[0]
        keys = [k for k, _, _ in items]
        if not self._bytes:
            return [True] * len(items)
        if top.medium == "host":
            dsts = [top.view(e.slot) for _, _, e in items]
            return src.read(keys, [s.slot for _, s, _ in items], dsts)
        # a non-host top tier (gpu): go through staging
        stage = self._staging.allocate(len(items))
        if stage is None:
            raise TierIOError("staging pool exhausted")
        try:
            views = [self._staging.view(s) for s in stage]
            ok = src.read(keys, [s.slot for _, s, _ in items], views)
            good = [i for i, o in enumerate(ok) if o]
            top.write([keys[i] for i in good], [items[i][2].slot for i in good], [views[i] for i in good])
            return ok
        finally:
            self._staging.free(stage)

    def _promoted(self, job: Job, t: int, items) -> None:
        ok = job.result if job.ok else [False] * len(items)
        name = self._tiers[t].name
        with self._lock:
            published = []
            for (key, src, e), good in zip(items, ok):
                e.job = None
                self._index.unlease(t, src)
                if good and e.state == PROMOTING:
                    e.state = READY
                    self._policies[0].insert(key, e.pos)
                    self._stats[f"{name}.promoted_blocks"] += 1
                    self._stats[f"{name}.bytes_out"] += self._block_bytes
                    published.append(key)
                    continue
                self._stats[f"{name}.failed_reads"] += 1
                if not good and job.ok:        # the tier dropped it (corrupt or vanished)
                    self._index.drop(t, key)
                self._index.doom(0, key, e)
            self._events.emit("promoted", self._tiers[0], published)
