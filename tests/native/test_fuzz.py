"""Fuzz of every native op's arguments, in a child process so that a crash fails this test and
not the suite (issue 19): wild, misaligned, overlapping, huge and negative arguments give clean
TypeError/ValueError, and no byte outside the registered buffer changes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.helpers import ROOT

EXAMPLES = 150
LIMIT_S = 55


def test_fuzzed_arguments_never_crash_nor_touch_unregistered_memory():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("KVTIER_NATIVE_RANGES", None)
    proc = subprocess.run([sys.executable, "-m", "tests.native.fuzz_native", str(EXAMPLES)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=LIMIT_S)
    died = f" (killed by {signal.Signals(-proc.returncode).name})" if proc.returncode < 0 else ""
    assert proc.returncode == 0, f"fuzz child exited {proc.returncode}{died}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    assert "fuzz ok" in proc.stdout
