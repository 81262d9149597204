"""Shadow caches: what another policy would have hit on the traffic a tier sees.

A tier's policy never sees a request whole.  The cache tells it, per block and
with the block's position ``pos`` in the request's prefix chain:

    access(key, pos)   the block was hit (the request's stored prefix, in order)
    admit(key, pos)    the block missed and is about to be stored
    insert(key, pos)   a block became resident (after admit, or promoted from below)

:class:`RequestStream` turns those calls back into requests.  The calls of one
request come in batches of consecutive positions (its hits, its promotions,
its admits), and an engine serving many requests at once may put other
requests' batches in between.  So a batch that starts at pos 0 opens a
request; a batch that starts at pos p > 0 continues the most recent open
request that ended at p - 1 (or stands alone when none did); the insert of an
admitted key is not a new reference, an insert without admit (a promotion) is.
Requests are handed over in order: a request once a batch of its admits has
ended (nothing of it can follow), one that missed nothing once ``window``
newer requests have opened (or on :meth:`flush`).
A block that the tier holds but that follows the request's first miss is not
referenced at all (prefix semantics: it cannot hit), so a request may come back
with holes; shadows stop counting hits at the first hole, the same for every
shadow.

:class:`ShadowCache` replays those requests through a policy of its own, on keys
alone, with the same prefix semantics as the tier (the request's blocks are
protected while it is served): its hit count is what that policy would have
scored on this traffic.  A shadow costs one policy's bookkeeping and a set of
keys; it never holds bytes.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from . import EvictionPolicy

Request = list[tuple[int, bytes, bool]]    # (pos, key, hit in the tier itself), pos increasing


class RequestStream:
    """Group per-block calls into requests; ``on_request`` gets each finished one, oldest first."""

    def __init__(self, on_request: Callable[[Request], None], window: int = 8, memory: int = 4096):
        self._on_request = on_request
        self._window = window
        self._open: list[Request] = []                           # oldest first
        self._done: set[int] = set()                             # ids of open requests known complete
        self._cur: Request | None = None                         # the request the last batch went to
        self._cur_missed = False                                 # ... and that batch held an admit
        self._admitted: OrderedDict[bytes, None] = OrderedDict()  # admitted, insert not seen yet
        self._memory = memory

    def see(self, key: bytes, pos: int, *, hit: bool = False, admitted: bool = False) -> None:
        """A reference to ``key`` at ``pos``: a ``hit`` of the tier, or a miss (``admitted``:
        its insert will follow)."""
        if admitted:
            self._admitted[key] = None
            if len(self._admitted) > self._memory:
                self._admitted.popitem(last=False)
        cur = self._cur
        if cur is not None and pos == cur[-1][0] + 1:
            cur.append((pos, key, hit))     # the batch goes on
            self._cur_missed |= admitted
            return
        self._end_batch()
        if pos > 0:                         # a later batch of an open request?
            for req in reversed(self._open):
                if req[-1][0] == pos - 1 and id(req) not in self._done:
                    req.append((pos, key, hit))
                    self._cur, self._cur_missed = req, admitted
                    return
        self._cur, self._cur_missed = [(pos, key, hit)], admitted
        self._open.append(self._cur)
        self._hand_over()

    def _end_batch(self) -> None:
        # A request's admits are its last references: once a batch of them ends, it is complete.
        # (A request without a miss may still see promotions or admits: it waits in the window.)
        if self._cur is not None and self._cur_missed:
            self._done.add(id(self._cur))
        self._cur, self._cur_missed = None, False

    def _hand_over(self) -> None:
        """Oldest first, so that shadows see requests in their order: the complete ones at the
        head of the queue, and the oldest whatever its state once the window is full."""
        opened = self._open
        while opened and (id(opened[0]) in self._done or len(opened) > self._window):
            req = opened.pop(0)
            self._done.discard(id(req))
            if req is self._cur:
                self._cur, self._cur_missed = None, False
            self._on_request(req)

    def inserted(self, key: bytes, pos: int) -> None:
        """``key`` became resident: a reference unless it is the insert of an admitted key."""
        if key in self._admitted:
            del self._admitted[key]
        else:
            self.see(key, pos)

    def flush(self) -> None:
        """Hand over every open request."""
        self._end_batch()
        self._done.clear()
        while self._open:
            self._on_request(self._open.pop(0))


class ShadowCache:
    """A key-only cache of ``capacity`` blocks run by ``policy``; counts its prefix hits."""

    def __init__(self, policy: EvictionPolicy):
        self.policy = policy
        self.capacity = policy.capacity
        self._resident: set[bytes] = set()
        self.num_hits = 0
        self.num_blocks = 0

    def serve(self, request: Request) -> int:
        """Replay one request; returns its hit blocks."""
        resident, policy = self._resident, self.policy
        hits = 0
        expect = request[0][0]
        for pos, key, _ in request:
            if pos != expect or key not in resident:
                break
            hits += 1
            expect += 1
        mine = {e[1] for e in request}
        protected = mine.__contains__
        for i, (pos, key, _) in enumerate(request):
            if i < hits:
                policy.access(key, pos)
                continue
            if key in resident:
                continue                    # held, but after the first miss: not referenced
            if len(resident) >= self.capacity:
                out = policy.evict(1, protected)
                if not out:
                    continue
                resident.difference_update(out)
            resident.add(key)
            policy.insert(key, pos)
        self.num_hits += hits
        self.num_blocks += len(request)
        return hits

    def __contains__(self, key: bytes) -> bool:
        return key in self._resident

    def __len__(self) -> int:
        return len(self._resident)
