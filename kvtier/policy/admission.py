"""Admission filters: keep blocks that were used once off a slow, wearing tier.

:class:`TinyLFU` estimates how often each key was used recently with a
count-min sketch (4 rows of small saturating counters) in front of which sits a
doorkeeper (a Bloom filter): a key's first use only sets its doorkeeper bits,
later uses count in the sketch.  So the common one-hit block costs one bit, not
four counters.  Every ``sample_size`` recorded uses the filter ages: all
counters are halved and the doorkeeper is cleared, so old popularity fades.

A key is admitted when its estimated use count reaches ``min_uses`` (2: a
block stored once and never asked for again stays off the SSD).

Keys are kvtier BlockKeys (16 bytes of a cryptographic hash), so the sketch
takes its row indexes straight from the key's bytes; no hashing is needed.

The cache calls :meth:`record` for every block a request stores or loads, and
:meth:`admit` when a block evicted from the tier above would be written here.
"""
from __future__ import annotations

import threading
from typing import Sequence

import numpy as np

from ..errors import ConfigError

ROWS = 4
MAX_COUNT = 15


def _pow2_at_least(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())


class TinyLFU:
    """Frequency admission: count-min sketch + doorkeeper, with periodic aging."""

    def __init__(self, capacity: int, *, min_uses: int = 2, sample_factor: int = 10):
        if not isinstance(capacity, int) or capacity <= 0:
            raise ConfigError("admission capacity", capacity, "a positive number of blocks")
        if not isinstance(min_uses, int) or min_uses < 1:
            raise ConfigError("admission.min_uses", min_uses, "an int >= 1")
        if not isinstance(sample_factor, int) or sample_factor < 1:
            raise ConfigError("admission.sample_factor", sample_factor, "an int >= 1")
        self.min_uses = min_uses
        self.width = _pow2_at_least(capacity)
        self.sample_size = sample_factor * self.width
        self._mask = self.width - 1
        self._sketch = np.zeros((ROWS, self.width), dtype=np.uint8)
        self._door_bits = _pow2_at_least(4 * self.width)
        self._door = np.zeros(self._door_bits, dtype=bool)
        self._additions = 0
        self._lock = threading.Lock()
        self.num_admitted = 0
        self.num_rejected = 0
        self.num_resets = 0

    def _cols(self, key: bytes) -> list[int]:
        return [int.from_bytes(key[4 * r:4 * r + 4], "little") & self._mask for r in range(ROWS)]

    def _door_idx(self, key: bytes) -> tuple[int, int]:
        m = self._door_bits - 1
        h = int.from_bytes(key[:8], "little") ^ int.from_bytes(key[8:16], "little")
        return h & m, (h >> 32) & m

    def _estimate(self, key: bytes) -> int:
        a, b = self._door_idx(key)
        door = 1 if self._door[a] and self._door[b] else 0
        return door + int(min(self._sketch[r, c] for r, c in enumerate(self._cols(key))))

    def estimate(self, key: bytes) -> int:
        """Recent uses of ``key`` (an over-estimate at worst, never an under-estimate until aging)."""
        with self._lock:
            return self._estimate(key)

    def record(self, keys: Sequence[bytes]) -> None:
        """Count one use of each key."""
        with self._lock:
            for key in keys:
                a, b = self._door_idx(key)
                if not (self._door[a] and self._door[b]):
                    self._door[a] = self._door[b] = True
                else:
                    cols = self._cols(key)
                    low = min(self._sketch[r, c] for r, c in enumerate(cols))
                    if low < MAX_COUNT:
                        for r, c in enumerate(cols):      # conservative update: raise only the minima
                            if self._sketch[r, c] == low:
                                self._sketch[r, c] = low + 1
                self._additions += 1
                if self._additions >= self.sample_size:
                    self._age()

    def _age(self) -> None:
        self._sketch >>= 1
        self._door[:] = False
        self._additions //= 2
        self.num_resets += 1

    def admit(self, key: bytes) -> bool:
        """May ``key`` enter the tier?"""
        with self._lock:
            yes = self._estimate(key) >= self.min_uses
            if yes:
                self.num_admitted += 1
            else:
                self.num_rejected += 1
            return yes

    def stats(self) -> dict:
        return {"admitted": self.num_admitted, "rejected": self.num_rejected, "resets": self.num_resets,
                "width": self.width}
