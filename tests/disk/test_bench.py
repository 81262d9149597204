"""`kvtier bench disk` runs end to end on a tiny working set and reports every path."""
from __future__ import annotations

import argparse

from kvtier.bench import disk


def test_bench_disk_reports_tier_raw_dd_and_safetensors(tmp_path):
    p = argparse.ArgumentParser()
    disk.add_arguments(p)
    args = p.parse_args(["--dir", str(tmp_path), "--sizes", "65536", "--depths", "1,2",
                         "--working-set", str(1 << 20), "--repeat", "1"])
    rows = disk.run(args)
    paths = {(r["path"], r["op"]) for r in rows}
    assert {("tier", "write"), ("tier", "read"), ("raw", "write"), ("raw", "read"),
            ("safetensors", "write"), ("safetensors", "read")} <= paths
    for r in rows:
        assert {"suite", "case", "bytes", "seconds", "gbps", "peak_gbps", "ratio"} <= set(r)
        if r["path"] == "tier":
            assert r["gbps"] > 0 and r["peak_gbps"] > 0
            assert abs(r["ratio"] - r["gbps"] / r["peak_gbps"]) < 0.01 * max(1.0, r["ratio"])
            assert r["vs_safetensors"] > 0
    assert not any(p.name.startswith("run-") for p in tmp_path.iterdir())   # the run cleans up after itself
