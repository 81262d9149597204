"""Shared benchmark plumbing: timing, rows, the terminal table and JSON lines.

A row is a dict with at least ``suite``, ``case``, ``bytes``, ``seconds``,
``gbps``, ``peak_gbps`` and ``ratio`` (gbps / peak_gbps measured in the same
run); suites add their own fields (e.g. ``blocks_per_s``, ``p99_ms``).
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from typing import Callable, Iterable


def median_time(fn: Callable[[], object], repeat: int = 7, warmup: int = 1,
                min_seconds: float = 0.0) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeat:
            break
    return statistics.median(times)


def row(suite: str, case: str, nbytes: int, seconds: float, peak_gbps: float | None, **extra) -> dict:
    gbps = nbytes / seconds / 1e9 if seconds > 0 else 0.0
    r = {"suite": suite, "case": case, "bytes": int(nbytes), "seconds": seconds, "gbps": round(gbps, 3),
         "peak_gbps": round(peak_gbps, 3) if peak_gbps else None,
         "ratio": round(gbps / peak_gbps, 3) if peak_gbps else None}
    r.update(extra)
    r.setdefault("host", platform.node())
    return r


def table(rows: Iterable[dict]) -> str:
    rows = list(rows)
    if not rows:
        return "(no results)"
    cols = ["suite", "case", "bytes", "gbps", "peak_gbps", "ratio"]
    extra = [k for r in rows for k in r if k not in cols and k not in ("seconds", "host")]
    for k in extra:
        if k not in cols:
            cols.append(k)
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.rjust(w) if i > 1 else x.ljust(w) for i, (x, w) in enumerate(zip(xs, widths)))
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(x) for x in cells])


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def emit(rows: list[dict], json_path: str | None) -> None:
    print(table(rows))
    if json_path:
        with open(json_path, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


def peak_buffer(nbytes: int, fill: int = 0):
    """A populated host buffer on huge pages where the kernel offers them (as the
    host tier's arena is), so a memcpy peak taken on it is the machine's best."""
    import mmap

    import numpy as np
    m = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass
    a = np.frombuffer(m, dtype=np.uint8)[:nbytes]
    a[:] = fill
    return a
