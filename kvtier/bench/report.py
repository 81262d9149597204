"""``kvtier bench all``: every suite this machine can run, one report.

Runs host, disk, remote, gpu, vllm and replay in turn (a suite whose hardware
or dependency is missing is listed as skipped, with the reason; a suite that
fails is listed with its error and the others still run), then writes into
``--out``:

    report.md       one table per suite: every throughput next to the peak
                    measured in the same run (gbps, peak_gbps, ratio), the
                    replay hit ratios, and the figures
    results.jsonl   every row, as JSON lines
    *.png           the replay figures
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import time
import traceback

SUITES = ("host", "disk", "remote", "gpu", "vllm", "replay")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="report directory (default kvtier-report-<UTC time>)")
    p.add_argument("--suites", default=",".join(SUITES), help="comma-separated subset of " + ", ".join(SUITES))
    p.add_argument("--quick", action="store_true", help="pass --quick to every suite that has it")


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # a broken torch is no GPU
        return False


def skip_reason(suite: str) -> str | None:
    """Why this machine cannot run ``suite``, or None."""
    if suite == "gpu" and not _cuda():
        return "no CUDA GPU"
    if suite == "vllm" and importlib.util.find_spec("vllm") is None:
        return "vllm is not installed"
    if suite == "remote" and importlib.util.find_spec("zmq") is None:
        return "pyzmq is not installed"
    if suite == "disk" and importlib.util.find_spec("lmdb") is None:
        return "lmdb is not installed"
    return None


def _suite_args(module, quick: bool, extra: dict) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    argv = ["--quick"] if quick and any(a.dest == "quick" for a in p._actions) else []
    args = p.parse_args(argv)
    for k, v in extra.items():
        if hasattr(args, k):
            setattr(args, k, v)
    return args


def run(args) -> list[dict]:
    from .common import table
    out = args.out or "kvtier-report-" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    os.makedirs(out, exist_ok=True)
    wanted = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SUITES]
    if unknown:
        from ..errors import ConfigError
        raise ConfigError("--suites", ",".join(unknown), "names among " + ", ".join(SUITES))
    rows: list[dict] = []
    status: dict[str, str] = {}
    for suite in wanted:
        why = skip_reason(suite)
        if why:
            status[suite] = f"skipped: {why}"
            continue
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"kvtier.bench.{suite}")
            got = module.run(_suite_args(module, args.quick, {"plot_dir": out}))
        except Exception as e:  # one failing suite must not lose the others' results
            status[suite] = f"failed: {type(e).__name__}: {e}"
            with open(os.path.join(out, f"{suite}.error.txt"), "w", encoding="utf-8") as f:
                f.write(traceback.format_exc())
            continue
        rows += got
        status[suite] = f"ran: {len(got)} rows in {time.perf_counter() - t0:.0f} s"
        _write(out, rows, status, table)            # after every suite: a later crash loses nothing
    _write(out, rows, status, table)
    print(f"report: {os.path.join(out, 'report.md')}")
    return rows


def _write(out: str, rows: list[dict], status: dict[str, str], table) -> None:
    with open(os.path.join(out, "results.jsonl"), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown(rows, status, out, table))


def markdown(rows: list[dict], status: dict[str, str], out: str, table) -> str:
    lines = ["# kvtier benchmark report", "",
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()} "
             f"({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()})", "",
             "Every throughput is shown next to the peak of the same path measured in the same run "
             "(`ratio` = gbps / peak_gbps); hit ratios are prefix hit ratios over full blocks.", "",
             "| suite | status |", "|---|---|"]
    lines += [f"| {s} | {st} |" for s, st in status.items()]
    for suite in status:
        mine = [r for r in rows if r.get("suite") == suite]
        if not mine:
            continue
        lines += ["", f"## {suite}", "", "```", table(mine), "```"]
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    if pngs:
        lines += ["", "## figures", ""]
        lines += [f"![{p}]({p})" for p in pngs]
    return "\n".join(lines) + "\n"
