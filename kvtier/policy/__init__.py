"""Eviction policies: which resident block a tier gives up when it needs room.

Lifecycle, as the TieredCache drives it for one tier:

    admit(key, pos)   may this block enter the tier at all? (admission filter)
    insert(key, pos)  the block became resident (its store completed)
    access(key, pos)  a resident block was hit
    remove(key)       the cache dropped the block for its own reasons
    evict(n, protected)
                      choose n resident blocks for which ``protected(key)`` is
                      false, forget them and return them — or return None and
                      evict nothing

``pos`` is the block's index in its request's prefix chain (0 = first block);
prefix-aware policies use it, others ignore it.  Policies hold keys only, never
bytes, and are not thread-safe: the cache calls them under its lock.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar

from ..errors import ConfigError

Protected = Callable[[bytes], bool]


class EvictionPolicy(ABC):
    """Replacement policy over the keys resident in one tier."""

    name: ClassVar[str]

    def __init__(self, capacity: int):
        if not isinstance(capacity, int) or capacity <= 0:
            raise ConfigError("policy capacity", capacity, "a positive number of blocks")
        self.capacity = capacity

    @abstractmethod
    def insert(self, key: bytes, pos: int = 0) -> None:
        """A block became resident."""

    @abstractmethod
    def access(self, key: bytes, pos: int = 0) -> None:
        """A resident block was hit."""

    @abstractmethod
    def remove(self, key: bytes) -> None:
        """Forget ``key`` (no-op when unknown)."""

    @abstractmethod
    def evict(self, n: int, protected: Protected) -> list[bytes] | None:
        """Atomically pick ``n`` unprotected resident keys, forget them, return them.

        Returns None, and evicts nothing, when fewer than ``n`` are evictable.
        """

    def admit(self, key: bytes, pos: int = 0) -> bool:
        """Admission filter: False keeps the block out of this tier."""
        return True

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, key: bytes) -> bool: ...


_REGISTRY: dict[str, type[EvictionPolicy]] = {}


def register_policy(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
    """Class decorator: make ``cls`` available by ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def check_policy_name(key: str, name: object) -> None:
    if name not in policy_names():
        raise ConfigError(key, name, "one of " + ", ".join(map(repr, policy_names())))


def make_policy(name: str, capacity: int) -> EvictionPolicy:
    """Instantiate a registered policy; ConfigError naming the choices otherwise."""
    check_policy_name("policy", name)
    return _REGISTRY[name](capacity)


def _load_builtin() -> None:
    # each registers itself on its first import (a module imported already costs a dict lookup;
    # checking for one name instead would miss the others when one was imported on its own)
    from . import adaptive, lru, prefix, s3fifo  # noqa: F401
