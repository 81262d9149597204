"""Does a disk tier's index agree with its slab files?  (``DiskTier.check``, ``kvtier inspect --check``)

Every index entry is read back from its slot and verified the way a read
would: the slot lies inside an existing slab, no two entries share a slot, and
the checksum of the slot's bytes matches the index.  Reads use plain buffered file descriptors of their own, so
this works on a directory that no tier has open.
"""
from __future__ import annotations

import os
from collections import Counter

import numpy as np

from ... import native
from .index import DiskIndex, IndexFailure
from .slabs import FORMAT_VERSION, SlotGeometry, block_checksums, slab_file, slab_sizes

MAX_PROBLEMS = 20
BATCH = 64


def verify(index: DiskIndex, geometry: SlotGeometry, path: str, salt: bytes | None = None) -> dict:
    """A report: ``ok``, ``blocks``, ``bad_blocks``, ``problems`` (first few), ``slots`` (indexed).
    An index whose pages cannot be walked is a problem of kind ``index``, not an exception."""
    g = geometry
    problems: list[str] = []
    kinds: Counter = Counter()

    def bad(kind: str, msg: str) -> None:
        kinds[kind] += 1
        if len(problems) < MAX_PROBLEMS:
            problems.append(msg)

    fds: dict[int, int | None] = {}
    sizes: dict[int, int] = {}

    def fd_of(slab: int) -> int | None:
        if slab not in fds:
            try:
                fds[slab] = os.open(slab_file(path, slab), os.O_RDONLY)
                sizes[slab] = os.fstat(fds[slab]).st_size
            except OSError:
                fds[slab] = None
        return fds[slab]

    owner: dict[int, bytes] = {}
    todo: list[tuple[bytes, object, int, int]] = []
    blocks = 0
    try:
        for key, e in index.items():
            blocks += 1
            if e is None or e.version != FORMAT_VERSION or e.length != g.block_bytes:
                bad("malformed", f"{key.hex()}: malformed entry")
                continue
            if salt is not None and e.salt != salt:
                bad("namespace", f"{key.hex()}: entry of another namespace")
                continue
            slot = e.slab * g.slots_per_slab + e.offset // g.slot_bytes
            if e.offset % g.slot_bytes or not 0 <= slot < g.num_slots or g.slab_of(slot) != e.slab:
                bad("range", f"{key.hex()}: slab {e.slab} offset {e.offset} is not a slot")
                continue
            if slot in owner:
                bad("shared_slot", f"{key.hex()}: slot {slot} also indexed for {owner[slot].hex()}")
                continue
            owner[slot] = key
            fd = fd_of(e.slab)
            if fd is None:
                bad("missing_slab", f"{key.hex()}: slab file {slab_file(path, e.slab)} is missing")
                continue
            if sizes[e.slab] < e.offset + g.slot_bytes:
                bad("truncated", f"{key.hex()}: slab {e.slab} is truncated at {sizes[e.slab]} bytes")
                continue
            todo.append((key, e, fd, slot))
            if len(todo) == BATCH:
                _verify_batch(todo, g, bad)
                todo = []
        if todo:
            _verify_batch(todo, g, bad)
    except IndexFailure as e:       # a damaged index is a finding too: report what came before
        bad("index", f"index damaged after {blocks} entries: {e}")
    finally:
        for fd in fds.values():
            if fd is not None:
                os.close(fd)
    nbad = sum(kinds.values())
    return {"ok": nbad == 0, "blocks": blocks, "bad_blocks": nbad, "problem_kinds": dict(kinds),
            "problems": problems, "slots": sorted(owner)}


def _verify_batch(todo, g: SlotGeometry, bad) -> None:
    n = len(todo)
    buf = native.alloc_aligned(n * g.slot_bytes)
    addrs = buf.ctypes.data + np.arange(n, dtype=np.uint64) * np.uint64(g.slot_bytes)
    lens = np.full(n, g.slot_bytes, dtype=np.uint64)
    res = native.pread_spans(np.array([fd for _, _, fd, _ in todo], dtype=np.int32),
                              np.array([e.offset for _, e, _, _ in todo], dtype=np.int64), addrs, lens,
                              within=[buf])
    crcs = block_checksums(addrs, g.block_bytes, within=[buf])
    for j, (key, e, _, slot) in enumerate(todo):
        if res[j] != g.slot_bytes:
            bad("unreadable", f"{key.hex()}: slot {slot} unreadable ({int(res[j])})")
            continue
        if crcs[j] != e.crc:
            bad("checksum", f"{key.hex()}: slot {slot} fails its checksum")


def summarize(index: DiskIndex, geometry: SlotGeometry, path: str) -> dict:
    """What a directory holds: blocks, bytes, namespaces, slab files and free space."""
    labels = index.namespaces()
    per_ns: Counter = Counter()
    blocks = 0
    for _, e in index.items():
        blocks += 1
        per_ns[e.salt if e is not None else b"?"] += 1
    slabs = slab_sizes(path)
    g = geometry
    return {
        "path": path,
        "blocks": blocks,
        "block_bytes": g.block_bytes,
        "bytes": blocks * g.block_bytes,
        "slot_bytes": g.slot_bytes,
        "capacity_slots": g.num_slots,
        "free_slots": max(0, g.num_slots - blocks),
        "free_bytes": max(0, g.num_slots - blocks) * g.slot_bytes,
        "slab_files": len(slabs),
        "slab_bytes_on_disk": sum(slabs.values()),
        "namespaces": {labels.get(s, s.hex()[:16] if isinstance(s, bytes) else "?"): c
                       for s, c in per_ns.items()},
    }
