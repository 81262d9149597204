"""Synthetic prefix traffic, for policies to be judged beyond one production trace.

Every generator is deterministic for a given seed and returns a
:class:`~kvtier.replay.trace.Trace` of full-block chains (hash ids are fresh
ints; equal ids are equal prefixes, as in Mooncake traces):

    system_prompts    a few long shared system prompts (Zipf popularity) + unique user turns
    rag_documents     a shared instruction block + one of many documents (Zipf) + a question
    scan              a hot set of prompts reused throughout, crossed by long one-shot scans
    multi_turn_chat   conversations that grow turn by turn, interleaved, most of them ending
    tenants           two tenants with separate working sets, taking turns in long phases

and three written against adaptive policies, each where some fixed policy loses to LRU:

    drift             the hot prompts change every phase and never come back (frequency goes stale)
    late_reuse        short-gap multi-turn chat mixed with a cycle of documents: every document
                      comes back often, but only after the whole cycle (frequency misleads)
    loop              a cycle of prompts larger than most caches (LRU's worst case)
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import ConfigError
from .trace import Trace, trace_from_blocks


class _Ids:
    """Fresh hash ids."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int) -> list[int]:
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def _zipf_choice(rng: np.random.Generator, n: int, size: int, a: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** a
    return rng.choice(n, size=size, p=w / w.sum())


def _check(name: str, value: int, least: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(name, value, f"an int >= {least}")


def system_prompts(num_requests: int = 4000, num_prompts: int = 6, prompt_blocks: int = 24,
                   user_blocks: tuple[int, int] = (1, 12), zipf: float = 1.0, seed: int = 0) -> Trace:
    _check("num_requests", num_requests)
    _check("num_prompts", num_prompts)
    rng = np.random.default_rng(seed)
    ids = _Ids()
    prompts = [ids.take(prompt_blocks) for _ in range(num_prompts)]
    which = _zipf_choice(rng, num_prompts, num_requests, zipf)
    chains = [prompts[w] + ids.take(int(rng.integers(user_blocks[0], user_blocks[1] + 1))) for w in which]
    return trace_from_blocks("synthetic-system-prompts", chains)


def rag_documents(num_requests: int = 4000, num_docs: int = 400, doc_blocks: tuple[int, int] = (4, 24),
                  question_blocks: tuple[int, int] = (0, 2), zipf: float = 0.9, seed: int = 0) -> Trace:
    _check("num_requests", num_requests)
    _check("num_docs", num_docs)
    rng = np.random.default_rng(seed)
    ids = _Ids()
    head = ids.take(2)
    docs = [ids.take(int(rng.integers(doc_blocks[0], doc_blocks[1] + 1))) for _ in range(num_docs)]
    order = rng.permutation(num_docs)           # popularity unrelated to creation order
    which = _zipf_choice(rng, num_docs, num_requests, zipf)
    chains = [head + docs[order[w]] + ids.take(int(rng.integers(question_blocks[0], question_blocks[1] + 1)))
              for w in which]
    return trace_from_blocks("synthetic-rag", chains)


def scan(num_requests: int = 4000, hot_prompts: int = 40, hot_blocks: int = 8, scan_every: int = 200,
         scan_requests: int = 60, scan_blocks: int = 32, seed: int = 0) -> Trace:
    """A hot set (``hot_prompts * hot_blocks`` blocks) and, every ``scan_every`` requests,
    a burst of ``scan_requests`` one-shot requests of ``scan_blocks`` blocks each."""
    _check("num_requests", num_requests)
    _check("scan_every", scan_every)
    rng = np.random.default_rng(seed)
    ids = _Ids()
    hot = [ids.take(hot_blocks) for _ in range(hot_prompts)]
    chains: list[list[int]] = []
    i = 0
    while len(chains) < num_requests:
        if i and i % scan_every == 0:
            for _ in range(scan_requests):
                chains.append(ids.take(scan_blocks))
        chains.append(hot[int(rng.integers(hot_prompts))] + ids.take(1))
        i += 1
    return trace_from_blocks("synthetic-scan", chains[:num_requests])


def multi_turn_chat(num_requests: int = 4000, active: int = 48, first_blocks: tuple[int, int] = (2, 10),
                    turn_blocks: tuple[int, int] = (1, 3), end_probability: float = 0.25,
                    seed: int = 0) -> Trace:
    """``active`` conversations at a time; each request continues a random one
    (its whole history plus a new turn), which then ends with ``end_probability``
    and is replaced by a new conversation."""
    _check("num_requests", num_requests)
    _check("active", active)
    if not 0.0 <= end_probability <= 1.0:
        raise ConfigError("end_probability", end_probability, "a probability in [0, 1]")
    rng = np.random.default_rng(seed)
    ids = _Ids()
    system = ids.take(1)
    convs = [system + ids.take(int(rng.integers(first_blocks[0], first_blocks[1] + 1))) for _ in range(active)]
    chains = []
    for _ in range(num_requests):
        c = int(rng.integers(active))
        chains.append(list(convs[c]))
        if rng.random() < end_probability:
            convs[c] = system + ids.take(int(rng.integers(first_blocks[0], first_blocks[1] + 1)))
        else:
            convs[c] = convs[c] + ids.take(int(rng.integers(turn_blocks[0], turn_blocks[1] + 1)))
    return trace_from_blocks("synthetic-chat", chains)


def tenants(num_requests: int = 4000, phase: int = 500, prompts_per_tenant: int = 30,
            prompt_blocks: int = 12, seed: int = 0) -> Trace:
    """Tenants A and B alternate every ``phase`` requests, each reusing its own prompts."""
    _check("num_requests", num_requests)
    _check("phase", phase)
    rng = np.random.default_rng(seed)
    ids = _Ids()
    sets = [[ids.take(prompt_blocks) for _ in range(prompts_per_tenant)] for _ in range(2)]
    chains = []
    for i in range(num_requests):
        t = (i // phase) % 2
        chains.append(sets[t][int(rng.integers(prompts_per_tenant))] + ids.take(2))
    return trace_from_blocks("synthetic-tenants", chains)


def drift(num_requests: int = 4000, prompts: int = 20, prompt_blocks: int = 8, phase: int = 150,
          user_blocks: int = 2, seed: int = 0) -> Trace:
    """Every ``phase`` requests a fresh set of ``prompts`` prompts (heavy-tailed popularity)
    replaces the last one for good; each request adds ``user_blocks`` unique blocks."""
    _check("num_requests", num_requests)
    _check("prompts", prompts)
    _check("phase", phase)
    rng = np.random.default_rng(seed)
    ids = _Ids()
    chains, current = [], []
    for i in range(num_requests):
        if i % phase == 0:
            current = [ids.take(prompt_blocks) for _ in range(prompts)]
        chains.append(current[min(int(rng.pareto(1.0)), prompts - 1)] + ids.take(user_blocks))
    return trace_from_blocks("synthetic-drift", chains)


def late_reuse(num_requests: int = 4000, docs: int = 300, doc_blocks: int = 6, active: int = 16,
               doc_share: float = 0.5, end_probability: float = 0.1, seed: int = 0) -> Trace:
    """A share ``doc_share`` of the requests walks a cycle of ``docs`` documents (each comes back
    every ``docs / doc_share`` requests, seen often but never soon); the rest continue one of
    ``active`` conversations, one block a turn, which end with ``end_probability``."""
    _check("num_requests", num_requests)
    _check("docs", docs)
    _check("active", active)
    if not 0.0 <= doc_share <= 1.0:
        raise ConfigError("doc_share", doc_share, "a fraction in [0, 1]")
    if not 0.0 <= end_probability <= 1.0:
        raise ConfigError("end_probability", end_probability, "a probability in [0, 1]")
    rng = np.random.default_rng(seed)
    ids = _Ids()
    documents = [ids.take(doc_blocks) for _ in range(docs)]
    convs = [ids.take(2) for _ in range(active)]
    chains, d = [], 0
    for _ in range(num_requests):
        if rng.random() < doc_share:
            chains.append(documents[d] + ids.take(1))
            d = (d + 1) % docs
        else:
            c = int(rng.integers(active))
            chains.append(list(convs[c]))
            convs[c] = ids.take(2) if rng.random() < end_probability else convs[c] + ids.take(1)
    return trace_from_blocks("synthetic-late-reuse", chains)


def loop(num_requests: int = 4000, prompts: int = 400, prompt_blocks: int = 4, seed: int = 0) -> Trace:
    """``prompts`` prompts requested in a fixed cycle: LRU hits nothing below the cycle's size."""
    _check("num_requests", num_requests)
    _check("prompts", prompts)
    ids = _Ids()
    cycle = [ids.take(prompt_blocks) for _ in range(prompts)]
    return trace_from_blocks("synthetic-loop", [cycle[i % prompts] for i in range(num_requests)])


GENERATORS: dict[str, Callable[..., Trace]] = {
    "system-prompts": system_prompts,
    "rag": rag_documents,
    "scan": scan,
    "chat": multi_turn_chat,
    "tenants": tenants,
    "drift": drift,
    "late-reuse": late_reuse,
    "loop": loop,
}


def make_trace(name: str, **kwargs) -> Trace:
    """A synthetic trace by name; ConfigError listing the names otherwise."""
    if name not in GENERATORS:
        raise ConfigError("synthetic trace", name, "one of " + ", ".join(map(repr, GENERATORS)))
    return GENERATORS[name](**kwargs)


__all__ = ["GENERATORS", "make_trace", "system_prompts", "rag_documents", "scan", "multi_turn_chat", "tenants",
           "drift", "late_reuse", "loop"]
