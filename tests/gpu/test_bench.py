"""`kvtier bench gpu`: refuses cleanly without CUDA; its case machinery runs on CPU tensors."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kvtier.bench import gpu as bench_gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_in_one_line_without_cuda():
    res = subprocess.run([sys.executable, "-m", "kvtier", "bench", "gpu"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "CUDA" in lines[0], res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize("layout", ["LBNHC", "BLHNC", "MLA"])
def test_cases_verify_and_report_ratios_on_cpu(layout):
    arena = torch.empty(16 << 20, dtype=torch.uint8)
    case = bench_gpu.Case(torch, torch.device("cpu"), layout, 16, 8 << 20, arena, seed=1)
    assert case.num >= 2 and len(set(case.ids.tolist())) == case.num
    rows = bench_gpu.run_case(torch, case, ["native"], {"h2d": 10.0, "d2h": 10.0}, repeat=2)
    rows += bench_gpu.run_both(torch, case, ["native"], {"bidir": 20.0}, repeat=2)
    assert [r["case"].split()[0] for r in rows] == ["store", "load", "store+load"]
    for r in rows:
        assert r["bytes"] > 0 and r["gbps"] > 0 and r["ratio"] == pytest.approx(r["gbps"] / r["peak_gbps"], abs=1e-3)
    assert rows[0]["verified"] is True and rows[1]["verified"] is True


def test_a_wrong_copy_is_caught_by_the_slot_check():
    arena = torch.empty(16 << 20, dtype=torch.uint8)
    case = bench_gpu.Case(torch, torch.device("cpu"), "LBHNC", 16, 4 << 20, arena, seed=2)
    from kvtier.gpu.copier import KVCopier
    KVCopier(case.layout, "native").store(case.ids, case.addrs)
    assert case.check_slot(torch, 1)
    assert case.check_all(torch)
    arena[case.slot_bytes + 100] ^= 0xFF
    assert not case.check_slot(torch, 1)
    assert not case.check_all(torch)
