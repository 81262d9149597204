"""Least-recently-used: the baseline every other policy is measured against."""
from __future__ import annotations

from collections import OrderedDict

from . import EvictionPolicy, Protected, register_policy


@register_policy
class LRU(EvictionPolicy):
    name = "lru"

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def insert(self, key: bytes, pos: int = 0) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def access(self, key: bytes, pos: int = 0) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def evict(self, n: int, protected: Protected) -> list[bytes] | None:
        victims: list[bytes] = []
        if n <= 0:
            return victims
        for key in self._order:           # oldest first
            if not protected(key):
                victims.append(key)
                if len(victims) == n:
                    break
        if len(victims) < n:
            return None
        for key in victims:
            del self._order[key]
        return victims

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: bytes) -> bool:
        return key in self._order
