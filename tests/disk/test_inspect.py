"""`kvtier inspect DIR [--check]`."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

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
