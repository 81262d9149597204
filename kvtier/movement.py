"""How blocks move between tiers: eviction, demotion and promotion.

Mixed into :class:`~kvtier.cache.TieredCache`, whose lock, index, policies,
staging pool and TransferEngine it uses; every method here runs with the
cache's lock held, except the two transfer-thread bodies (``_write_down``,
``_promote``), which take it only to change the index.

    _reserve(t, n)       up to n slots in tier t, evicting unprotected blocks
    _evict(t, victims)   drop victims from tier t, demoting them first
    _copy_down(t, d, …)  copy blocks into staging and queue their write to tier d
                         (write-through: lease them, and the transfer thread copies)
    _write_down / _written_down
                         transfer thread: write staged blocks; publish or roll back
    _promote / _promoted transfer thread: read lower-tier blocks into top-tier slots
"""
from __future__ import annotations

from typing import Sequence

from . import _native
from .errors import TierIOError
from .handles import PENDING, PROMOTING, READY, Entry
from .transfer import Job


_LEASED, _COPYING, _DONE = "leased", "copying", "done"


class _StagedCopy:
    """A write-through block, leased until its bytes are copied into a staging slot."""
    __slots__ = ("key", "entry", "slot", "state")

    def __init__(self, key: bytes, entry: Entry, slot: int):
        self.key, self.entry, self.slot, self.state = key, entry, slot, _LEASED


def _waiting(e: Entry) -> "_StagedCopy | None":
    """The entry's staging copy, if nobody has started making it yet."""
    return e.staging if e.staging is not None and e.staging.state == _LEASED else None


class TierMovement:
    """Eviction, demotion and promotion for TieredCache (see module docstring)."""

    def _reserve(self, t: int, n: int) -> list[int]:
        """Up to n slots in tier t, evicting (and demoting) unprotected blocks."""
        tier, policy = self.tiers[t], self._policies[t]
        if tier.num_slots is None:
            return [0] * n
        short = n - tier.num_free
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

    def _evict(self, t: int, victims: list[bytes]) -> None:
        tier, index = self.tiers[t], self._index[t]
        self._stats[f"{tier.name}.evicted_blocks"] += len(victims)
        down = t + 1 if t + 1 < len(self.tiers) else None
        moving = []
        for key in victims:
            e = index[key]
            copy = _waiting(e)
            if copy is not None:                   # its write-through copy cannot wait: make it now
                self._stage_one(tier, key, e, copy.slot)
                self._finish_staged(t, copy)
            if down is not None and not self.tiers[down].write_through:
                moving.append((key, e))
        if moving:
            self._copy_down(t, down, moving)
        slots = [index.pop(key).slot for key in victims]
        tier.discard(victims, slots)
        tier.free(slots)

    def _record_use(self, keys: Sequence[bytes]) -> None:
        for f in self._admission:
            if f is not None:
                f.record(keys)

    def _copy_down(self, t: int, down: int, items: list[tuple[bytes, Entry]], through: bool = False) -> None:
        """Copy blocks of tier t into staging and queue their write to tier ``down``.

        Demotions pass the lower tier's admission filter; write-through copies do not.
        An evicted block's slot is reused at once, so its bytes are copied here; a
        write-through block stays where it is, so it is leased instead and the
        transfer thread copies it (the caller, an engine's scheduler completing a
        store, does not wait for the copy).
        """
        lower, src = self.tiers[down], self.tiers[t]
        policy = self._policies[down]
        admission = None if through else self._admission[down]
        batch = []
        leased: list[_StagedCopy] = []
        for key, e in items:
            if key in self._inflight or any(key in self._index[d] for d in range(down, len(self.tiers))):
                continue                           # already below (or on its way)
            if (policy is not None and not policy.admit(key, e.pos)) or \
                    (admission is not None and not admission.admit(key)):
                self._stats[f"{lower.name}.not_admitted"] += 1
                continue
            got = self._staging.allocate(1)
            if not got:
                self._stats[f"{lower.name}.demotions_dropped"] += 1
                continue
            if self._bytes and through:
                e.leases += 1                      # its bytes stay put until the copy is made
                e.staging = _StagedCopy(key, e, got[0])
                leased.append(e.staging)
            elif self._bytes:
                self._stage_one(src, key, e, got[0])
            self._inflight[key] = got[0]
            batch.append((key, got[0], e.pos))
        if batch:
            def done(job: Job) -> None:
                self._unlease_staged(t, leased)    # the copy never ran: let go of the blocks
                self._written_down(job, down, batch)
            self._engine.submit(f"demote {src.name}->{lower.name}",
                                lambda: self._write_down(down, batch, t, leased), done)

    def _stage_one(self, src, key: bytes, e: Entry, st: int) -> None:
        if src.addressable and src.medium == "host":
            _native.memcpy(self._staging.view(st), src.view(e.slot))
        else:
            src.read([key], [e.slot], [self._staging.view(st)])

    def _finish_staged(self, t: int, copy: _StagedCopy) -> None:
        """(lock held) A write-through copy was made (or will never be): release its lease."""
        copy.state = _DONE
        if copy.entry.staging is copy:
            copy.entry.staging = None
        self._unlease(t, copy.key, copy.entry)

    def _unlease_staged(self, t: int, leased: list[_StagedCopy]) -> None:
        with self._lock:
            for copy in leased:
                if copy.state == _LEASED:
                    self._finish_staged(t, copy)

    def _write_down(self, down: int, batch, t: int = 0, leased: list[_StagedCopy] = ()) -> list[bool]:
        """Transfer thread: copy leased blocks into staging (releasing them), reserve
        slots in the lower tier and write the staged bytes."""
        for copy in leased:
            with self._lock:
                if copy.state != _LEASED:          # an eviction made this copy already
                    continue
                copy.state = _COPYING              # protected from eviction while it runs
            try:
                self._stage_one(self.tiers[t], copy.key, copy.entry, copy.slot)
            finally:
                with self._lock:
                    self._finish_staged(t, copy)
        lower = self.tiers[down]
        with self._lock:
            slots = self._reserve(down, len(batch))
            for (key, _, pos), slot in zip(batch, slots):
                self._index[down][key] = Entry(slot, PENDING, pos)
        views = [self._staging.view(st) for _, st, _ in batch[:len(slots)]] if self._bytes \
            else [None] * len(slots)
        keys = [k for k, _, _ in batch[:len(slots)]]
        return lower.write(keys, slots, views) if self._bytes else [True] * len(slots)

    def _written_down(self, job: Job, down: int, batch) -> None:
        lower, policy = self.tiers[down], self._policies[down]
        with self._lock:
            results: dict[bytes, bool] = {}
            if isinstance(job.result, list):
                for (key, _, _), good in zip(batch, job.result):
                    results[key] = good
            for key, st, pos in batch:
                self._inflight.pop(key, None)
                self._staging.free([st])
                e = self._index[down].get(key)
                if e is None or e.state != PENDING:
                    continue
                if job.ok and results.get(key):
                    e.state = READY
                    if policy is not None:
                        policy.insert(key, pos)
                    self._stats[f"{lower.name}.stored_blocks"] += 1
                    self._stats[f"{lower.name}.bytes_in"] += self.block_bytes
                else:
                    del self._index[down][key]
                    lower.free([e.slot])
                    self._stats[f"{lower.name}.failed_writes"] += 1

    def _promote(self, t: int, items) -> list[bool]:
        """Transfer thread: read blocks from tier t straight into their top-tier slots."""
        src, top = self.tiers[t], self.tiers[0]
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
        name = self.tiers[t].name
        with self._lock:
            for (key, src, e), good in zip(items, ok):
                e.job = None
                self._unlease(t, key, src)
                if good and e.state == PROMOTING:
                    e.state = READY
                    self._policies[0].insert(key, e.pos)
                    self._stats[f"{name}.promoted_blocks"] += 1
                    self._stats[f"{name}.bytes_out"] += self.block_bytes
                    continue
                self._stats[f"{name}.failed_reads"] += 1
                if not good and job.ok:        # the tier dropped it (corrupt or vanished)
                    self._drop(t, key)
                self._doom(0, key, e)
