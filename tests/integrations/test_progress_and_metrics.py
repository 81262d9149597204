"""Progress bars only where wanted and never in JSON output; metrics through prometheus-client,
and a clear no-op without it."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import urllib.request

import pytest

from kvtier import progress
from kvtier.metrics import CacheExporter, Metrics, exposition, serve_http

from tests.helpers import ROOT, k


def _kvtier(*argv, tty_stderr: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "kvtier", *argv], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=300)


# ---- progress ------------------------------------------------------------------------------
class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_is_wanted_on_a_terminal_or_when_asked():
    assert progress.wanted(None, _Tty()) is True
    assert progress.wanted(None, io.StringIO()) is False
    assert progress.wanted(True, io.StringIO()) is True
    assert progress.wanted(False, _Tty()) is False


def test_a_disabled_bar_draws_nothing_and_an_enabled_one_draws_on_its_stream():
    pytest.importorskip("tqdm")
    quiet = io.StringIO()
    with progress.bar(10, "x", enabled=False, file=quiet) as b:
        b.update(5, note="n")
        b.tick_while_running(0.01)
    assert quiet.getvalue() == "" and not b.enabled
    out = io.StringIO()
    with progress.bar(10, "replay t", enabled=True, file=out) as b:
        b.update(10, note="hit 0.5")
    assert "replay t" in out.getvalue() and "10/10" in out.getvalue()


def test_without_tqdm_a_wanted_bar_is_skipped_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setattr(progress, "_warned", False)
    with caplog.at_level(logging.INFO, logger="kvtier.progress"):
        for _ in range(3):
            with progress.bar(3, "x", enabled=True) as b:
                b.update(3)
            assert not b.enabled
    assert len([r for r in caplog.records if "tqdm" in r.message]) == 1


def test_replay_draws_its_bar_on_stderr_only_and_keeps_json_clean(tmp_path):
    pytest.importorskip("tqdm")
    out = tmp_path / "out.jsonl"
    r = _kvtier("replay", "synthetic:chat", "--limit", "300", "--host-tokens", "64k", "--host-gbps", "7",
                "--no-bounds", "--json", str(out), "--progress")
    assert r.returncode == 0, r.stderr
    assert "replay" in r.stderr and "req" in r.stderr          # the bar
    assert "\r" not in r.stdout and "req/s" not in r.stdout
    lines = out.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])
    quiet = _kvtier("replay", "synthetic:chat", "--limit", "300", "--host-tokens", "64k", "--host-gbps", "7",
                    "--no-bounds")                               # stderr is a pipe: no bar
    assert quiet.returncode == 0 and "req/s" not in quiet.stderr and "\r" not in quiet.stderr


def test_inspect_check_bar_goes_to_stderr_and_stdout_stays_one_json_object(tmp_path):
    pytest.importorskip("tqdm")
    pytest.importorskip("lmdb")
    from tests.disk.helpers import make, put
    t = make(tmp_path, slots=16, per_slab=4)
    put(t, range(7))
    t.close()
    r = _kvtier("inspect", str(tmp_path), "--check", "--json", "--progress")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["check"]["blocks"] == 7
    assert "check" in r.stderr and "7/7" in r.stderr
    quiet = _kvtier("inspect", str(tmp_path), "--check", "--json")
    assert quiet.returncode == 0 and "7/7" not in quiet.stderr and json.loads(quiet.stdout)["ok"]


def test_bench_takes_the_progress_flags():
    from kvtier.cli import build_parser
    args = build_parser().parse_args(["bench", "host", "--no-progress"])
    assert args.progress is False
    assert build_parser().parse_args(["bench", "host"]).progress is None


# ---- metrics -------------------------------------------------------------------------------
def test_counters_gauges_and_histograms_through_prometheus_client():
    pytest.importorskip("prometheus_client")
    m = Metrics("kvtier_t")
    m.describe("requests_total", "counter", "requests served")
    m.describe("latency_seconds", "histogram", "latency", buckets=(0.01, 0.1))
    m.inc("requests_total", 2, op="get")
    m.set("namespace_bytes", 7, ns='we"ird')
    m.observe("latency_seconds", 0.05, op="get")
    m.observe("latency_seconds", 5.0, op="get")
    text = m.exposition()
    assert "# TYPE kvtier_t_requests_total counter" in text
    assert 'kvtier_t_requests_total{op="get"} 2.0' in text
    assert 'kvtier_t_namespace_bytes{ns="we\\"ird"} 7.0' in text
    assert 'kvtier_t_latency_seconds_bucket{le="0.01",op="get"} 0.0' in text
    assert 'kvtier_t_latency_seconds_bucket{le="0.1",op="get"} 1.0' in text
    assert 'kvtier_t_latency_seconds_bucket{le="+Inf",op="get"} 2.0' in text
    assert 'kvtier_t_latency_seconds_count{op="get"} 2.0' in text
    with pytest.raises(ValueError):
        m.describe("h", "histogram", "")                  # a histogram needs buckets
    with pytest.raises(ValueError):
        m.observe("requests_total", 1.0)


def test_a_cache_exporter_shows_every_series_before_anything_happens_and_counts_after():
    pytest.importorskip("prometheus_client")
    from kvtier.cache import TieredCache
    from kvtier.tiers.host import HostTier
    cache = TieredCache([HostTier("host", 64, 2)], transfer_threads=0)
    try:
        ex = CacheExporter(cache, labels={"engine": "0"})
        before = exposition(ex)
        for name in ("kvtier_tier_evicted_blocks_total", "kvtier_hit_blocks_total", "kvtier_load_seconds_bucket",
                     "kvtier_tier_corrupt_blocks_total", "kvtier_tier_capacity_bytes"):
            assert name in before
        for i in range(3):                                  # the third evicts the first
            h = cache.prepare_store([k(i)], "o")
            cache.complete_store(h, True)
        cache.lookup([k(2), k(9)])
        ex.observe_load(0.002, tier="host")
        httpd = serve_http(ex, "127.0.0.1", 0)
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{httpd.server_port}/metrics", timeout=10).read().decode()
        finally:
            httpd.shutdown()
        assert 'kvtier_tier_evicted_blocks_total{engine="0",tier="host"} 1.0' in text
        assert 'kvtier_hit_blocks_total{engine="0",tier="host"} 1.0' in text
        assert 'kvtier_miss_blocks_total{engine="0"} 1.0' in text
        assert 'kvtier_load_seconds_count{engine="0",tier="host"} 1.0' in text
        assert "process_resident_memory_bytes" in text or sys.platform != "linux"
    finally:
        cache.close()


def test_without_prometheus_client_metrics_count_but_export_nothing(monkeypatch, caplog):
    import kvtier.metrics as metrics
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.setattr(metrics, "_warned", False)
    m = Metrics("kvtier_t")
    m.inc("requests_total", op="get")
    with caplog.at_level(logging.WARNING, logger="kvtier.metrics"):
        assert m.exposition() == ""
        assert serve_http(m, "127.0.0.1", 0) is None
        assert list(m.collect()) == []
    assert m.get("requests_total", op="get") == 1 and m.snapshot() == {"requests_total{op=get}": 1}
    assert len([r for r in caplog.records if "prometheus-client" in r.message]) == 1
