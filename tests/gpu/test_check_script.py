"""bench/gpu_check.sh, the device check, as far as it can be checked without a device."""
from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.helpers import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.sh"


def text() -> str:
    return SCRIPT.read_text()


def test_it_parses():
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_it_runs_every_gpu_test_not_only_the_marked_ones():
    s = text()
    pytest_lines = [ln for ln in s.splitlines() if "-m pytest" in ln]
    assert pytest_lines and all("-m gpu" not in ln for ln in pytest_lines)
    assert "tests/gpu" in s and "KVTIER_NVRTC_DIR" in s


def test_wheels_are_fetched_for_the_devices_python_and_cupy_is_named_for_cuda_13():
    s = text()
    assert "pip download --no-deps --only-binary=:all: --python-version 3.12" in s
    assert "cuda13" in s


def test_its_time_limits_fit_in_eight_minutes():
    s = text()
    limits = [int(x) for x in re.findall(r"timeout (\d+) ", s)] + [int(x) for x in re.findall(r"left (\d+)", s)]
    assert limits and max(limits) <= 470, limits


def test_the_batch_summary_reads_the_bench_rows(tmp_path):
    s = text()
    start = s.index("\n", s.index("<<'EOF'")) + 1
    code = s[start:s.index("\nEOF", start)]
    rows = [{"case": "peak h2d 64MiB"},
            {"case": "store LBNHC 16tok dma", "batch": 12, "batch_failures": 0, "batch_disabled": False,
             "batch_runtime": 13000},
            {"case": "LBNHC 256tok", "error": "RuntimeError: nvrtc"}]
    path = tmp_path / "gpu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = subprocess.run([sys.executable, "-", str(path)], input=code, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "batch 12 batch_failures 0" in res.stdout and "error rows 1" in res.stdout
