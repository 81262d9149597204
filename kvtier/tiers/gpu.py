"""GpuTier: a pool of HBM cut into fixed slots, the fastest tier of a stack.

For custom serving stacks that keep more KV on the GPU than the engine's own
paged cache: blocks move engine pages <-> pool slots as device-to-device
copies (``addresses()`` gives device pointers, so
:class:`~kvtier.gpu.copier.KVCopier` serves it like any other addressable
tier, with ``buffer_device`` the pool's device and ``mechanism`` this tier's),
and the cache demotes evicted blocks to the host tier and promotes hits back
through its staging pool (``read``/``write`` below).  Those move a whole batch
of slots in one transfer of the same copier: the pool is itself a block
layout (one page per slot), the staging buffers are its slot buffers.

The pool is one allocation made at construction.  ``device`` is a CUDA
ordinal, a ``"cuda:N"`` string, or ``"cpu"``: a CPU tensor stands in for HBM
so that the same tier, cache and copy engine run in CI without a GPU.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from ..errors import ConfigError, KVTierError, TierIOError
from ..layout import BlockLayout, round_up
from .base import Tier

log = logging.getLogger(__name__)

SLOT_ALIGN = 256          # every slot starts 16-byte (vector) and 256-byte (DMA) aligned
MECHANISMS = ("auto", "dma", "kernel")


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

    def __init__(self, name: str, block_bytes: int, num_slots: int, device=0, mechanism: str = "auto"):
        super().__init__(name, block_bytes, num_slots)
        import torch
        if mechanism not in MECHANISMS:
            raise ConfigError(f"{name}.mechanism", mechanism, "one of " + ", ".join(MECHANISMS))
        self.device = _device(name, device)
        self.mechanism = mechanism if self.device.type == "cuda" else "auto"
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
        self._copier = None
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
    def copier(self):
        """The copier between this pool's slots (as engine pages) and host buffers.

        DMA when the tier's mechanism says so, else ``auto``: the kernel only
        runs where the host buffers are pinned, and the cost model decides.
        """
        if self._copier is None:
            from ..gpu.copier import KVCopier
            if self.tensor is None:
                raise KVTierError(f"{self.name}: tier is closed")
            pool = self.tensor.view(self.num_slots, self.slot_bytes)[:, :self.block_bytes]
            mech = "dma" if self.mechanism == "dma" else "auto"
            self._copier = KVCopier(BlockLayout([pool], 0), mech, buffer_device="cpu")
        return self._copier

    def _move(self, slots, bufs, to_pool: bool, what: str) -> list[bool]:
        if not len(slots):
            return []
        for s in slots:
            self._check(s)
        arrays = []
        for b in bufs:
            a = np.frombuffer(b, dtype=np.uint8, count=self.block_bytes)
            if not to_pool and not a.flags.writeable:
                raise KVTierError(f"{self.name}: read into a read-only buffer")
            arrays.append(a)                 # kept alive until the copy is done
        addrs = np.array([a.ctypes.data for a in arrays], dtype=np.uint64)
        c = self.copier()
        t = c.load(slots, addrs) if to_pool else c.store(slots, addrs)
        t.wait()
        if not t.ok:                         # a CUDA error: the tier failed as a whole
            raise TierIOError(f"{self.name}: {what} {self.device} failed: {t.error}")
        return [True] * len(slots)

    def write(self, keys, slots, srcs) -> list[bool]:
        """Host buffers -> pool slots, all in one transfer."""
        return self._move(slots, srcs, True, "write to")

    def read(self, keys, slots, dsts) -> list[bool]:
        """Pool slots -> host buffers, all in one transfer."""
        return self._move(slots, dsts, False, "read from")

    # ---- housekeeping ------------------------------------------------------------------
    def stats(self) -> dict:
        d = super().stats()
        d.update(device=str(self.device), slot_bytes=self.slot_bytes,
                 capacity_bytes=self.slot_bytes * self.num_slots, mechanism=self.mechanism)
        return d

    def close(self) -> None:
        if self._copier is not None:
            self._copier.flush()
            self._copier = None
        self.tensor = None
        self._host = None
