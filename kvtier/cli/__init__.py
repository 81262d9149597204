"""The ``kvtier`` command: bench, serve, replay, inspect, demo.

Each command lives in its own module of this package, imported only when used,
exposing ``add_arguments(parser)`` and ``main(args) -> int``.  Benchmark suites
live in :mod:`kvtier.bench` (``kvtier/bench/<suite>.py``) and expose ``add_arguments(parser)``
and ``run(args) -> list[dict]`` (one JSON-line row per case); the rows are
printed as a table and, with ``--json PATH``, appended as JSON lines.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "demo": ("kvtier.cli.demo", "store a prompt's KV, evict it, get it back through the tiers"),
    "serve": ("kvtier.cli.serve", "run a kvtier cache server (the remote tier's peer)"),
    "replay": ("kvtier.cli.replay", "replay a Mooncake-format trace through a TieredCache"),
    "inspect": ("kvtier.cli.inspect", "show (and --check) what a disk tier directory holds"),
}

SUITES = {
    "host": ("kvtier.bench.host", "host tier store/load vs memcpy peak, lookup rate"),
    "disk": ("kvtier.bench.disk", "disk tier vs raw O_DIRECT, dd and file-per-block"),
    "remote": ("kvtier.bench.remote", "remote tier vs raw TCP and redis"),
    "gpu": ("kvtier.bench.gpu", "device<->host copies vs cudaMemcpyAsync peak"),
    "vllm": ("kvtier.bench.vllm", "TTFT through a real vLLM engine"),
    "pressure": ("kvtier.bench.pressure", "multi-turn chat overflowing the engine's KV cache: kvtier vs the floor"),
    "replay": ("kvtier.bench.replay", "hit ratios of the policies on traces"),
    "all": ("kvtier.bench.report", "every suite this machine can run, one report"),
}


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            return None                   # the command itself is not part of this build
        raise


def build_parser() -> argparse.ArgumentParser:
    from ..progress import add_flags as add_progress_flags
    p = argparse.ArgumentParser(prog="kvtier", description="Tiered KV-cache storage for LLM serving.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = p.add_subparsers(dest="command", required=True)
    for cmd, (mod, help_) in COMMANDS.items():
        m = _module(mod)
        if m is None:
            continue
        sp = sub.add_parser(cmd, help=help_, description=help_)
        m.add_arguments(sp)
        sp.set_defaults(_main=m.main)
    bp = sub.add_parser("bench", help="run a benchmark suite", description="Run a benchmark suite.")
    bsub = bp.add_subparsers(dest="suite", required=True)
    for suite, (mod, help_) in SUITES.items():
        m = _module(mod)
        if m is None:
            continue
        sp = bsub.add_parser(suite, help=help_, description=help_)
        sp.add_argument("--json", metavar="PATH", help="append results as JSON lines to PATH")
        add_progress_flags(sp)
        m.add_arguments(sp)
        sp.set_defaults(_main=_bench_main(m))
    return p


def _bench_main(module):
    def run(args) -> int:
        from ..bench.common import emit
        from ..progress import Bar, wanted
        # suites report no steps: the bar shows the suite and the time it has run
        with Bar(None, f"bench {args.suite}", wanted(args.progress), unit="case") as bar:
            bar.tick_while_running()
            rows = module.run(args)
        emit(rows, args.json)
        return 0
    return run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from ..errors import KVTierError
    try:
        return int(args._main(args) or 0)
    except KVTierError as e:
        print(f"kvtier: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
