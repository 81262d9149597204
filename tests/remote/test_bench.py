"""`kvtier bench remote` runs end to end on tiny batches and reports every peer."""
from __future__ import annotations

import argparse
import shutil

import pytest

pytest.importorskip("zmq")

from kvtier.bench import remote  # noqa: E402


def test_bench_remote_reports_tcp_bare_zmq_kvtier_and_redis():
    p = argparse.ArgumentParser()
    remote.add_arguments(p)
    argv = ["--sizes", str(256 << 10), "--batch-bytes", str(1 << 20), "--repeat", "1", "--samples", "3"]
    if shutil.which("redis-server") is None:
        argv.append("--no-redis")
    rows = remote.run(p.parse_args(argv))
    cases = {r["case"] for r in rows}
    peers = ["tcp", "zmq", "kvtier"] + (["redis"] if "--no-redis" not in argv else [])
    assert {f"{peer} {op} 256KiB" for peer in peers for op in ("get", "put")} == cases
    for r in rows:
        assert r["gbps"] > 0 and r["peak_gbps"] > 0 and r["cpu_s_per_gb"] > 0
        assert 0 < r["p50_ms"] <= r["p99_ms"] and 0 < r["p50_alone_ms"] <= r["p99_alone_ms"]
        if r["case"].startswith("kvtier"):
            assert r["vs_zmq"] > 0 and ("vs_redis" in r) == ("redis" in peers)
