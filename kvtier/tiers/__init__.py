"""Tiers: places that hold equal-size blocks in numbered slots (one per module)."""
from .base import Tier
from .host import HostTier

__all__ = ["Tier", "HostTier"]
