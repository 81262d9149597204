"""``kvtier replay --sweep`` and the one-bandwidth-per-command prefill estimate."""
from __future__ import annotations

import json

import pytest

from kvtier.cli.replay import parse_sweep
from kvtier.errors import ConfigError
from kvtier.policy import policy_names
from kvtier.replay import report
from kvtier.replay.plots import capacity_sweep
from kvtier.replay.report import block_saving_s, format_sweep
from kvtier.replay.synthetic import GENERATORS
from kvtier.replay.trace import write_trace


def test_parse_sweep_takes_percentages_and_token_counts():
    assert parse_sweep("1%,50%", 1000, 512) == [10 * 512, 500 * 512]
    assert parse_sweep("3M, 1%", 1000, 512) == [10 * 512, 3_000_000 // 512 * 512]
    assert parse_sweep("0.01%", 1000, 512) == [512]                  # never below one block
    for bad in ("0%", "101%", "x%", "lots", "100"):
        with pytest.raises(ConfigError, match="--sweep"):
            parse_sweep(bad, 1000, 512)


def test_format_sweep_has_every_policy_every_capacity_and_the_ratio():
    tr = GENERATORS["rag"](num_requests=300)
    rows = capacity_sweep(tr, ["lru", "adaptive"], [20 * 512, 80 * 512])
    text = format_sweep(rows, "adaptive", "lru", distinct_blocks=400)
    lines = text.splitlines()
    assert "adaptive (default)" in lines[0] and "belady" in lines[0] and "adaptive / lru" in lines[0]
    assert len(lines) == 4 and "10,240" in lines[2] and "5.0%" in lines[2]
    hit = {(r["policy"], r["capacity_blocks"]): r["hit_ratio"] for r in rows}
    assert f"{hit[('adaptive', 20)] / hit[('lru', 20)]:.3f}" in lines[2]


def test_block_saving_is_compute_less_load_and_never_negative():
    assert block_saving_s(512, 1 << 20, 0.1, 1.0) == pytest.approx(0.0512 - (1 << 20) / 1e9)
    assert block_saving_s(512, 1 << 30, 0.1, 1.0) == 0.0                # slower than recompute
    assert block_saving_s(512, 1 << 20, 0.1, None) == pytest.approx(0.0512)


def _trace_file(tmp_path):
    p = tmp_path / "rag.jsonl"
    write_trace(GENERATORS["rag"](num_requests=400), p)
    return p


def test_cli_sweep_prints_every_policy_and_measures_the_bandwidth_once(tmp_path, capsys, monkeypatch):
    from kvtier.cli import main
    calls = []
    monkeypatch.setattr(report, "measure_host_gbps", lambda: calls.append(1) or 12.5)
    out = tmp_path / "out.jsonl"
    rc = main(["replay", str(_trace_file(tmp_path)), "--host-tokens", "64k", "--sweep", "2%,10%,64k",
               "--json", str(out), "--no-progress"])
    assert rc == 0 and len(calls) == 1
    text = capsys.readouterr().out
    assert "host load bandwidth: 12.50 GB/s (measured once" in text
    table = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert len(table) == 2 + 3                  # 2%, 10% and 64k (the host capacity)
    for name in policy_names() + ["belady", "infinite", "adaptive / lru"]:
        assert name in table[0]
    assert "prefill saved at the host capacity (64,000 tokens), every policy costed at the same 12.50 GB/s" in text
    s = json.loads(out.read_text())
    assert s["prefill"]["host"]["gbps"] == 12.5
    assert {r["policy"] for r in s["sweep"]} == set(policy_names()) | {"belady"}


def test_cli_takes_the_bandwidth_from_the_flag(tmp_path, capsys, monkeypatch):
    from kvtier.cli import main
    monkeypatch.setattr(report, "measure_host_gbps", lambda: pytest.fail("measured despite --host-gbps"))
    p = _trace_file(tmp_path)
    assert main(["replay", str(p), "--host-tokens", "64k", "--host-gbps", "7", "--no-progress"]) == 0
    assert "host load bandwidth: 7.00 GB/s (--host-gbps)" in capsys.readouterr().out
    assert main(["replay", str(p), "--host-gbps", "0"]) == 2
    assert main(["replay", str(p), "--sweep", "0%"]) == 2


def test_cli_help_lists_the_sweep_and_every_generator(capsys):
    from kvtier.cli import main
    with pytest.raises(SystemExit) as e:
        main(["replay", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--sweep" in text and "1%,2%,5%,10%,25%,50%" in text
    assert all(name in text for name in GENERATORS)
