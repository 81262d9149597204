"""A damaged LMDB index, at open or while the tier runs, never crashes the process and never
returns wrong bytes: it is walked in a child process before use, quarantined when damaged, and a
change made behind the tier's back turns it into misses (issue 19).  Each scenario runs in a child
process, so that a crash fails the test instead of the suite."""
from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import ROOT
from tests.disk.helpers import make, put
from tests.disk.test_inspect import _root_page

CHILD = textwrap.dedent("""
    import logging, os, struct, sys
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="LOG %(message)s")
    from tests.disk.helpers import make, verify
    from tests.helpers import block, k
    from kvtier.native import ranges
    ranges.set_mode("strict")
    damage = sys.argv[1]
    for path in sys.argv[2:]:
        t = make(path, slots=16, per_slab=8)
        held = dict(t.recover())
        print("recovered", len(held))
        if damage != "-":                    # while running: someone else writes into data.mdb
            at, raw = damage.split(":")
            with open(os.path.join(path, "index", "data.mdb"), "r+b") as f:
                f.seek(int(at))
                f.write(bytes.fromhex(raw))
        ok = verify(t, held)                 # any block that comes back must be exact
        print("read ok", sum(ok), "of", len(ok))
        slots = t.allocate(2) or []
        try:
            t.write([k(100 + i) for i in range(len(slots))], slots,
                    [memoryview(bytearray(block(k(100 + i), t.block_bytes))) for i in range(len(slots))])
        except OSError as e:                 # TierIOError: the index refused the commit
            print("write refused", e)
        st = t.stats()
        print("reads_off", st["reads_off"] is not None, "writes_off", st["writes_off"] is not None)
        t.close()
    print("closed cleanly")
""")


def run_child(*paths, damage: str = "-") -> str:
    """Open each tier directory in turn in one child: recover, read everything, write, close."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", CHILD, damage, *map(str, paths)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"child exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "closed cleanly" in r.stdout
    return r.stdout


def tier_with_blocks(path, n: int = 6) -> None:
    t = make(path, slots=16, per_slab=8)
    put(t, range(n))
    t.close()


def write_at(path, at: int, raw: bytes) -> None:
    with open(os.path.join(path, "index", "data.mdb"), "r+b") as f:
        f.seek(at)
        f.write(raw)


def quarantined(path) -> list[str]:
    return [n for n in os.listdir(path) if n.startswith("index.damaged-")]


def test_a_clean_close_seals_the_index_and_the_next_open_trusts_it(tmp_path):
    tier_with_blocks(tmp_path)
    assert os.path.exists(tmp_path / "index" / "seal")
    out = run_child(tmp_path)
    assert "recovered 6" in out and "read ok 6 of 6" in out and not quarantined(tmp_path)


def test_node_offset_past_the_file_at_open_is_quarantined_not_a_crash(tmp_path):
    # the page flip that makes LMDB read past the end of data.mdb (SIGBUS in-process)
    tier_with_blocks(tmp_path)
    write_at(tmp_path, _root_page(tmp_path, b"blocks") + 16, struct.pack("<H", 0xFFF0))
    out = run_child(tmp_path)
    assert "recovered 0" in out and "killed the checker" in out
    assert len(quarantined(tmp_path)) == 1
    assert "recovered 2" in run_child(tmp_path)          # the fresh index works and is sealed


def test_damaged_meta_pages_at_open_never_crash_nor_misread(tmp_path):
    dirs = []
    for page in (0, 1):
        d = tmp_path / f"meta{page}"
        tier_with_blocks(d)
        write_at(d, page * 4096 + 16, random.Random(page).randbytes(64))   # roots, last page, txn id
        dirs.append(d)
    run_child(*dirs)                                      # verify() in the child: exact or a miss


@pytest.mark.parametrize("group", range(3))
def test_random_bit_flips_at_open_never_crash_nor_misread(tmp_path, group):
    dirs = []
    for seed in range(group * 4, group * 4 + 4):
        d = tmp_path / f"seed{seed}"
        tier_with_blocks(d, n=10)
        data = d / "index" / "data.mdb"
        rng = random.Random(seed)
        size = data.stat().st_size
        with open(data, "r+b") as f:
            for _ in range(8):
                at = rng.randrange(size)
                f.seek(at)
                old = f.read(1)[0]
                f.seek(at)
                f.write(bytes([old ^ (1 << rng.randrange(8))]))
        dirs.append(d)
    run_child(*dirs)                                      # verify() in the child: exact or a miss


def test_damage_while_running_turns_the_index_into_misses_then_quarantine(tmp_path):
    tier_with_blocks(tmp_path)
    at = _root_page(tmp_path, b"blocks") + 16
    out = run_child(tmp_path, damage=f"{at}:{struct.pack('<H', 0xFFF0).hex()}")
    assert "recovered 6" in out
    assert "changed by something other than this tier" in out            # one clear log line
    assert "read ok 0 of 6" in out and "reads_off True writes_off True" in out
    assert not os.path.exists(tmp_path / "index" / "seal")               # never sealed as good
    out = run_child(tmp_path)                                            # the next open walks it
    assert "recovered 0" in out and len(quarantined(tmp_path)) == 1
