"""The cache's index: one :class:`Entry` per (tier, key), and how entries leave it.

An entry's state, as the cache and its movement drive it:

    PENDING     slots reserved, bytes on their way (a store, a demotion's write):
                invisible to lookup, never evicted
    PROMOTING   a top-tier copy being read back from a lower tier for a load
    READY       visible to lookup; the tier's EvictionPolicy knows the key
    DOOMED      out of the index; its slot is freed when the last lease goes

:class:`BlockIndex` is not thread-safe: every caller holds the cache's lock.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:
    from .jobs import Job
    from .listeners import Listeners
    from .policy import EvictionPolicy
    from .tiers.base import Tier

log = logging.getLogger(__name__)

PENDING, READY, PROMOTING, DOOMED = "pending", "ready", "promoting", "doomed"


class Entry:
    """Where one key lives in one tier, and who is using it."""
    __slots__ = ("slot", "state", "leases", "pos", "job", "staging")

    def __init__(self, slot: int, state: str, pos: int, leases: int = 0):
        self.slot = slot
        self.state = state
        self.leases = leases
        self.pos = pos
        self.job: Job | None = None
        self.staging = None    # a write-through copy holding a lease on it (see kvtier.movement)


class BlockIndex:
    """Per tier, key -> Entry; with the tiers and their eviction policies (None: unmanaged)."""

    def __init__(self, tiers: Sequence[Tier], policies: Sequence[EvictionPolicy | None], events: Listeners):
        self.tiers = list(tiers)
        self.policies = list(policies)
        self._maps: list[dict[bytes, Entry]] = [{} for _ in self.tiers]
        self._events = events

    def __getitem__(self, t: int) -> dict[bytes, Entry]:
        """Tier t's entries, by key."""
        return self._maps[t]

    def __len__(self) -> int:
        return len(self._maps)

    def __iter__(self) -> Iterator[dict[bytes, Entry]]:
        return iter(self._maps)

    def recover(self) -> None:
        """Enter the blocks each tier kept from a previous process (READY, position 0)."""
        for t, tier in enumerate(self.tiers):
            for key, slot in tier.recover():
                self._maps[t][key] = Entry(slot, READY, 0)
                if self.policies[t] is not None:
                    self.policies[t].insert(key, 0)
            if self._maps[t]:
                log.info("%s: recovered %d blocks", tier.name, len(self._maps[t]))

    def occupancy(self, t: int) -> tuple[int, int]:
        """(READY entries, leased entries) of tier t."""
        entries = self._maps[t].values()
        return sum(1 for e in entries if e.state == READY), sum(1 for e in entries if e.leases)

    def find(self, key: bytes) -> int | None:
        """The first tier where ``key`` is READY, or None."""
        for t, index in enumerate(self._maps):
            e = index.get(key)
            if e is not None and e.state == READY:
                return t
        return None

    def holds(self, key: bytes, first: int = 0) -> bool:
        """Whether tier ``first`` or one below it has an entry for ``key``, in any state."""
        return any(key in self._maps[t] for t in range(first, len(self._maps)))

    def unlease(self, t: int, e: Entry) -> None:
        """Release one lease on ``e`` (in tier t); a doomed entry's slot goes with the last one."""
        e.leases -= 1
        if e.leases == 0 and e.state == DOOMED:
            self.tiers[t].free([e.slot])

    def doom(self, t: int, key: bytes, e: Entry) -> None:
        """Remove an entry from the index; its slot is freed when the last lease goes."""
        if self._maps[t].get(key) is e:
            del self._maps[t][key]
        if self.policies[t] is not None:
            self.policies[t].remove(key)
        e.state = DOOMED
        if e.leases == 0:
            self.tiers[t].free([e.slot])

    def drop(self, t: int, key: bytes) -> bool:
        """Make tier t forget ``key`` and doom its entry (listeners hear ``dropped``); False if absent."""
        e = self._maps[t].get(key)
        if e is None:
            return False
        self.tiers[t].discard([key], [e.slot])
        self.doom(t, key, e)
        self._events.emit("dropped", self.tiers[t], [key])
        return True
