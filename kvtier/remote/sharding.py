"""Which servers hold a key, in what order to ask them, and when to leave a failing one alone.

Both remote backends (kvtier servers over ZeroMQ, standalone Redis/Valkey
servers) shard blocks the same way:

    rank_servers(key, servers)      rendezvous (highest-random-weight) order: adding
                                    or removing a server moves only ~1/N of the keys
    owners(keys, servers, r)        each key's top r servers, primary first
    spread(owners)                  {server: [i, ...]} for writes and deletes, which go
                                    to every owner
    replica_rounds(owners, done)    for reads: round k asks each key's k-th owner, only
                                    for the keys no earlier round answered
    Backoff                         per server: after a failure, skip it for a growing
                                    interval (50 ms doubling to 2 s); a success resets it

Ranks depend only on the key bytes and the server addresses, so every client
and every process agrees on them (DESIGN.md, invariant 5).
"""
from __future__ import annotations

import functools
import hashlib
import threading
import time
from collections import defaultdict
from typing import Callable, Iterator, Sequence

BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0


@functools.lru_cache(maxsize=4096)
def _server_salt(server: str) -> bytes:
    return hashlib.blake2b(server.encode(), digest_size=32, person=b"kvtier-hrw").digest()


def rank_servers(key: bytes, servers: Sequence[str]) -> list[int]:
    """Server indices ordered by rendezvous weight for ``key`` (best first)."""
    scores = [hashlib.blake2b(key, digest_size=8, key=_server_salt(s)).digest() for s in servers]
    return sorted(range(len(servers)), key=lambda i: scores[i], reverse=True)


def owners(keys: Sequence[bytes], servers: Sequence[str], replication: int) -> list[list[int]]:
    """Each key's ``replication`` owners, primary first (one server: always [0])."""
    if len(servers) == 1:
        return [[0] for _ in keys]
    return [rank_servers(k, servers)[:replication] for k in keys]


def spread(owner_lists: Sequence[Sequence[int]]) -> dict[int, list[int]]:
    """{server: indices of the keys it owns}: where a write or a delete must go."""
    by_server: dict[int, list[int]] = defaultdict(list)
    for i, own in enumerate(owner_lists):
        for s in own:
            by_server[s].append(i)
    return by_server


def replica_rounds(owner_lists: Sequence[Sequence[int]],
                   done: Callable[[int], bool]) -> Iterator[dict[int, list[int]]]:
    """Rounds of {server: indices}: round k asks the k-th owner of every key not yet ``done``.

    The caller sends each round's requests before asking for the next one;
    ``done(i)`` is read between rounds.
    """
    todo = list(range(len(owner_lists)))
    rounds = max((len(o) for o in owner_lists), default=0)
    for rnd in range(rounds):
        if not todo:
            return
        by_server: dict[int, list[int]] = defaultdict(list)
        for i in todo:
            by_server[owner_lists[i][rnd]].append(i)
        yield by_server
        todo = [i for i in todo if not done(i)]


class Backoff:
    """Per-server failure back-off: a failed server is skipped until its interval ends."""

    def __init__(self, num_servers: int, min_s: float = BACKOFF_MIN_S, max_s: float = BACKOFF_MAX_S):
        self.min_s, self.max_s = min_s, max_s
        self._until = [0.0] * num_servers
        self._interval = [0.0] * num_servers
        self._lock = threading.Lock()

    def up(self, server: int) -> bool:
        """True unless ``server`` failed recently and its back-off interval is still running."""
        return time.monotonic() >= self._until[server]

    def succeeded(self, server: int) -> None:
        with self._lock:
            self._interval[server] = 0.0

    def failed(self, server: int) -> float:
        """Start (or double) ``server``'s back-off; returns the interval in seconds."""
        with self._lock:
            b = min(self.max_s, max(self.min_s, self._interval[server] * 2))
            self._interval[server] = b
            self._until[server] = time.monotonic() + b
            return b
