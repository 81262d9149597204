"""Block keys: deterministic chained prefix hashes, salted by a namespace.

``key(i) = BLAKE2b-128(key(i-1) || tokens of block i, key=namespace salt)``.
The same tokens in the same namespace give the same key in every process, on
every machine, after every restart: no ``hash()``, no random seeds.  Engines
that hash blocks themselves (vLLM's ``request.block_hashes``) pass those bytes
to :func:`salt_hashes`, which only salts them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from typing import Iterable, Sequence

import numpy as np

from .errors import ConfigError

KEY_BYTES = 16
FORMAT_VERSION = 1
_ROOT = b"kvtier-root-v1".ljust(KEY_BYTES, b"\0")


@dataclass(frozen=True)
class Namespace:
    """What must match for stored bytes to be reusable; part of every key."""

    model: str
    block_tokens: int
    dtype: str = "auto"
    revision: str = ""
    layout: str = ""
    page_shape: tuple[int, ...] = ()
    tp_rank: int = 0
    tp_size: int = 1
    tenant: str = "default"
    format_version: int = FORMAT_VERSION
    salt: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("namespace.model", self.model, "a non-empty string")
        if not isinstance(self.block_tokens, int) or self.block_tokens <= 0:
            raise ConfigError("namespace.block_tokens", self.block_tokens, "a positive int")
        if not (isinstance(self.tp_size, int) and self.tp_size > 0):
            raise ConfigError("namespace.tp_size", self.tp_size, "a positive int")
        if not (isinstance(self.tp_rank, int) and 0 <= self.tp_rank < self.tp_size):
            raise ConfigError("namespace.tp_rank", self.tp_rank, f"an int in [0, {self.tp_size})")
        object.__setattr__(self, "page_shape", tuple(int(d) for d in self.page_shape))
        canon = "\x1f".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.name != "salt")
        salt = hashlib.blake2b(canon.encode(), digest_size=KEY_BYTES, person=b"kvtier-ns").digest()
        object.__setattr__(self, "salt", salt)

    @property
    def label(self) -> str:
        """Short human-readable id: tenant/model@dtype#salt-prefix."""
        return f"{self.tenant}/{self.model}@{self.dtype}#{self.salt.hex()[:8]}"


def check_keys(keys: Sequence[bytes], what: str = "keys") -> None:
    """Raise ConfigError unless every key is ``KEY_BYTES`` bytes."""
    if isinstance(keys, (bytes, str)):
        raise ConfigError(what, type(keys).__name__, f"a sequence of {KEY_BYTES}-byte keys")
    if set(map(type, keys)) <= {bytes} and set(map(len, keys)) <= {KEY_BYTES}:
        return                              # fast path: checked at C speed
    for i, k in enumerate(keys):
        if type(k) is not bytes or len(k) != KEY_BYTES:
            raise ConfigError(f"{what}[{i}]", k if len(repr(k)) < 80 else type(k).__name__,
                              f"bytes of length {KEY_BYTES}")


def chain_keys(ns: Namespace, token_ids: Iterable[int] | np.ndarray,
               parent: bytes | None = None) -> list[bytes]:
    """One key per *full* block of ``token_ids``; a trailing partial block has none."""
    try:
        toks = np.asarray(token_ids)
    except (TypeError, ValueError) as e:  # ragged or non-numeric input
        raise ConfigError("token_ids", type(token_ids).__name__, "a 1-D sequence of ints") from e
    if toks.ndim != 1 or (toks.size and toks.dtype.kind not in "iu"):
        raise ConfigError("token_ids", f"array of shape {toks.shape} dtype {toks.dtype}",
                          "a 1-D sequence of ints")
    if toks.size and (toks.min() < 0 or toks.max() >= 2**32):
        raise ConfigError("token_ids", "out-of-range id", "ids in [0, 2**32)")
    if parent is not None:
        check_keys([parent], "parent")
    data = toks.astype("<u4", copy=False).tobytes()
    bt = ns.block_tokens
    prev = _ROOT if parent is None else parent
    out = []
    step = bt * 4
    for i in range(toks.size // bt):
        h = hashlib.blake2b(prev, digest_size=KEY_BYTES, key=ns.salt)
        h.update(data[i * step:(i + 1) * step])
        prev = h.digest()
        out.append(prev)
    return out


def salt_hashes(ns: Namespace, hashes: Sequence[bytes]) -> list[bytes]:
    """Turn engine-computed block hashes (already chained) into kvtier keys."""
    out = []
    for i, h in enumerate(hashes):
        if not isinstance(h, (bytes, bytearray, memoryview)) or len(h) == 0:
            raise ConfigError(f"hashes[{i}]", h, "non-empty bytes")
        out.append(hashlib.blake2b(bytes(h), digest_size=KEY_BYTES, key=ns.salt).digest())
    return out
