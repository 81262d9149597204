"""The disk tier's index: an LMDB environment mapping block key -> where its bytes are.

One environment under ``<dir>/index`` with two databases:

    blocks   key (16 bytes) -> IndexEntry (slab, offset, length, crc32c, namespace salt,
                               format version, sequence number, last access)
    meta     b"geometry" -> the slot layout the slabs were cut with (JSON)
             b"ns:" + salt -> the namespace's label, for ``kvtier inspect``

All changes of one batch go in one write transaction: an entry is put only
after its bytes are on disk (the tier orders that), so a crash leaves the index
naming complete blocks only.  This is the only module that imports ``lmdb``.
"""
from __future__ import annotations

import json
import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from ...errors import TierIOError
from ...extras import require

_VALUE = struct.Struct("<IQQI16sHQd")
MIN_MAP_BYTES = 64 << 20
ENTRY_BYTES_BUDGET = 512          # generous room per block in the LMDB map


def _lmdb():
    return require("lmdb", "the disk tier's index")

@dataclass(frozen=True)
class IndexEntry:
    slab: int
    offset: int
    length: int
    crc: int
    salt: bytes
    version: int
    seq: int
    last_access: float

    def pack(self) -> bytes:
        return _VALUE.pack(self.slab, self.offset, self.length, self.crc, self.salt,
                           self.version, self.seq, self.last_access)

    @classmethod
    def unpack(cls, raw: bytes) -> "IndexEntry | None":
        if len(raw) != _VALUE.size:
            return None
        return cls(*_VALUE.unpack(raw))

    def touched(self, when: float) -> "IndexEntry":
        return IndexEntry(self.slab, self.offset, self.length, self.crc, self.salt,
                          self.version, self.seq, when)


class IndexFailure(TierIOError):
    """The LMDB environment failed (damaged, full, or its files vanished)."""


class DiskIndex:
    """Thread-safe: write transactions are serialised by one lock."""

    def __init__(self, path: str, num_slots: int, *, readonly: bool = False, sync: bool = False,
                 guard=None):
        """``guard``: an :class:`~.guard.IndexGuard` consulted before every read and write
        (a change this process did not make is an IndexFailure, never a crash)."""
        lmdb = _lmdb()
        self.path = path
        self.guard = guard
        self.readonly = readonly
        self._sync = sync
        self._lock = threading.Lock()
        self.map_size = max(MIN_MAP_BYTES, num_slots * ENTRY_BYTES_BUDGET)
        if not readonly:
            os.makedirs(path, exist_ok=True)
        try:
            self.env = lmdb.open(path, map_size=self.map_size, max_dbs=2, subdir=True,
                                 readonly=readonly, lock=not readonly, sync=False, metasync=False,
                                 create=not readonly, readahead=False, max_readers=256)
            # pages past the end of a truncated file would fault when touched: refuse it
            # before any page but the meta pages is read
            need = (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]
            have = os.path.getsize(os.path.join(path, "data.mdb"))
            if have < need:
                self.env.close()
                raise IndexFailure(f"disk index {path}: data.mdb is truncated ({have} of {need} bytes)")
            self._blocks = self.env.open_db(b"blocks", create=not readonly)
            self._meta = self.env.open_db(b"meta", create=not readonly)
        except lmdb.Error as e:
            raise IndexFailure(f"disk index {path}: {e}") from e

    def _guarded(self) -> None:
        why = self.guard.check() if self.guard is not None else None
        if why:
            raise IndexFailure(f"disk index {self.path}: {why}")

    # ---- meta -------------------------------------------------------------------
    # Every read turns lmdb's errors (MDB_CORRUPTED, MDB_PAGE_NOTFOUND, ...) into an
    # IndexFailure: a damaged index is a finding of `kvtier inspect --check`, not a crash.
    def get_meta(self, name: bytes) -> bytes | None:
        lmdb = _lmdb()
        self._guarded()
        try:
            with self.env.begin(db=self._meta) as txn:
                v = txn.get(name)
                return bytes(v) if v is not None else None
        except lmdb.Error as e:
            raise IndexFailure(f"disk index {self.path}: {e}") from e

    def geometry(self) -> dict | None:
        raw = self.get_meta(b"geometry")
        if not raw:
            return None
        try:
            geo = json.loads(raw)
        except ValueError as e:          # JSONDecodeError and UnicodeDecodeError
            raise IndexFailure(f"disk index {self.path}: geometry record is unreadable ({e})") from e
        if not isinstance(geo, dict):
            raise IndexFailure(f"disk index {self.path}: geometry record is not a mapping")
        return geo

    def set_meta(self, items: dict[bytes, bytes]) -> None:
        self._write(lambda txn: [txn.put(k, v, db=self._meta) for k, v in items.items()])

    def namespaces(self) -> dict[bytes, str]:
        lmdb = _lmdb()
        self._guarded()
        out = {}
        try:
            with self.env.begin(db=self._meta) as txn:
                for k, v in txn.cursor():
                    if bytes(k).startswith(b"ns:"):
                        out[bytes(k)[3:]] = bytes(v).decode(errors="replace")
        except lmdb.Error as e:
            raise IndexFailure(f"disk index {self.path}: {e}") from e
        return out

    # ---- blocks -----------------------------------------------------------------
    def get_many(self, keys: Sequence[bytes]) -> list[IndexEntry | None]:
        lmdb = _lmdb()
        self._guarded()
        try:
            with self.env.begin(db=self._blocks) as txn:
                out = []
                for k in keys:
                    v = txn.get(k)
                    out.append(IndexEntry.unpack(bytes(v)) if v is not None else None)
                return out
        except lmdb.Error as e:
            raise IndexFailure(f"disk index {self.path}: {e}") from e

    def items(self) -> Iterator[tuple[bytes, IndexEntry | None]]:
        lmdb = _lmdb()
        self._guarded()
        try:
            with self.env.begin(db=self._blocks) as txn:
                for k, v in txn.cursor():
                    yield bytes(k), IndexEntry.unpack(bytes(v))
        except lmdb.Error as e:
            raise IndexFailure(f"disk index {self.path}: {e}") from e

    def __len__(self) -> int:
        lmdb = _lmdb()
        self._guarded()
        try:
            with self.env.begin() as txn:
                return txn.stat(self._blocks)["entries"]
        except lmdb.Error as e:
            raise IndexFailure(f"disk index {self.path}: {e}") from e

    def commit(self, puts: Sequence[tuple[bytes, IndexEntry]] = (), deletes: Sequence[bytes] = (),
               touches: dict[bytes, float] | None = None) -> None:
        """Apply deletes, then access times, then puts, in one transaction."""
        def apply(txn):
            for k in deletes:
                txn.delete(k, db=self._blocks)
            for k, when in (touches or {}).items():
                raw = txn.get(k, db=self._blocks)
                e = IndexEntry.unpack(bytes(raw)) if raw is not None else None
                if e is not None:
                    txn.put(k, e.touched(when).pack(), db=self._blocks)
            for k, e in puts:
                txn.put(k, e.pack(), db=self._blocks)
        if puts or deletes or touches:
            self._write(apply)

    def _write(self, fn) -> None:
        with self._lock:
            self._guarded()
            if self.guard is not None:
                self.guard.writing()
            try:
                self._write_locked(fn)
            finally:
                if self.guard is not None:
                    self.guard.stamp()

    def _write_locked(self, fn) -> None:
        lmdb = _lmdb()
        for attempt in range(3):
            try:
                with self.env.begin(write=True) as txn:
                    fn(txn)
                break
            except lmdb.MapFullError:
                if attempt == 2:
                    raise IndexFailure(f"disk index {self.path}: map full at {self.map_size} bytes")
                self.map_size *= 2
                self.env.set_mapsize(self.map_size)
            except lmdb.Error as e:
                raise IndexFailure(f"disk index {self.path}: {e}") from e
        if self._sync:
            try:
                self.env.sync(True)
            except lmdb.Error as e:
                raise IndexFailure(f"disk index {self.path}: sync failed: {e}") from e

    def close(self) -> None:
        if self.guard is not None:
            self.guard.close()
        try:
            self.env.close()
        except Exception:  # closing a broken environment must not raise
            pass


def now() -> float:
    return time.time()
