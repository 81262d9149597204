"""Cache listeners: the public hook for watching blocks appear in and leave tiers.

A :class:`CacheListener` is registered with ``TieredCache(listeners=[...])`` or
``cache.add_listener(listener)``.  Each event names the tier where the blocks
appeared or disappeared (the :class:`~kvtier.tiers.base.Tier` object: ``.name``,
``.medium``) and their keys, in the order the index changed:

    stored(tier, keys)     a store completed: the keys became visible in the top tier
    demoted(tier, keys)    copies written by a transfer thread became visible in a
                           lower tier (an evicted block's demotion, or the
                           write-through copy of a stored block)
    promoted(tier, keys)   lower-tier blocks were read back and became visible in
                           the top tier (``tier``); their lower-tier copies stay
    evicted(tier, keys)    the tier gave the blocks up to make room (a demotion, if
                           any, was queued first: ``demoted`` follows when it lands)
    dropped(tier, keys)    the blocks left the tier for another reason: ``discard()``,
                           or the tier could not read them back (corrupt or vanished)

Blocks found by recovery at start-up or by asking a shared tier make no event.

Threads and locks: every event fires with the cache's lock held, right after
the index changed.  ``stored`` fires on the thread that called
``complete_store``; ``evicted`` on the thread whose call needed room (a store,
a load, or a transfer thread making room in a lower tier); ``demoted`` and
``promoted`` on a transfer thread (on the submitting thread when the cache runs
transfers inline, ``transfer_threads=0``, or the transfer queue refused the
job); ``dropped`` on the thread that called ``discard`` or on a transfer thread
finishing a promotion.  A listener must therefore be quick, must not block and
must not call back into the cache or its tiers; copy what it needs and return.
The keys list is the listener's to keep.

A listener that raises never breaks the cache: :class:`Listeners` catches the
exception at this one boundary, counts it in the cache's ``listener_errors``
stat and logs the first failure of each listener (later ones at debug level).
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Sequence

from .errors import ConfigError

if TYPE_CHECKING:
    from .tiers.base import Tier

log = logging.getLogger(__name__)

EVENTS = ("stored", "demoted", "promoted", "evicted", "dropped")


class CacheListener:
    """Receives a TieredCache's block events; every method is a no-op here, override the ones you need."""

    def stored(self, tier: Tier, keys: list[bytes]) -> None:
        """A completed store made ``keys`` visible in the top tier."""

    def demoted(self, tier: Tier, keys: list[bytes]) -> None:
        """Copies of ``keys`` written down by a transfer thread became visible in ``tier``."""

    def promoted(self, tier: Tier, keys: list[bytes]) -> None:
        """``keys`` were read back from a lower tier and became visible in the top tier ``tier``."""

    def evicted(self, tier: Tier, keys: list[bytes]) -> None:
        """``tier`` gave ``keys`` up to make room."""

    def dropped(self, tier: Tier, keys: list[bytes]) -> None:
        """``keys`` left ``tier`` because they were discarded or could not be read back."""


class Listeners:
    """The cache's registered listeners, and the one place their exceptions are caught.

    Not locked itself: ``emit`` runs under the cache's lock, and the listener
    tuple is replaced (never changed in place) by ``add``/``remove``.
    """

    def __init__(self, stats: Counter, listeners: Sequence[CacheListener] = ()):
        self._stats = stats
        self._listeners: tuple[CacheListener, ...] = ()
        self._failed: set[int] = set()            # ids of listeners whose failure was logged
        for listener in listeners:
            self.add(listener)

    def add(self, listener: CacheListener) -> None:
        if not all(callable(getattr(listener, ev, None)) for ev in EVENTS):
            raise ConfigError("listeners", type(listener).__name__,
                              "a kvtier.listeners.CacheListener (methods " + ", ".join(EVENTS) + ")")
        self._listeners += (listener,)

    def remove(self, listener: CacheListener) -> None:
        self._listeners = tuple(x for x in self._listeners if x is not listener)

    def __bool__(self) -> bool:
        return bool(self._listeners)

    def emit(self, event: str, tier: Tier, keys: Sequence[bytes]) -> None:
        """(cache lock held) Tell every listener; an exception is counted and logged, never raised."""
        if not self._listeners or not keys:
            return
        for listener in self._listeners:
            try:
                getattr(listener, event)(tier, list(keys))
            except Exception:  # the one boundary: a listener's bug must not break a store or a load
                self._stats["listener_errors"] += 1
                if id(listener) in self._failed:
                    log.debug("cache listener %r failed on %s again", listener, event, exc_info=True)
                else:
                    self._failed.add(id(listener))
                    log.exception("cache listener %r failed on %s(%s, %d keys); the cache goes on "
                                  "(later failures of this listener are logged at debug level)",
                                  listener, event, tier.name, len(keys))
