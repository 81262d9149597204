"""S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO, a main FIFO and a
ghost list.  One-hit blocks leave through the small queue without disturbing
the main one, which makes the policy scan-resistant.
"""
from __future__ import annotations

from collections import OrderedDict

from . import EvictionPolicy, Protected, register_policy

_MAX_FREQ = 3


@register_policy
class S3FIFO(EvictionPolicy):
    name = "s3fifo"

    def __init__(self, capacity: int, small_fraction: float = 0.1):
        super().__init__(capacity)
        self._small_target = max(1, int(capacity * small_fraction))
        self._small: OrderedDict[bytes, int] = OrderedDict()   # key -> freq
        self._main: OrderedDict[bytes, int] = OrderedDict()
        self._ghost: OrderedDict[bytes, None] = OrderedDict()

    def insert(self, key: bytes, pos: int = 0) -> None:
        if key in self._small or key in self._main:
            return
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = 0
        else:
            self._small[key] = 0

    def access(self, key: bytes, pos: int = 0) -> None:
        if key in self._small:
            self._small[key] = min(self._small[key] + 1, _MAX_FREQ)
        elif key in self._main:
            self._main[key] = min(self._main[key] + 1, _MAX_FREQ)

    def remove(self, key: bytes) -> None:
        self._small.pop(key, None)
        self._main.pop(key, None)

    def evict(self, n: int, protected: Protected) -> list[bytes] | None:
        if n <= 0:
            return []
        victims: list[bytes] = []
        # Every resident key can be looked at a bounded number of times
        # (frequencies only go down), so this loop terminates.
        budget = (len(self) + 1) * (_MAX_FREQ + 2)
        small_stuck = 0                    # protected keys seen in a row at the small head
        while len(victims) < n and budget > 0 and (self._small or self._main):
            budget -= 1
            use_small = self._small and (len(self._small) >= self._small_target or not self._main)
            if use_small and small_stuck >= len(self._small) and self._main:
                use_small = False          # the whole small queue is protected
            if use_small:
                key, freq = self._small.popitem(last=False)
                if protected(key):
                    self._small[key] = freq
                    small_stuck += 1
                    continue
                small_stuck = 0
                if freq > 0:
                    self._main[key] = 0
                else:
                    victims.append(key)
                    self._ghost[key] = None
                    if len(self._ghost) > self.capacity:
                        self._ghost.popitem(last=False)
            else:
                key, freq = self._main.popitem(last=False)
                if protected(key):
                    self._main[key] = freq
                elif freq > 0:
                    self._main[key] = freq - 1
                else:
                    victims.append(key)
        if len(victims) < n:               # not enough evictable: put them back, evict nothing
            for key in victims:
                self._ghost.pop(key, None)
                self._main[key] = 0
            return None
        return victims

    def __len__(self) -> int:
        return len(self._small) + len(self._main)

    def __contains__(self, key: bytes) -> bool:
        return key in self._small or key in self._main
