"""What the cache hands its callers: store and load handles, lookups (index entries: :mod:`kvtier.index`)."""
from __future__ import annotations

from dataclasses import dataclass

from .index import READY


@dataclass(frozen=True)
class Lookup:
    """Result of :meth:`TieredCache.lookup`: the stored prefix and where each block lives."""
    num_blocks: int
    tiers: tuple[str, ...]


class _Handle:
    __slots__ = ("owner", "keys", "slots", "positions", "deadline", "closed", "expired", "views")

    def __init__(self, owner, keys, slots, positions, deadline, views):
        self.owner = owner
        self.keys = keys
        self.slots = slots
        self.positions = positions
        self.deadline = deadline
        self.closed = False
        self.expired = False
        self.views = views

    def __len__(self) -> int:
        return len(self.keys)


class StoreHandle(_Handle):
    """Slots reserved by ``prepare_store``: copy each block into ``views[i]``,
    then call ``complete_store``.  ``positions[i]`` is the index in the keys
    passed to ``prepare_store`` of ``keys[i]`` (keys already stored are skipped).
    """
    __slots__ = ()


class LoadHandle(_Handle):
    """Blocks leased by ``prepare_load``.  Poll ``ready()``; then the first
    ``num_ok`` blocks may be copied out of ``views``; then ``complete_load``.
    """
    __slots__ = ("entries", "jobs", "tiers")

    def __init__(self, owner, keys, slots, positions, deadline, views, entries, jobs, tiers):
        super().__init__(owner, keys, slots, positions, deadline, views)
        self.entries = entries
        self.jobs = jobs
        self.tiers = tiers

    def ready(self) -> bool:
        """True once every promotion this load waits for has finished."""
        return all(j.done() for j in self.jobs)

    def wait(self, timeout: float | None = None) -> bool:
        for j in self.jobs:
            if not j.wait(timeout):
                return False
        return True

    @property
    def ok(self) -> list[bool]:
        """Per block: its bytes are in place (valid once ``ready()``)."""
        return [e.state == READY and not self.expired for e in self.entries]

    @property
    def num_ok(self) -> int:
        """Length of the leading run of blocks whose bytes are in place."""
        n = 0
        for good in self.ok:
            if not good:
                break
            n += 1
        return n
