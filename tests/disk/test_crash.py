"""Crash loop: a child stores blocks in a loop and is SIGKILLed at random moments.

After every kill the directory is reopened: every indexed block must read back
byte-identical to what its key says it holds, check() must find index and slabs
in agreement, and no key the child never finished writing may read back wrong.
The child reuses slots constantly (a small tier, random discards), so a stale
index entry pointing at a rewritten slot would show.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from kvtier.keys import Namespace
from kvtier.tiers.disk.tier import DiskTier

from tests.helpers import ROOT

BB = 3 * 4096 + 100            # whole pages plus a tail page (span I/O, bounce buffers)
BB_ALIGNED = 4 * 4096          # whole pages from page-aligned buffers (checksummed block I/O)
NS = Namespace("crash-model", 16)
CAP = 48 * 16384
SLAB = 16 * 16384
KILLS = 24


def payload(key: bytes, bb: int = BB) -> bytes:
    rng = np.random.default_rng(int.from_bytes(key, "little"))
    return rng.integers(0, 256, bb, dtype=np.uint8).tobytes()


CHILD = textwrap.dedent("""
    import os, random, sys, numpy as np
    from tests.disk.test_crash import payload, NS, CAP, SLAB
    from kvtier import native
    from kvtier.tiers.disk.tier import DiskTier
    path, gen, durability, BB, aligned = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
    t = DiskTier("disk", path, BB, CAP, namespace=NS, slab_bytes=SLAB, durability=durability)

    def source(key):
        data = payload(key, BB)
        if not aligned:
            return data
        buf = native.alloc_aligned(BB)
        buf[:] = np.frombuffer(data, dtype=np.uint8)
        return memoryview(buf)
    held = dict(t.recover())                     # key -> slot
    rng = random.Random(gen)
    log = open(os.path.join(path, "started.log"), "a")
    print("ready", flush=True)
    i = 0
    while True:
        n = rng.randint(1, 6)
        if t.num_free < n:
            victims = rng.sample(sorted(held), min(len(held), n + rng.randint(0, 4)))
            t.discard(victims, [held[k] for k in victims])
            t.free([held.pop(k) for k in victims])
        slots = t.allocate(n)
        keys = [gen.to_bytes(4, "little") + (i + j).to_bytes(12, "little") for j in range(n)]
        i += n
        log.write(" ".join(k.hex() for k in keys) + "\\n")
        log.flush()                              # the page cache survives SIGKILL
        ok = t.write(keys, slots, [source(k) for k in keys])
        for k, s, good in zip(keys, slots, ok):
            if good:
                held[k] = s
            else:
                t.free([s])
""")


def _verify(path: str, bb: int) -> tuple[int, set[bytes]]:
    t = DiskTier("disk", path, bb, CAP, namespace=NS, slab_bytes=SLAB)
    try:
        report = t.check()
        assert report["ok"], report
        found = t.recover()
        started = set()
        if os.path.exists(os.path.join(path, "started.log")):
            with open(os.path.join(path, "started.log")) as f:
                for line in f:
                    started.update(bytes.fromhex(h) for h in line.split())
        assert {k for k, _ in found} <= started, "a key nobody wrote is indexed"
        assert len({s for _, s in found}) == len(found), "two blocks share a slot"
        dsts = [bytearray(bb) for _ in found]
        ok = t.read([k for k, _ in found], [s for _, s in found], [memoryview(d) for d in dsts])
        for (key, _), good, d in zip(found, ok, dsts):
            assert good, f"indexed block {key.hex()} did not read back"
            assert bytes(d) == payload(key, bb), f"indexed block {key.hex()} has wrong bytes"
        assert t.stats().get("corrupt_blocks", 0) == 0
        return len(found), {k for k, _ in found}
    finally:
        t.close()


@pytest.mark.parametrize("bb,aligned", [(BB, False), (BB_ALIGNED, True)], ids=["tail-page", "aligned"])
def test_sigkill_loop_keeps_every_indexed_block_intact(tmp_path, bb, aligned):
    path = str(tmp_path / "tier")
    rng = random.Random(1234)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = CHILD
    seen_blocks = []
    for gen in range(1, KILLS + 1):
        durability = ("none", "data", "full")[gen % 3]
        child = subprocess.Popen([sys.executable, "-c", script, path, str(gen), durability, str(bb),
                                  "1" if aligned else "0"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            line = child.stdout.readline()
            assert line.strip() == b"ready", child.stderr.read().decode()[-2000:]
            time.sleep(rng.uniform(0.0, 0.3))
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            child.send_signal(signal.SIGKILL)
        finally:
            child.wait(timeout=30)
            child.stdout.close()
            child.stderr.close()
        assert child.returncode == -signal.SIGKILL
        n, _ = _verify(path, bb)
        seen_blocks.append(n)
    # the loop really stored blocks across restarts (the tier was filled and reused)
    assert max(seen_blocks) > 0
    assert sum(1 for n in seen_blocks if n) >= KILLS // 2, json.dumps(seen_blocks)
