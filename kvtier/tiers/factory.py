"""Build the tier stack a KVTierConfig describes: gpu → host → disk → remote."""
from __future__ import annotations

import numpy as np

from ..config import KVTierConfig
from ..errors import ConfigError
from ..keys import Namespace
from ..layout import round_up
from .base import Tier
from .host import SLOT_ALIGN, HostTier


def _slots(key: str, capacity: int, block_bytes: int) -> int:
    n = capacity // block_bytes
    if n <= 0:
        raise ConfigError(key, capacity, f"room for at least one block ({block_bytes} bytes)")
    return n


def build_tiers(cfg: KVTierConfig, namespace: Namespace, block_bytes: int, *,
                host_buffer: np.ndarray | None = None) -> tuple[list[Tier], list[str]]:
    """Instantiate the configured tiers, fastest first, with their policy names.

    ``host_buffer``: a contiguous 1-D uint8 array to use as the host tier's arena
    (e.g. shared memory mapped by several processes) instead of allocating one;
    it must hold the configured capacity's slots, and its owner frees it.
    """
    if not isinstance(block_bytes, int) or block_bytes <= 0:
        raise ConfigError("block_bytes", block_bytes, "a positive int")
    tiers: list[Tier] = []
    policies: list[str] = []
    if cfg.gpu is not None:
        from .gpu import GpuTier
        tiers.append(GpuTier("gpu", block_bytes, _slots("gpu.capacity_bytes", cfg.gpu.capacity_bytes, block_bytes),
                             device=cfg.gpu.device, mechanism=cfg.gpu.mechanism))
        policies.append(cfg.gpu.policy)
    memory = {"auto": "auto", "on": "pinned", "off": "pageable"}[cfg.host.pinned]
    slot = round_up(block_bytes, SLOT_ALIGN)
    tiers.append(HostTier("host", block_bytes, _slots("host.capacity_bytes", cfg.host.capacity_bytes, slot),
                          memory=memory, buffer=host_buffer, populate=cfg.host.populate))
    policies.append(cfg.host.policy)
    if cfg.disk is not None:
        from .disk.tier import DiskTier
        tiers.append(DiskTier.from_config(cfg.disk, namespace=namespace, block_bytes=block_bytes))
        policies.append(cfg.disk.policy)
    if cfg.remote is not None:
        from ..remote.client import make_remote_tier
        tiers.append(make_remote_tier(cfg.remote, namespace=namespace, block_bytes=block_bytes))
        policies.append("lru")          # unused: remote capacity is managed by the servers
    return tiers, policies
