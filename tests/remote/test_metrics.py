"""Metrics registry and its Prometheus text exposition."""
from __future__ import annotations

import pytest

from kvtier.metrics import Metrics


def test_counters_gauges_and_exposition():
    m = Metrics("kvtier_test")
    m.describe("requests_total", "counter", "requests served")
    m.inc("requests_total", op="get", outcome="ok")
    m.inc("requests_total", 2, op="get", outcome="ok")
    m.inc("requests_total", op="put", outcome="ok")
    m.set("resident_blocks", 7, ns='we"ird\\ns')
    assert m.get("requests_total", op="get", outcome="ok") == 3
    assert m.total("requests_total") == 4
    text = m.exposition()
    assert "# HELP kvtier_test_requests_total requests served\n" in text
    assert "# TYPE kvtier_test_requests_total counter\n" in text
    assert 'kvtier_test_requests_total{op="get",outcome="ok"} 3.0\n' in text
    assert "# TYPE kvtier_test_resident_blocks gauge\n" in text
    assert 'kvtier_test_resident_blocks{ns="we\\"ird\\\\ns"} 7.0\n' in text
    assert m.snapshot()["requests_total{op=put,outcome=ok}"] == 1


def test_bad_names_are_refused():
    with pytest.raises(ValueError):
        Metrics("bad-prefix")
    with pytest.raises(ValueError):
        Metrics().describe("x y", "counter", "")
    with pytest.raises(ValueError):
        Metrics().describe("x", "histogram", "")
