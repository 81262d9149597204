"""BlockStored / BlockRemoved events for vLLM's KV event stream.

kvtier keys are salted vLLM block hashes, so an event can name the block the
way vLLM's own prefix cache does.  :class:`TierRecords` is a cache listener
(:mod:`kvtier.listeners`) that records where blocks appear and disappear
(demotions, promotions, evictions, drops of corrupt or discarded blocks);
:class:`EventLog` turns those records into ``BlockStored``/``BlockRemoved`` for
``take_events``.  Stores into the host tier are not recorded here: the
scheduler reports them itself, with their tokens (``EventLog.stored``).
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from vllm.distributed.kv_events import MEDIUM_CPU, MEDIUM_STORAGE, BlockRemoved, BlockStored, KVCacheEvent
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from ...listeners import CacheListener

_MEDIUM = {"host": (MEDIUM_CPU, None), "disk": (MEDIUM_STORAGE, "LOCAL"), "remote": (MEDIUM_STORAGE, "REMOTE")}


class TierRecords(CacheListener):
    """Records ``(stored: bool, tier medium, key)`` for blocks that appear in or leave a tier.

    The cache calls it under its lock, from the scheduler's thread and from
    transfer threads; ``take`` hands the records over in the order they came.
    """

    def __init__(self):
        self._records: list[tuple[bool, str, bytes]] = []
        self._lock = threading.Lock()

    def _note(self, stored: bool, tier, keys) -> None:
        with self._lock:
            self._records.extend((stored, tier.medium, k) for k in keys)

    def demoted(self, tier, keys) -> None:
        self._note(True, tier, keys)

    def promoted(self, tier, keys) -> None:
        self._note(True, tier, keys)

    def evicted(self, tier, keys) -> None:
        self._note(False, tier, keys)

    def dropped(self, tier, keys) -> None:
        self._note(False, tier, keys)

    def take(self) -> list[tuple[bool, str, bytes]]:
        with self._lock:
            out, self._records = self._records, []
        return out


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
        """Tier movements recorded by a :class:`TierRecords`."""
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
