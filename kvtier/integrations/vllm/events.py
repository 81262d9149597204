"""BlockStored / BlockRemoved events for vLLM's KV event stream.

kvtier keys are salted vLLM block hashes, so an event can name the block the
way vLLM's own prefix cache does.  :class:`EventedCache` is a TieredCache that
records where blocks appear and disappear (stores, demotions, promotions,
evictions, drops of corrupt blocks); :class:`EventLog` turns those records into
``BlockStored``/``BlockRemoved`` for ``take_events``.

TieredCache has no public listener hook yet, so the cache's eviction and
transfer completions are observed by overriding them here; each override calls
the original first and only reads the index afterwards.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from vllm.distributed.kv_events import MEDIUM_CPU, MEDIUM_STORAGE, BlockRemoved, BlockStored, KVCacheEvent
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from ...cache import TieredCache
from ...handles import READY

_MEDIUM = {"host": (MEDIUM_CPU, None), "disk": (MEDIUM_STORAGE, "LOCAL"), "remote": (MEDIUM_STORAGE, "REMOTE")}


class EventedCache(TieredCache):
    """A TieredCache that appends ``(stored: bool, tier medium, key)`` records to ``self.records``."""

    records: list

    def _note(self, stored: bool, t: int, keys) -> None:
        medium = self.tiers[t].medium
        with self._lock:
            recs = getattr(self, "records", None)
            if recs is None:
                recs = self.records = []
            recs.extend((stored, medium, k) for k in keys)

    def _evict(self, t, victims):
        super()._evict(t, victims)
        self._note(False, t, victims)

    def _drop(self, t, key):
        had = key in self._index[t]
        super()._drop(t, key)
        if had:
            self._note(False, t, [key])

    def _written_down(self, job, down, batch):
        super()._written_down(job, down, batch)
        index = self._index[down]
        self._note(True, down, [k for k, _, _ in batch if k in index and index[k].state == READY])

    def _promoted(self, job, t, items):
        super()._promoted(job, t, items)
        self._note(True, 0, [k for k, _, e in items if e.state == READY])

    def take_records(self) -> list:
        with self._lock:
            recs = getattr(self, "records", None) or []
            self.records = []
        return recs


class EventLog:
    """Maps kvtier keys back to vLLM block hashes and builds the events."""

    def __init__(self, block_tokens: int, max_keys: int):
        self.block_tokens = block_tokens
        self.max_keys = max(1, max_keys)
        self._hashes: OrderedDict[bytes, bytes] = OrderedDict()
        self._pending: list[KVCacheEvent] = []
        self._lock = threading.Lock()

    def remember(self, keys, hashes) -> None:
        with self._lock:
            for k, h in zip(keys, hashes):
                self._hashes[k] = h
                self._hashes.move_to_end(k)
            while len(self._hashes) > self.max_keys:
                self._hashes.popitem(last=False)

    def stored(self, hashes, parent, token_ids) -> None:
        """Blocks just published in the host tier by a store of this engine."""
        if not hashes:
            return
        with self._lock:
            self._pending.append(BlockStored(
                block_hashes=[maybe_convert_block_hash(h) for h in hashes],
                parent_block_hash=maybe_convert_block_hash(parent) if parent is not None else None,
                token_ids=list(token_ids), block_size=self.block_tokens, lora_id=None,
                medium=MEDIUM_CPU, lora_name=None))

    def add_records(self, records) -> None:
        """Tier movements recorded by an EventedCache."""
        with self._lock:
            for stored, medium, key in records:
                h = self._hashes.get(key)
                if h is None:
                    continue
                name, locality = _MEDIUM.get(medium, (MEDIUM_STORAGE, None))
                if stored:
                    ev = BlockStored(block_hashes=[maybe_convert_block_hash(h)], parent_block_hash=None,
                                     token_ids=[], block_size=self.block_tokens, lora_id=None,
                                     medium=name, lora_name=None, locality=locality)
                else:
                    ev = BlockRemoved(block_hashes=[maybe_convert_block_hash(h)], medium=name, locality=locality)
                self._pending.append(ev)

    def take(self) -> list[KVCacheEvent]:
        with self._lock:
            out, self._pending = self._pending, []
        return out
