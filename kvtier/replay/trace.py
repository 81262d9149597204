"""Mooncake-format request traces: one JSON object a line.

Fields (the Mooncake FAST'25 release):

    timestamp      arrival time in milliseconds from the start of the trace
    input_length   prompt tokens
    output_length  generated tokens
    hash_ids       chained hashes of the prompt's blocks (``block_tokens`` tokens
                   each); equal ids mean equal prefixes; the last block is
                   usually partial

Only full blocks are cacheable: a request contributes
``input_length // block_tokens`` blocks, the leading ones of ``hash_ids``.
Every malformed line raises :class:`~kvtier.errors.ConfigError` naming the file,
the line number, the field and what is allowed; nothing is skipped silently.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from ..errors import ConfigError

MOONCAKE_BLOCK_TOKENS = 512


@dataclass(frozen=True)
class Request:
    """One request of a trace: its arrival and the hashes of its full blocks."""
    timestamp_ms: float
    input_length: int
    output_length: int
    blocks: tuple[int, ...]          # hash ids of the full (cacheable) blocks only

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


@dataclass(frozen=True)
class Trace:
    """A whole trace, in arrival order."""
    name: str
    requests: tuple[Request, ...]
    block_tokens: int = MOONCAKE_BLOCK_TOKENS

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def num_blocks(self) -> int:
        """Full blocks over all requests (the denominator of every hit ratio)."""
        return sum(len(r.blocks) for r in self.requests)

    @property
    def duration_s(self) -> float:
        if not self.requests:
            return 0.0
        return (self.requests[-1].timestamp_ms - self.requests[0].timestamp_ms) / 1000.0

    def head(self, n: int | None) -> "Trace":
        """The first ``n`` requests (all of them for None)."""
        if n is None:
            return self
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ConfigError("limit", n, "a positive number of requests")
        return Trace(self.name, self.requests[:n], self.block_tokens)


def _int_field(obj: dict, field: str, where: str, *, allow_float: bool = False) -> int | float:
    if field not in obj:
        raise ConfigError(f"{where}: {field}", None, "a required field")
    v = obj[field]
    ok = isinstance(v, int) or (allow_float and isinstance(v, float))
    if not ok or isinstance(v, bool) or v < 0:
        kind = "a non-negative number" if allow_float else "a non-negative int"
        raise ConfigError(f"{where}: {field}", v, kind)
    return v


def parse_request(obj: object, where: str, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> Request:
    """One decoded JSON object -> Request; ConfigError naming ``where`` otherwise."""
    if not isinstance(obj, dict):
        raise ConfigError(where, type(obj).__name__, "a JSON object")
    ts = _int_field(obj, "timestamp", where, allow_float=True)
    n_in = _int_field(obj, "input_length", where)
    n_out = _int_field(obj, "output_length", where) if "output_length" in obj else 0
    ids = obj.get("hash_ids")
    if not isinstance(ids, list):
        raise ConfigError(f"{where}: hash_ids", ids if ids is None else type(ids).__name__,
                          "a list of non-negative ints")
    full = n_in // block_tokens
    if len(ids) < full:
        raise ConfigError(f"{where}: hash_ids", f"{len(ids)} ids",
                          f"at least input_length // {block_tokens} = {full} ids")
    blocks = ids[:full]
    for i, h in enumerate(blocks):
        if not isinstance(h, int) or isinstance(h, bool) or h < 0:
            raise ConfigError(f"{where}: hash_ids[{i}]", h, "a non-negative int")
    return Request(float(ts), n_in, n_out, tuple(blocks))


def parse_lines(lines: Iterable[str], name: str = "<trace>",
                block_tokens: int = MOONCAKE_BLOCK_TOKENS, limit: int | None = None) -> Iterator[Request]:
    """Requests from JSON lines; blank lines are allowed, timestamps must not go back."""
    if not isinstance(block_tokens, int) or isinstance(block_tokens, bool) or block_tokens <= 0:
        raise ConfigError("block_tokens", block_tokens, "a positive int")
    last = None
    count = 0
    for lineno, line in enumerate(lines, 1):
        if limit is not None and count >= limit:
            return
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(where, line.strip()[:60], f"one JSON object per line ({e.msg})") from None
        req = parse_request(obj, where, block_tokens)
        if last is not None and req.timestamp_ms < last:
            raise ConfigError(f"{where}: timestamp", obj["timestamp"],
                              f"a time at or after the previous line's {last:g} ms")
        last = req.timestamp_ms
        count += 1
        yield req


def load_trace(path: str | os.PathLike, block_tokens: int = MOONCAKE_BLOCK_TOKENS,
               limit: int | None = None) -> Trace:
    """Read a whole Mooncake-format trace (or its first ``limit`` requests)."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
        raise ConfigError("limit", limit, "a positive number of requests")
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            reqs = tuple(parse_lines(f, name, block_tokens, limit))
    except OSError as e:
        raise ConfigError("trace", name, f"a readable file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError("trace", name, f"UTF-8 text ({e.reason})") from None
    if not reqs:
        raise ConfigError("trace", name, "a file with at least one request")
    return Trace(os.path.basename(name), reqs, block_tokens)


def trace_from_blocks(name: str, chains: Sequence[Sequence[int]], block_tokens: int = MOONCAKE_BLOCK_TOKENS,
                      interval_ms: float = 100.0) -> Trace:
    """A trace whose requests are the given full-block chains, ``interval_ms`` apart."""
    reqs = tuple(Request(i * interval_ms, len(c) * block_tokens, 0, tuple(int(h) for h in c))
                 for i, c in enumerate(chains))
    return Trace(name, reqs, block_tokens)


def write_trace(trace: Trace, path: str | os.PathLike) -> None:
    """Write ``trace`` back as Mooncake JSON lines (full blocks only)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in trace.requests:
            ts = int(r.timestamp_ms) if float(r.timestamp_ms).is_integer() else r.timestamp_ms
            f.write(json.dumps({"timestamp": ts, "input_length": r.input_length,
                                "output_length": r.output_length, "hash_ids": list(r.blocks)}) + "\n")
