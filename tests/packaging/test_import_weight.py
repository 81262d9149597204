"""``import kvtier`` (and the server) stays light: no torch, no CuPy, no vLLM until something needs them.

A ``kvtier serve`` process that imported torch would hold ~180 MiB more and start
seconds later on every node; the embedding API imports torch only when it is used.
"""
from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_import_loads_no_torch_cupy_or_vllm():
    code = ("import sys, kvtier, kvtier.remote.server, kvtier.cli.serve, kvtier.gpu.copier, kvtier.load_plan; "
            "print(sorted(m for m in ('torch', 'cupy', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
