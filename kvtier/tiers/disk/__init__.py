"""The disk tier: slab files on local NVMe (slabs), an LMDB index (index), opening and recovery
(directory), failure handling (faults), and the consistency check (check)."""
from .tier import DiskTier

__all__ = ["DiskTier"]
