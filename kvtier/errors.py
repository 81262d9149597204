"""Every error kvtier raises on purpose.

User and configuration mistakes are ``ConfigError`` (a ``ValueError``), raised
at construction and naming the key, the bad value and what is allowed.  I/O
failures inside a tier are ``TierIOError``; integrity failures are
``CorruptBlockError``.  Both stay inside kvtier: the cache turns them into
misses.  A missing optional dependency is ``MissingDependencyError``, which
names the pip extra that brings it.
"""
from __future__ import annotations


class KVTierError(Exception):
    """Base class of every error kvtier raises on purpose."""


class ConfigError(KVTierError, ValueError):
    """A bad configuration value or bad user input."""

    def __init__(self, key: str, value: object, allowed: str):
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"{key}={value!r} is invalid: {allowed}")


class TierIOError(KVTierError, OSError):
    """A tier could not read or write its medium."""


class CorruptBlockError(KVTierError):
    """A block's bytes or header failed verification."""


class CacheClosedError(KVTierError):
    """An object was used after its ``close()``: its tiers and their memory are gone."""


class MissingDependencyError(KVTierError, ImportError):
    """An optional dependency that the configuration asks for is not installed."""

    def __init__(self, module: str, extra: str, needed_for: str):
        self.module = module
        self.extra = extra
        super().__init__(
            f"{needed_for} needs the '{module}' package: pip install 'kvtier[{extra}]'"
        )
