"""Counters and gauges with labels, and their Prometheus text exposition.

A :class:`Metrics` registry is a plain thread-safe dict of samples; no client
library, no background thread.  Any component can own one and expose it:

    m = Metrics(prefix="kvtier_server")
    m.describe("requests_total", "counter", "requests served, by op and outcome")
    m.inc("requests_total", op="get", outcome="ok")
    m.set("namespace_bytes", 4096, ns="alice")
    m.exposition()      # Prometheus text format 0.0.4

:func:`serve_http` answers ``GET /metrics`` on a small HTTP server thread.
"""
from __future__ import annotations

import re
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_TYPES = ("counter", "gauge")


def _label_value(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Named counters and gauges, each with any number of label sets."""

    def __init__(self, prefix: str = "kvtier"):
        if not _NAME.match(prefix):
            raise ValueError(f"metric prefix {prefix!r} is not a Prometheus name")
        self.prefix = prefix
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple, float]] = defaultdict(dict)
        self._meta: dict[str, tuple[str, str]] = {}

    def describe(self, name: str, kind: str, help_: str) -> None:
        if not _NAME.match(name) or kind not in _TYPES:
            raise ValueError(f"metric {name!r} of kind {kind!r}: need a Prometheus name and one of {_TYPES}")
        self._meta[name] = (kind, help_)

    def inc(self, name: str, amount: float = 1, **labels: object) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0) + amount

    def set(self, name: str, value: float, **labels: object) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[name][key] = value

    def get(self, name: str, **labels: object) -> float:
        with self._lock:
            return self._values.get(name, {}).get(tuple(sorted(labels.items())), 0)

    def total(self, name: str) -> float:
        """Sum over every label set of one metric."""
        with self._lock:
            return sum(self._values.get(name, {}).values())

    def snapshot(self) -> dict[str, float]:
        """``{"name{k=v,...}": value}``, for stats replies and logs."""
        with self._lock:
            out = {}
            for name, series in self._values.items():
                for key, v in series.items():
                    lab = ",".join(f"{k}={v2}" for k, v2 in key)
                    out[f"{name}{{{lab}}}" if lab else name] = v
            return out

    def exposition(self) -> str:
        """Prometheus text format 0.0.4."""
        lines = []
        with self._lock:
            for name in sorted(self._values):
                full = f"{self.prefix}_{name}"
                kind, help_ = self._meta.get(name, ("counter" if name.endswith("_total") else "gauge", ""))
                if help_:
                    lines.append(f"# HELP {full} {help_}")
                lines.append(f"# TYPE {full} {kind}")
                for key, v in sorted(self._values[name].items(), key=lambda kv: str(kv[0])):
                    lab = ",".join(f'{k}="{_label_value(x)}"' for k, x in key)
                    val = repr(float(v)) if not float(v).is_integer() else str(int(v))
                    lines.append(f"{full}{{{lab}}} {val}" if lab else f"{full} {val}")
        return "\n".join(lines) + "\n"


def serve_http(metrics: Metrics, host: str, port: int) -> ThreadingHTTPServer:
    """Answer ``GET /metrics`` on (host, port) from a daemon thread; call ``.shutdown()`` to stop."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = metrics.exposition().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="kvtier-metrics", daemon=True).start()
    return httpd
