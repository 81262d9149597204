"""GpuTier: a pool of HBM cut into fixed slots, the fastest tier of a stack.

For custom serving stacks that keep more KV on the GPU than the engine's own
paged cache: blocks move engine pages <-> pool slots as device-to-device
copies (``addresses()`` gives device pointers, so the span copiers of
:mod:`kvtier.gpu.copier` serves it like any other
addressable tier), and the cache demotes evicted blocks to the host tier and
promotes hits back through its staging pool (``read``/``write`` below).

The pool is one allocation made at construction.  ``device`` is a CUDA
ordinal, a ``"cuda:N"`` string, or ``"cpu"``: a CPU tensor stands in for HBM
so that the same tier, cache and copy engine run in CI without a GPU.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from ..errors import ConfigError, KVTierError, TierIOError
from ..layout import round_up
from .base import Tier

log = logging.getLogger(__name__)

SLOT_ALIGN = 256          # every slot starts 16-byte (vector) and 256-byte (DMA) aligned


def _device(name: str, device):
    import torch
    try:
        dev = torch.device(f"cuda:{device}" if isinstance(device, int) and not isinstance(device, bool)
                           else device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"{name}.device", device, "a CUDA device ordinal, 'cuda:N' or 'cpu'") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{name}.device", device, "a CUDA device, but this machine has none "
                              "(use device='cpu' to stand in for one)")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{name}.device", device, f"an ordinal below {torch.cuda.device_count()}")
        return torch.device("cuda", index)
    if dev.type != "cpu":
        raise ConfigError(f"{name}.device", device, "a CUDA device ordinal, 'cuda:N' or 'cpu'")
    return dev


class GpuTier(Tier):
    medium = "gpu"
    addressable = True

    def __init__(self, name: str, block_bytes: int, num_slots: int, device=0):
        super().__init__(name, block_bytes, num_slots)
        import torch
        self.device = _device(name, device)
        self.slot_bytes = round_up(block_bytes, SLOT_ALIGN)
        nbytes = self.slot_bytes * num_slots
        try:
            raw = torch.empty(nbytes + SLOT_ALIGN, dtype=torch.uint8, device=self.device)
        except (RuntimeError, MemoryError) as e:      # torch.OutOfMemoryError is a RuntimeError
            raise ConfigError(f"{name}.capacity_bytes", nbytes,
                              f"an amount of memory {self.device} can allocate ({e})") from e
        skew = -raw.data_ptr() % SLOT_ALIGN         # CPU allocations are only 64-byte aligned
        self.tensor = raw[skew:skew + nbytes]
        self._base = self.tensor.data_ptr()
        self._host = self.tensor.numpy() if self.device.type == "cpu" else None
        log.debug("%s: %d slots of %d bytes on %s", name, num_slots, self.slot_bytes, self.device)

    # ---- addressing --------------------------------------------------------------------
    def _check(self, slot: int) -> None:
        if self.tensor is None:
            raise KVTierError(f"{self.name}: tier is closed")
        if not 0 <= slot < self.num_slots:
            raise KVTierError(f"{self.name}: slot {slot} out of range [0, {self.num_slots})")

    def _slot(self, slot: int):
        self._check(slot)
        off = slot * self.slot_bytes
        return self.tensor[off:off + self.block_bytes]

    def addresses(self, slots: Sequence[int]) -> np.ndarray:
        """Device addresses of the slots (host addresses when standing in on the CPU)."""
        s = np.asarray(slots, dtype=np.int64)
        if self.tensor is None:
            raise KVTierError(f"{self.name}: tier is closed")
        if s.size and (s.min() < 0 or s.max() >= self.num_slots):
            raise KVTierError(f"{self.name}: slot out of range [0, {self.num_slots})")
        return np.uint64(self._base) + s.astype(np.uint64) * np.uint64(self.slot_bytes)

    def view(self, slot: int) -> memoryview | None:
        """Host-visible slots only (the CPU stand-in); device memory has no memoryview."""
        self._check(slot)
        if self._host is None:
            return None
        off = slot * self.slot_bytes
        return memoryview(self._host[off:off + self.block_bytes])

    # ---- bytes from and to host buffers (demotion, promotion) ---------------------------
    def write(self, keys, slots, srcs) -> list[bool]:
        import torch
        try:
            for slot, src in zip(slots, srcs):
                host = np.frombuffer(src, dtype=np.uint8, count=self.block_bytes)
                if not host.flags.writeable:
                    host = host.copy()
                self._slot(slot).copy_(torch.from_numpy(host))
            self._sync()
        except RuntimeError as e:           # a CUDA error: the tier failed as a whole
            raise TierIOError(f"{self.name}: write to {self.device} failed: {e}") from e
        return [True] * len(slots)

    def read(self, keys, slots, dsts) -> list[bool]:
        import torch
        try:
            for slot, dst in zip(slots, dsts):
                host = np.frombuffer(dst, dtype=np.uint8, count=self.block_bytes)
                torch.from_numpy(host).copy_(self._slot(slot))
            self._sync()
        except RuntimeError as e:
            raise TierIOError(f"{self.name}: read from {self.device} failed: {e}") from e
        return [True] * len(slots)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch
            torch.cuda.current_stream(self.device).synchronize()

    # ---- housekeeping ------------------------------------------------------------------
    def stats(self) -> dict:
        d = super().stats()
        d.update(device=str(self.device), slot_bytes=self.slot_bytes,
                 capacity_bytes=self.slot_bytes * self.num_slots)
        return d

    def close(self) -> None:
        self.tensor = None
        self._host = None
