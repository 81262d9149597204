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


def test_a_failing_mechanism_is_an_error_row_and_the_others_still_run(monkeypatch):
    from kvtier.gpu import torch_ref
    arena = torch.empty(16 << 20, dtype=torch.uint8)
    case = bench_gpu.Case(torch, torch.device("cpu"), "LBHNC", 16, 4 << 20, arena, seed=3)

    def broken(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(torch_ref, "store", broken)
    rows = bench_gpu.run_case(torch, case, ["torch", "native"], {"h2d": 10.0, "d2h": 10.0}, repeat=2)
    by_case = {r["case"]: r for r in rows}
    assert "illegal memory access" in by_case["store LBHNC 16tok torch"]["error"]
    assert "error" not in by_case["load LBHNC 16tok torch"]           # the other direction still ran
    assert by_case["store LBHNC 16tok native"]["verified"] is True
    assert by_case["load LBHNC 16tok native"]["verified"] is True


def test_rows_reach_the_json_file_as_each_case_ends(tmp_path):
    import json
    path = tmp_path / "gpu.jsonl"
    out = bench_gpu.Emitter(str(path))
    out([bench_gpu.row("gpu", "peak h2d 64MiB", 1 << 26, 0.001, 60.0)])
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["case"] == "peak h2d 64MiB"

    def compile_error():
        raise RuntimeError("nvrtc: error")
    out.case("LBNHC 16tok", compile_error)
    out.case("MLA 16tok", lambda: [bench_gpu.row("gpu", "store MLA 16tok dma", 100, 0.01, 60.0)])
    rows = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert [r["case"] for r in rows] == ["peak h2d 64MiB", "LBNHC 16tok", "store MLA 16tok dma"]
    assert "nvrtc" in rows[1]["error"] and out.rows == rows


def test_a_failed_transfer_stops_only_its_timing():
    from kvtier.gpu.transfer import failed
    with pytest.raises(bench_gpu.CopyFailed, match="boom"):
        bench_gpu.time_transfers(lambda: failed("dma", 1, 1, "boom"), repeat=2, warmup=1)


def test_vllm_shaped_cases_run_on_cpu_tensors():
    from kvtier.bench.gpu_vllm import TINY, Engine, run_vllm_cases
    rows = run_vllm_cases(torch, torch.device("cpu"), {"h2d": 10.0, "d2h": 10.0}, TINY, steps=3, repeat=2)
    decode, prefill = rows
    assert decode["case"] == f"vllm decode +{TINY.new_blocks} stores auto" and decode["verified"] is True
    assert decode["no_connector_step_s"] > 0 and "hold_up" in decode
    assert prefill["verified"] is True and prefill["resident_s"] > 0 and prefill["whole_then_compute_s"] > 0
    e = Engine(torch, torch.device("cpu"), TINY)
    try:                                   # vLLM's FlashAttention layout, one tensor per layer
        assert [tuple(t.shape) for t in e.kv] == [(2, TINY.num_blocks, TINY.block_size, 2, 16)] * 4
        assert e.layout.block_dim == 1 and e.arena.numel() == e.num_slots * e.layout.block_bytes
    finally:
        e.close()


def test_the_pinned_arena_is_exactly_the_size_asked_for():
    from kvtier.bench.gpu_vllm import pinned_arena
    n = 320 * 4096 + 123
    t, keep, pin = pinned_arena(torch, n)
    assert t.numel() == n and t.dtype == torch.uint8 and int(t.sum()) == 0
    if not torch.cuda.is_available():
        assert pin is None
    else:
        assert pin.check()
        pin.close()
