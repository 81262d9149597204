"""Counters, gauges and histograms with labels, exported through prometheus-client.

Two sources of metrics, both Prometheus collectors (a ``collect()`` method):

    Metrics(prefix)          a registry a component counts into itself
                             (``kvtier serve`` owns one, prefix ``kvtier_server``)
    CacheExporter(cache)     reads a TieredCache's ``stats()`` and each tier's
                             counters when scraped: no work on the cache's path

    m = Metrics(prefix="kvtier_server")
    m.describe("requests_total", "counter", "requests served, by op and outcome")
    m.inc("requests_total", op="get", outcome="ok")
    m.set("namespace_capacity_bytes", 4096, ns="alice")
    m.remove("namespace_capacity_bytes", ns="alice")     # alice's namespace is gone
    m.exposition()                     # Prometheus text format 0.0.4

:func:`serve_http` answers ``GET /metrics`` for any number of collectors.
Every name exported here is listed in docs/metrics.md.

prometheus-client is optional (``pip install 'kvtier[metrics]'``).  Without
it counting still works (``get``, ``total``, ``snapshot`` feed stats replies
and logs), but nothing is exported: ``exposition()`` is empty, ``serve_http``
returns None, and one log line says why.
"""
from __future__ import annotations

import bisect
import logging
import re
import threading
from collections import defaultdict
from typing import Iterable

from .errors import KVTierError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_TYPES = ("counter", "gauge", "histogram")
# load latency: 100 us .. 10 s, about three buckets a decade
LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_warned = False


def prometheus():
    """The prometheus_client module, or None (logged once) where it is not installed."""
    global _warned
    try:
        import prometheus_client
        return prometheus_client
    except ImportError:
        if not _warned:
            _warned = True
            log.warning("prometheus-client is not installed (pip install 'kvtier[metrics]'): "
                        "metrics are counted but not exported")
        return None


class _Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self, n: int):
        self.counts = [0] * (n + 1)        # last: above the largest bound (+Inf)
        self.sum = 0.0


class Metrics:
    """Named counters, gauges and histograms, each with any number of label sets."""

    def __init__(self, prefix: str = "kvtier"):
        if not _NAME.match(prefix):
            raise ValueError(f"metric prefix {prefix!r} is not a Prometheus name")
        self.prefix = prefix
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple, float]] = defaultdict(dict)
        self._hists: dict[str, dict[tuple, _Histogram]] = defaultdict(dict)
        self._meta: dict[str, tuple[str, str]] = {}
        self._buckets: dict[str, tuple[float, ...]] = {}

    def describe(self, name: str, kind: str, help_: str, buckets: Iterable[float] | None = None) -> None:
        """Declare a metric; a histogram needs its (increasing) bucket bounds."""
        if not _NAME.match(name) or kind not in _TYPES:
            raise ValueError(f"metric {name!r} of kind {kind!r}: need a Prometheus name and one of {_TYPES}")
        if kind == "histogram":
            b = tuple(float(x) for x in (buckets or ()))
            if not b or any(x >= y for x, y in zip(b, b[1:])):
                raise ValueError(f"histogram {name!r}: buckets must be a non-empty increasing sequence, got {b}")
            self._buckets[name] = b
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

    def remove(self, name: str, **labels: object) -> None:
        """Forget one label set of a metric (a gauge of something that no longer exists),
        so the series stops being exported instead of lingering at 0."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values.get(name, {}).pop(key, None)
            self._hists.get(name, {}).pop(key, None)

    def observe(self, name: str, value: float | None, **labels: object) -> None:
        """Count ``value`` into a histogram declared with ``describe(name, "histogram", ...)``;
        None only creates the (empty) series, so its name is exported before the first value."""
        bounds = self._buckets.get(name)
        if bounds is None:
            raise ValueError(f"metric {name!r} is not a described histogram")
        key = tuple(sorted(labels.items()))
        with self._lock:
            h = self._hists[name].get(key)
            if h is None:
                h = self._hists[name][key] = _Histogram(len(bounds))
            if value is not None:
                h.counts[bisect.bisect_left(bounds, value)] += 1
                h.sum += value

    def get(self, name: str, **labels: object) -> float:
        with self._lock:
            return self._values.get(name, {}).get(tuple(sorted(labels.items())), 0)

    def total(self, name: str) -> float:
        """Sum over every label set of one metric."""
        with self._lock:
            return sum(self._values.get(name, {}).values())

    def snapshot(self) -> dict[str, float]:
        """``{"name{k=v,...}": value}``, for stats replies and logs (histograms: their count)."""
        with self._lock:
            out = {}
            for name, series in list(self._values.items()) + \
                    [(n, {k: sum(h.counts) for k, h in s.items()}) for n, s in self._hists.items()]:
                for key, v in series.items():
                    lab = ",".join(f"{k}={v2}" for k, v2 in key)
                    out[f"{name}{{{lab}}}" if lab else name] = v
            return out

    def collect(self):
        """prometheus-client's collector protocol: one metric family per name."""
        pc = prometheus()
        if pc is None:
            return
        from prometheus_client.metrics_core import Metric
        with self._lock:
            values = {n: dict(s) for n, s in self._values.items()}
            hists = {n: {k: (list(h.counts), h.sum) for k, h in s.items()} for n, s in self._hists.items()}
        for name in sorted(values):
            kind, help_ = self._meta.get(name, ("counter" if name.endswith("_total") else "gauge", ""))
            full = f"{self.prefix}_{name}"
            base = full[:-6] if kind == "counter" and full.endswith("_total") else full
            fam = Metric(base, help_, kind)
            sample = base + "_total" if kind == "counter" else base
            for key, v in sorted(values[name].items(), key=lambda kv: str(kv[0])):
                fam.add_sample(sample, {k: str(x) for k, x in key}, float(v))
            yield fam
        for name in sorted(hists):
            full = f"{self.prefix}_{name}"
            yield _histogram_family(Metric, full, self._meta[name][1], self._buckets[name], hists[name])

    def exposition(self) -> str:
        """Prometheus text format 0.0.4 ("" without prometheus-client)."""
        return exposition(self)


def _histogram_family(metric_cls, full: str, help_: str, bounds, series: dict):
    fam = metric_cls(full, help_, "histogram")
    for key, (counts, total) in sorted(series.items(), key=lambda kv: str(kv[0])):
        labels = {k: str(x) for k, x in key}
        run = 0
        for bound, c in zip(list(bounds) + [float("inf")], counts):
            run += c
            le = "+Inf" if bound == float("inf") else repr(bound)
            fam.add_sample(full + "_bucket", {**labels, "le": le}, float(run))
        fam.add_sample(full + "_sum", labels, float(total))
        fam.add_sample(full + "_count", labels, float(run))
    return fam


# ---- a TieredCache's counters ---------------------------------------------------------
# cache.stats() key -> (metric name, kind, help)
_CACHE_TOTALS = {
    "lookups": ("lookups_total", "counter", "lookup calls"),
    "lookup_blocks": ("lookup_blocks_total", "counter", "blocks asked about by lookup"),
    "miss_blocks": ("miss_blocks_total", "counter", "blocks lookup found in no tier"),
    "loaded_blocks": ("loaded_blocks_total", "counter", "blocks handed back by completed loads"),
    "load_miss": ("load_misses_total", "counter", "prepare_load calls that found nothing to lease"),
    "lease_timeouts": ("lease_timeouts_total", "counter", "leases released by their deadline"),
    "store_failed_blocks": ("store_failed_blocks_total", "counter", "blocks of stores rolled back"),
    "store_rejected_blocks": ("store_rejected_blocks_total", "counter", "blocks a store found no room for"),
    "discarded_blocks": ("discarded_blocks_total", "counter", "block copies dropped by discard()"),
    "listener_errors": ("listener_errors_total", "counter", "exceptions raised by cache listeners"),
    "inflight_blocks": ("inflight_blocks", "gauge", "blocks on their way between tiers"),
    "open_handles": ("open_handles", "gauge", "store and load handles not yet completed"),
}
# cache.stats() "{tier}.<field>" -> (metric name, kind, help), with a ``tier`` label
_TIER_TOTALS = {
    "hit_blocks": ("hit_blocks_total", "counter", "blocks lookup found, by the tier holding them"),
    "stored_blocks": ("tier_stored_blocks_total", "counter", "blocks that became visible in a tier"),
    "bytes_in": ("tier_bytes_in_total", "counter", "bytes written into a tier"),
    "bytes_out": ("tier_bytes_out_total", "counter", "bytes read out of a tier (promotions)"),
    "promoted_blocks": ("tier_promoted_blocks_total", "counter", "blocks promoted out of a lower tier"),
    "evicted_blocks": ("tier_evicted_blocks_total", "counter", "blocks a tier gave up to make room"),
    "failed_reads": ("tier_failed_reads_total", "counter", "blocks a tier could not read back"),
    "failed_writes": ("tier_failed_writes_total", "counter", "blocks a tier could not write"),
    "errors": ("tier_errors_total", "counter", "calls to a tier that raised (a miss, never a crash)"),
    "demotions_dropped": ("tier_demotions_dropped_total", "counter", "demotions dropped: staging full"),
    "demotions_in_place": ("tier_demotions_in_place_total", "counter",
                           "demotions written from the block's own slot: staging full"),
    "not_admitted": ("tier_not_admitted_total", "counter", "blocks the tier's admission filter kept out"),
    "resident_blocks": ("tier_resident_blocks", "gauge", "blocks held by a tier"),
    "leased_blocks": ("tier_leased_blocks", "gauge", "blocks of a tier under a lease"),
}
# a tier's own stats() counters
_TIER_OWN = {
    "corrupt_blocks": ("tier_corrupt_blocks_total", "counter",
                       "blocks that failed their checksum coming back (dropped: a miss)"),
}


class CacheExporter:
    """A TieredCache's counters as Prometheus metrics, read when scraped.

    ``labels`` are added to every sample (say ``{"engine": "0"}``).  Load
    latency is the caller's to measure (the cache cannot see when the engine's
    copy ends): :meth:`observe_load` counts it into ``kvtier_load_seconds``.
    """

    def __init__(self, cache, prefix: str = "kvtier", labels: dict[str, str] | None = None,
                 buckets: Iterable[float] = LATENCY_BUCKETS):
        if not _NAME.match(prefix):
            raise ValueError(f"metric prefix {prefix!r} is not a Prometheus name")
        self.cache = cache
        self.prefix = prefix
        self.labels = {str(k): str(v) for k, v in (labels or {}).items()}
        self._latency = Metrics(prefix)
        self._latency.describe("load_seconds", "histogram",
                               "seconds from prepare_load to the blocks being in place, per load", buckets)
        self._latency.observe("load_seconds", None, **self.labels, tier="")

    def observe_load(self, seconds: float, tier: str = "") -> None:
        """One load's latency; ``tier`` is the lowest tier it read from ("" when unknown)."""
        self._latency.observe("load_seconds", seconds, **self.labels, tier=tier)

    def samples(self) -> dict[tuple[str, str], list[tuple[dict, float]]]:
        """``{(metric name, kind): [(labels, value), ...]}`` as the next scrape would see it."""
        out: dict[tuple[str, str], list] = defaultdict(list)
        try:
            stats = self.cache.stats()      # every series is exported, 0 until counted
        except KVTierError as e:            # a closed cache: nothing to report, not a failed scrape
            log.debug("cache metrics not read: %s", e)
            return out
        for key, (name, kind, _) in _CACHE_TOTALS.items():
            out[(name, kind)].append((dict(self.labels), stats.get(key, 0)))
        for t in self.cache.tiers:
            for field, (name, kind, _) in _TIER_TOTALS.items():
                out[(name, kind)].append(({**self.labels, "tier": t.name}, stats.get(f"{t.name}.{field}", 0)))
        for t in self.cache.tiers:
            lab = {**self.labels, "tier": t.name, "medium": t.medium}
            if t.num_slots is not None:
                out[("tier_capacity_bytes", "gauge")].append((lab, t.num_slots * t.block_bytes))
            own = t.stats()
            for field, (name, kind, _) in _TIER_OWN.items():
                out[(name, kind)].append(({**self.labels, "tier": t.name}, own.get(field, 0)))
        return out

    def collect(self):
        pc = prometheus()
        if pc is None:
            return
        from prometheus_client.metrics_core import Metric
        helps = {n: h for n, _, h in [*_CACHE_TOTALS.values(), *_TIER_TOTALS.values(), *_TIER_OWN.values()]}
        helps["tier_capacity_bytes"] = "bytes a tier can hold"
        for (name, kind), series in sorted(self.samples().items()):
            full = f"{self.prefix}_{name}"
            base = full[:-6] if kind == "counter" else full
            fam = Metric(base, helps.get(name, ""), kind)
            for labels, value in series:
                fam.add_sample(base + "_total" if kind == "counter" else base, labels, float(value))
            yield fam
        yield from self._latency.collect()


# ---- exposition ---------------------------------------------------------------------------
class _Collector:
    """Only ``collect``: prometheus-client would take Metrics.describe for its own describe()."""

    def __init__(self, source):
        self.collect = source.collect


def _registry(collectors, process: bool = False):
    from prometheus_client import CollectorRegistry, ProcessCollector
    reg = CollectorRegistry(auto_describe=False)
    for c in collectors:
        reg.register(_Collector(c))
    if process:
        ProcessCollector(registry=reg)      # process_resident_memory_bytes, process_cpu_seconds_total, ...
    return reg


def exposition(*collectors) -> str:
    """The text format 0.0.4 of ``collectors`` together ("" without prometheus-client)."""
    pc = prometheus()
    if pc is None:
        return ""
    return pc.generate_latest(_registry(collectors)).decode()


def serve_http(metrics, host: str, port: int, *more, process: bool = True):
    """Answer ``GET /metrics`` on (host, port) from a daemon thread, for ``metrics`` and ``more``.

    Adds the process's own metrics (``process_*``) unless ``process=False``.
    Returns the server (``.shutdown()`` stops it), or None without prometheus-client.
    """
    pc = prometheus()
    if pc is None:
        return None
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
    from socketserver import ThreadingMixIn

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args) -> None:
            pass

    app = pc.make_wsgi_app(_registry([metrics, *more], process=process))
    httpd = make_server(host, port, app, server_class=Server, handler_class=Quiet)
    threading.Thread(target=httpd.serve_forever, name="kvtier-metrics", daemon=True).start()
    return httpd
