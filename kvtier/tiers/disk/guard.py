"""Keeping a damaged LMDB index from crashing the process that serves from it.

LMDB trusts its pages: a flipped page offset or key size makes it read past
the end of the mapped file (SIGBUS) or of the map (SIGSEGV), and no Python
code can catch that.  So the index is never read in this process unless it is
known to be intact, and a change nobody in this process made is noticed
before the next read or write:

    at open      the index is trusted when it matches the seal its last clean
                 close left (``index/seal``: size and CRC32C of ``data.mdb``);
                 otherwise (a crash, an old directory, damage) a child process
                 walks every page and entry first.  A walk that fails or kills
                 the child is a damaged index: the tier moves it aside
                 (quarantine) and starts empty, with one log line naming both
                 paths.  The seal is removed before the first write.
    while open   after each of its own commits the tier stamps ``data.mdb``'s
                 mtime with a value of its own and records (inode, size,
                 mtime) of the file it has open; before every read or write of
                 the index it compares.  Anything else that wrote the file (or
                 truncated or touched it) changes that, and the index is treated as damaged:
                 IndexFailure, which the tier turns into misses, then reads and
                 writes off, with one log line.  Bit rot under the page cache
                 is not seen here: the seal and the checksum of every block
                 (from the index, checked on read) are the nets for that.
    at close     after a clean close the seal is written again.

No index entry can make the tier return wrong bytes either way: a block's
bytes must match the checksum its entry records.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

from ... import native

log = logging.getLogger("kvtier.tiers.disk")

SEAL = "seal"
PROBE_TIMEOUT_S = 120.0
READ_STEP = 8 << 20

# The child's walk: every page of every database, through the cursor and through a
# lookup of each key, as the tier will read them.  Exit 3 with the reason on an LMDB error.
_PROBE = r"""
import os, sys
import lmdb
path = sys.argv[1]
try:
    env = lmdb.open(path, readonly=True, lock=False, max_dbs=2, subdir=True, readahead=False)
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    have = os.path.getsize(os.path.join(path, "data.mdb"))
    if have < need:
        sys.exit(f"data.mdb is truncated ({have} of {need} bytes)")
    with env.begin() as txn:
        names = [bytes(k) for k, _ in txn.cursor()]
        for name in names:
            db = env.open_db(name, txn=txn, create=False)
            for k, v in txn.cursor(db=db):
                if txn.get(bytes(k), db=db) != bytes(v):
                    sys.exit(f"database {name!r}: key {bytes(k).hex()} reads back differently")
    env.close()
except lmdb.Error as e:
    sys.exit(f"{type(e).__name__}: {e}")
"""


def _file_crc(path: str) -> tuple[int, int]:
    """(size, CRC32C) of a file."""
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        while True:
            chunk = f.read(READ_STEP)
            if not chunk:
                return size, crc
            crc = native.crc32c(chunk, crc)
            size += len(chunk)


def probe(where: str) -> str | None:
    """Walk the index at ``where`` in a child process: None when intact, else why not."""
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE, where], capture_output=True, text=True,
                           timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"walking it took more than {PROBE_TIMEOUT_S:.0f}s"
    if r.returncode < 0:
        import signal
        n = -r.returncode
        return f"walking it killed the checker ({signal.Signals(n).name if n in signal.valid_signals() else n})"
    if r.returncode != 0:
        return (r.stderr.strip().splitlines() or [f"the checker exited {r.returncode}"])[-1]
    return None


class IndexGuard:
    """The seal and the change check of one index directory (``<tier dir>/index``)."""

    def __init__(self, where: str, readonly: bool = False):
        self.where = where
        self.data = os.path.join(where, "data.mdb")
        self.readonly = readonly
        self._expect: tuple[int, int, int] | None = None    # None: not watching
        self._gen = 0               # odd while a commit of our own runs (a sequence lock)
        self._fd: int | None = None  # data.mdb as LMDB maps it, even if its path goes away
        self.damaged: str | None = None

    # ---- open and close ------------------------------------------------------------
    def verdict(self) -> str | None:
        """None when the index may be opened here (absent, sealed, or walked intact by a
        child process), else why it is damaged."""
        if not os.path.exists(self.data):
            return None
        try:
            with open(os.path.join(self.where, SEAL), encoding="ascii") as f:
                seal = json.load(f)
            if isinstance(seal, dict) and [seal.get("size"), seal.get("crc32c")] == list(_file_crc(self.data)):
                return None
        except (OSError, ValueError):
            pass
        return probe(self.where)

    def opened(self) -> None:
        """The index is open: drop the seal (it is only true until the next write) and watch."""
        if not self.readonly:
            try:
                os.unlink(os.path.join(self.where, SEAL))
            except FileNotFoundError:
                pass
        try:
            self._fd = os.open(self.data, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd = None
        self.stamp()

    def close(self) -> None:
        """Stop watching (the index was closed)."""
        fd, self._fd, self._expect = self._fd, None, None
        if fd is not None:
            os.close(fd)

    def seal(self) -> None:
        """After a clean close: record what the index is, so the next open can trust it."""
        if self.readonly or self.damaged or not os.path.exists(self.data):
            return
        size, crc = _file_crc(self.data)
        tmp = os.path.join(self.where, SEAL + ".tmp")
        with open(tmp, "w", encoding="ascii") as f:
            json.dump({"size": size, "crc32c": crc}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.where, SEAL))

    # ---- while open ------------------------------------------------------------------
    def writing(self) -> None:
        """A commit of our own begins: stop comparing until :meth:`stamp`."""
        self._gen |= 1

    def stamp(self) -> None:
        """Our own change is done: mark the file and remember what it looks like now."""
        fd = self._fd
        try:
            if fd is None:
                raise OSError("not watching")
            if not self.readonly:
                os.utime(fd, ns=(os.fstat(fd).st_atime_ns, time.time_ns()))
            st = os.fstat(fd)
        except OSError:
            self._expect = None
        else:
            self._expect = (st.st_ino, st.st_size, st.st_mtime_ns)
        self._gen = (self._gen | 1) + 1

    def check(self) -> str | None:
        """None while the file is as this process left it, else why not (logged once)."""
        gen, expect, fd = self._gen, self._expect, self._fd
        if self.damaged or expect is None or gen & 1 or fd is None:
            return self.damaged
        try:
            st = os.fstat(fd)
            now = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:                                     # closed meanwhile
            return None
        if now == expect or self._gen != gen:               # unchanged, or a commit of ours ran meanwhile
            return None
        why = "data.mdb was changed by something other than this tier"
        self.damaged = why
        log.error("disk index %s: %s; the index is no longer read or written (blocks on disk are "
                  "misses until the tier reopens and checks it)", self.where, why)
        return why
