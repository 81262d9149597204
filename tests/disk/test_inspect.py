"""`kvtier inspect DIR [--check]`."""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys

import pytest

from kvtier.cli import main
from kvtier.keys import Namespace

from tests.disk.helpers import NS, flip, make, put
from tests.helpers import ROOT


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(["inspect", *argv])
    return code, capsys.readouterr().out


def test_inspect_reports_blocks_namespaces_and_free_space(tmp_path, capsys):
    t = make(tmp_path, slots=16, per_slab=4)
    put(t, range(5))
    t.close()
    other = make(tmp_path / "b", slots=16, per_slab=4, namespace=Namespace("other", 16))
    other.close()
    code, out = _run(capsys, str(tmp_path), "--json")
    assert code == 0
    d = json.loads(out)
    assert d["blocks"] == 5 and d["bytes"] == 5 * t.block_bytes
    assert d["free_slots"] == 11 and d["capacity_slots"] == 16
    assert d["namespaces"] == {NS.label: 5}
    assert d["slab_files"] == 2 and d["in_use_by_pid"] is None
    code, out = _run(capsys, str(tmp_path))
    assert code == 0 and "blocks        5" in out and NS.label in out


def _run_elsewhere(*argv) -> tuple[int, str]:
    """In another process, as an operator would while a server holds the directory."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", "import sys; from kvtier.cli import main; sys.exit(main())",
                        "inspect", *argv], capture_output=True, text=True, env=env, timeout=60)
    return r.returncode, r.stdout


def test_inspect_check_passes_then_fails_on_a_flipped_byte(tmp_path):
    t = make(tmp_path, slots=8, per_slab=8)
    placed = put(t, range(6))
    code, out = _run_elsewhere(str(tmp_path), "--check")   # works while the tier is open
    assert code == 0 and "check         ok" in out and f"in use by pid {os.getpid()}" in out
    flip(t, next(iter(placed.values())), 10, random.Random(3))
    code, out = _run_elsewhere(str(tmp_path), "--check")
    assert code == 1 and "FAILED" in out and "checksum" in out
    t.close()


def test_inspect_check_finds_a_missing_slab(tmp_path, capsys):
    t = make(tmp_path, slots=8, per_slab=4)
    put(t, range(8))
    t.close()
    os.unlink(tmp_path / "slab-00001.kvt")
    code, out = _run(capsys, str(tmp_path), "--check", "--json")
    d = json.loads(out)
    assert code == 1 and d["check"]["problem_kinds"] == {"missing_slab": 4}


def test_inspect_a_directory_that_is_not_a_tier(tmp_path, capsys):
    code = main(["inspect", str(tmp_path)])
    assert code == 2


def _root_page(path, db: bytes) -> int:
    """Byte offset in index/data.mdb of a named LMDB database's root page."""
    import lmdb
    env = lmdb.open(os.path.join(path, "index"), readonly=True, lock=False, max_dbs=2, subdir=True)
    with env.begin() as txn:
        record = bytes(txn.get(db))             # the MDB_db record in the main database
    psize = env.stat()["psize"]
    env.close()
    return struct.unpack_from("<Q", record, len(record) - 8)[0] * psize   # md_root comes last


def _damage_db_root(path, db: bytes) -> None:
    """Flip bits in the page-type flags of a named LMDB database's root page (a leaf
    becomes an 'overflow' page), the way a bit flip on the SSD would: the environment
    still opens, and the damage shows only when that database is read."""
    flags_at = _root_page(path, db) + 10        # page header: pgno (8), pad (2), flags (2)
    with open(os.path.join(path, "index", "data.mdb"), "r+b") as f:
        f.seek(flags_at)
        flags = f.read(1)[0]
        assert flags & 0x02, "the root of a small database is a leaf page"
        f.seek(flags_at)
        f.write(bytes([flags ^ 0x06]))


@pytest.mark.parametrize("db", [b"blocks", b"meta"])
def test_inspect_check_reports_a_bit_flipped_index(tmp_path, db):
    """Issue 19: MDB_CORRUPTED from a damaged index page was an error exit (2); it is
    a finding (exit 1) with a report that names the index."""
    t = make(tmp_path, slots=8, per_slab=8)
    put(t, range(6))
    t.close()
    _damage_db_root(tmp_path, db)
    code, out = _run_elsewhere(str(tmp_path), "--check")
    assert code == 1, out
    assert "index damaged" in out and os.path.join(str(tmp_path), "index") in out
    assert "MDB_CORRUPTED" in out
    code, out = _run_elsewhere(str(tmp_path), "--check", "--json")
    d = json.loads(out)
    assert code == 1 and d["ok"] is False and "index damaged" in d["problems"][0]


def test_inspect_check_survives_an_index_page_that_crashes_lmdb(tmp_path, capsys):
    """A flipped node offset in a leaf page sends LMDB past the end of the file (but
    inside its map): reading that node is SIGBUS, in the checker's child process."""
    t = make(tmp_path, slots=8, per_slab=8)
    put(t, range(6))
    t.close()
    data = tmp_path / "index" / "data.mdb"
    page = _root_page(tmp_path, b"blocks")
    assert page + 0xFFF0 > data.stat().st_size, "the flipped offset must point past the file"
    with open(data, "r+b") as f:
        f.seek(page + 16)                        # mp_ptrs[0]: where the first node starts
        f.write(struct.pack("<H", 0xFFF0))
    code, out = _run(capsys, str(tmp_path), "--check")
    assert code == 1 and "index damaged" in out and "killed the checker (SIG" in out
    assert os.path.join(str(tmp_path), "index") in out


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 4096])
def test_inspect_check_reports_an_overwritten_or_truncated_index(tmp_path, capsys, garbage):
    t = make(tmp_path, slots=8, per_slab=8)
    put(t, range(6))
    t.close()
    data = tmp_path / "index" / "data.mdb"
    data.write_bytes(garbage + data.read_bytes()[len(garbage):] if garbage else data.read_bytes()[:8192])
    code, out = _run(capsys, str(tmp_path), "--check")
    assert code == 1 and "index damaged" in out and "index" in out


def test_verify_reports_an_index_that_fails_half_way(tmp_path):
    """An index whose pages fail part way through the walk is a problem of kind 'index'."""
    from kvtier.tiers.disk.check import verify
    from kvtier.tiers.disk.index import IndexFailure
    t = make(tmp_path, slots=8, per_slab=8)
    put(t, range(6))

    class Failing:
        def items(self):
            yield from list(t.index.items())[:2]
            raise IndexFailure("disk index x: mdb_cursor_get: MDB_CORRUPTED")

    report = verify(Failing(), t.geometry, t.path, salt=t.salt)
    t.close()
    assert report["ok"] is False and report["blocks"] == 2
    assert report["problem_kinds"] == {"index": 1} and "MDB_CORRUPTED" in report["problems"][0]
