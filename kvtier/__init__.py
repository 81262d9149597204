"""kvtier: tiered KV-cache storage for LLM serving.

GPU HBM → pinned host memory → local NVMe → remote peers, behind one cache
that hands back a stored prefix's KV faster than the engine can recompute it.
This module exports public names only and imports no optional dependency.
"""
from .cache import TieredCache
from .config import DiskConfig, GpuConfig, HostConfig, KVTierConfig, RemoteConfig
from .errors import (CacheClosedError, ConfigError, CorruptBlockError, KVTierError, MissingDependencyError,
                     TierIOError)
from .handles import LoadHandle, Lookup, StoreHandle
from .keys import KEY_BYTES, Namespace, chain_keys, salt_hashes
from .layout import BlockLayout
from .listeners import CacheListener
from .load_plan import LoadPlanConfig, LoadPlanner, Plan
from .paged import PagedKVCache
from .policy import EvictionPolicy, make_policy, policy_names, register_policy

__version__ = "0.1.0"

__all__ = [
    "TieredCache", "PagedKVCache", "BlockLayout", "Namespace", "KEY_BYTES", "chain_keys", "salt_hashes",
    "KVTierConfig", "HostConfig", "DiskConfig", "RemoteConfig", "GpuConfig",
    "KVTierError", "CacheClosedError", "ConfigError", "TierIOError", "CorruptBlockError", "MissingDependencyError",
    "Lookup", "StoreHandle", "LoadHandle", "CacheListener", "LoadPlanner", "LoadPlanConfig", "Plan",
    "EvictionPolicy", "make_policy", "policy_names", "register_policy", "__version__",
]
