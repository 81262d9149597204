"""``kvtier bench pressure``: multi-turn chat whose first turns overflow the engine's KV cache.

Every conversation's first turn (``--prompt-tokens``, all misses) runs as one
batch, then every second turn (the first turn, its ``--gen-tokens`` answer and
``--turn-tokens`` more) as another.  The first turns need more KV than the
engine holds (``--engine-kv`` bytes, vLLM's ``kv_cache_memory_bytes``; by
default half the first turns' KV), so vLLM's own LRU has evicted every
conversation before its second turn comes (``evicted_all`` checks it).
Engines, each in its own process, on the benchmark Llama:

    kvtier   that engine KV plus a host tier large enough for everything
    plain    the same engine KV, no connector
    floor    engine KV large enough to hold everything, no connector:
             every second turn is a vLLM prefix-cache hit
    batch    the floor with no more requests running at once than the small
             engine's KV holds second turns (``max_num_seqs``): the floor
             for the batches kvtier's engine can run at all

The four engines run in turn, ``--alternations`` rounds, each round starting
with a different one, and the medians are reported.  Every round's kvtier and
floor engines then run the same workload on new conversations one request at
a time (the control): one sequence at a time, batching cannot change the
numbers, so the control's outputs with kvtier must be identical, token for
token, to the floor's.

Rows (``seconds`` is a median over the engines of the case):

    turn1_{kvtier,plain,floor}       the cold first turns
    turn2_{kvtier,plain,floor}       the second turns
    turn{1,2}_floor_same_batch       the batch engine
    seq_turn{1,2}_{kvtier,floor}     the control, one request at a time

Each carries ``ratio_to_floor`` and ``ratio_to_plain`` (seconds over the same
turn of the floor / of plain; ``ratio`` is the first for second turns and the
second for first turns), ``cached_tokens`` (vLLM's ``num_cached_tokens``
summed over the turn), ``kvtier_tokens`` (tokens the connector loaded, from
its counters; ``None`` with ``--processes``, whose engine core runs in
another process), ``engine_tokens`` (the rest of ``cached_tokens``: vLLM's own
cache), ``bytes`` (KV bytes kvtier served) and ``same_as_floor`` (the turn's
outputs equal the floor's).  ``evicted_all`` on plain's second turn says
whether vLLM alone served nothing from cache, as the workload intends.
Second turns also carry ``ratio_to_same_batch`` (over the batch engine's).
kvtier's rows carry ``connector_seconds`` (engine-thread time inside the
connector's calls during the turn, both sides: its direct cost, immune to the
machine's noise), ``connector_share`` (that over the turn's time) and
``store_copy_seconds`` (time its store copies took on their own thread),
``kvtier_thread_cpu_seconds`` (CPU time of kvtier's threads during the turn)
and ``connector_cpu_share`` (hooks plus those threads over the turn's time: an
upper bound of what the connector takes from the engine, whatever the noise).
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from .common import row
from .llama_fixture import BENCH, TINY, build_llama
from .vllm_engine import run_engine

SUITE = "pressure"
MODELS = {"bench": BENCH, "tiny": TINY}
QUICK = {"conversations": 8, "prompt_tokens": 768, "turn_tokens": 96, "gen_tokens": 4, "alternations": 1}
BLOCK_TOKENS = 32          # vllm_engine's block_size
CASES = {"batch": "floor_same_batch"}     # row names of engines not named as their rows


def add_arguments(p) -> None:
    p.add_argument("--engine-kv", default=None,
                   help="engine KV cache bytes (vLLM kv_cache_memory_bytes) of the kvtier and plain engines "
                        "(default: half the first turns' KV)")
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=1000, help="first turn of each conversation")
    p.add_argument("--turn-tokens", type=int, default=100, help="tokens the second turn adds")
    p.add_argument("--gen-tokens", type=int, default=8, help="tokens generated per turn")
    p.add_argument("--alternations", type=int, default=3,
                   help="rounds of the kvtier, plain and floor engines (medians reported)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 8 conversations of 768 tokens, one alternation")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--model", choices=sorted(MODELS), default="bench", help="the fixture Llama to build")
    p.add_argument("--load-mode", default=None, help="the connector's load_mode (default: its own)")
    p.add_argument("--no-control", action="store_true", help="skip the one-request-at-a-time control")
    p.add_argument("--processes", action="store_true",
                   help="engine core in a process of its own, as deployed (connector counters unreadable)")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="write a cProfile of every engine's turns to DIR (NAME-CASE.turnK.prof)")
    p.add_argument("--workdir", default=None, help="model and engine logs (default: a temp dir)")
    p.add_argument("--reserved-cpus", default="1", help="VLLM_CPU_NUM_OF_RESERVED_CPU for every engine")


def _quick(args) -> None:
    if getattr(args, "quick", False):
        for key, value in QUICK.items():
            setattr(args, key, value)


def token_bytes(model: dict, dtype: str) -> int:
    """KV bytes of one token of the model: K and V, every layer."""
    import torch
    item = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return model["num_hidden_layers"] * 2 * model["num_key_value_heads"] * model["head_dim"] * item


def plan(args) -> dict:
    """Engine sizes for the workload; ConfigError when it would not overflow the engine's cache."""
    from ..config import parse_size
    from ..errors import ConfigError
    _quick(args)
    model = MODELS[args.model]
    per_token = token_bytes(model, args.dtype)
    first = args.conversations * args.prompt_tokens * per_token
    mib = 1 << 20
    engine_kv = parse_size("--engine-kv", args.engine_kv) if args.engine_kv is not None else first // 2 // mib * mib
    for name in ("conversations", "prompt_tokens", "turn_tokens", "gen_tokens", "alternations"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}", getattr(args, name), "an int >= 1")
    longest = args.prompt_tokens + args.turn_tokens + 2 * args.gen_tokens
    max_len = -(-(longest + BLOCK_TOKENS) // BLOCK_TOKENS) * BLOCK_TOKENS
    if max_len > model["max_position_embeddings"]:
        raise ConfigError("--prompt-tokens", args.prompt_tokens,
                          f"a second turn of at most {model['max_position_embeddings']} tokens")
    if engine_kv < max_len * per_token:
        raise ConfigError("--engine-kv", engine_kv, f"at least one second turn's KV ({max_len * per_token} bytes)")
    if engine_kv >= first:
        raise ConfigError("--engine-kv", engine_kv,
                          f"less than the first turns' KV ({first} bytes), or nothing is evicted")
    everything = args.conversations * (longest + BLOCK_TOKENS) * per_token * 2   # both workloads' conversations
    # second turns the small engine holds at once: the floor's "same batch" engine runs no more
    second_blocks = -(-longest // BLOCK_TOKENS)
    same_batch = max(1, min(args.max_num_seqs, engine_kv // (BLOCK_TOKENS * per_token) // second_blocks))
    return {"per_token": per_token, "engine_kv": engine_kv, "max_len": max_len, "same_batch": same_batch,
            "floor_kv": -(-(everything * 5 // 4) // mib) * mib,
            "host": -(-(everything * 3 // 2 + 64 * mib) // mib) * mib}


def run(args) -> list[dict]:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        from ..errors import MissingDependencyError
        raise MissingDependencyError("vllm", "vllm", "kvtier bench pressure")
    sizes = plan(args)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kvtier-bench-pressure-"))
    model = build_llama(dtype=args.dtype, **MODELS[args.model])      # built once, shared by every run
    vocab = MODELS[args.model]["vocab_size"]
    env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": str(args.reserved_cpus)}   # run_engine honours kv_cache_memory_bytes

    def turns(seed: int, one_at_a_time: bool = False, case: str = "") -> dict:
        return {"op": "turns", "conversations": args.conversations, "prompt_tokens": args.prompt_tokens,
                "turn_tokens": args.turn_tokens, "gen_tokens": args.gen_tokens, "turns": 2, "seed": seed,
                "vocab": vocab, "one_at_a_time": one_at_a_time, "case": case}

    kvtier = {"host": {"capacity_bytes": sizes["host"]}}
    if args.load_mode:
        kvtier["load_mode"] = args.load_mode
    base = {"model": str(model), "dtype": args.dtype, "max_model_len": sizes["max_len"],
            "inprocess": not args.processes, "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": 4096}
    batched, control = turns(1, case="batched"), turns(2, one_at_a_time=True, case="seq")
    runs: dict[str, list[dict]] = {"kvtier": [], "plain": [], "floor": [], "batch": []}
    engines = [("kvtier", kvtier, sizes["engine_kv"], args.max_num_seqs),
               ("plain", None, sizes["engine_kv"], args.max_num_seqs),
               ("floor", None, sizes["floor_kv"], args.max_num_seqs),
               ("batch", None, sizes["floor_kv"], sizes["same_batch"])]
    for i in range(args.alternations):
        # each round runs every engine, starting with a different one; its kvtier
        # and floor engines run the control too
        k = i % len(engines)
        for name, conn, kv_bytes, seqs in engines[k:] + engines[:k]:
            extra = [control] if name in ("kvtier", "floor") and not args.no_control else []
            phases = _profiled([batched] + extra, args.profile, f"{name}-{i}")
            out = run_engine(dict(base, kvtier=conn, kv_cache_memory_bytes=kv_bytes, phases=phases,
                                  max_num_seqs=seqs), work, f"{name}-{i}", timeout=3600, env=env)
            runs[name].append(out)
    return report(runs, args, sizes)


def _profiled(phases: list[dict], folder: str | None, name: str) -> list[dict]:
    if not folder:
        return phases
    Path(folder).mkdir(parents=True, exist_ok=True)
    return [dict(p, profile=str(Path(folder).resolve() / f"{name}-{p['case']}")) for p in phases]


def _phase(out: dict, case: str) -> dict | None:
    return next((p for p in out["phases"] if p.get("op") == "turns" and p.get("case") == case), None)


def _during(out: dict, case: str, turn: int, key: str) -> float | None:
    """How much a connector counter grew during one turn, from its values after each turn."""
    ph = _phase(out, case)
    after = ph["turns"][turn - 1]["connector"]
    if after is None or key not in after:
        return None
    if turn > 1:
        before = ph["turns"][turn - 2]["connector"][key]
    else:     # the counters are cumulative over the engine's life: subtract earlier phases
        earlier = [p for p in out["phases"][:out["phases"].index(ph)] if p.get("op") == "turns"]
        before = earlier[-1]["turns"][-1]["connector"][key] if earlier else 0
    return after[key] - before


def _loaded_blocks(out: dict, case: str, turn: int) -> int | None:
    """Blocks the connector loaded during one turn."""
    n = _during(out, case, turn, "worker.load_blocks")
    return None if n is None else int(n)


def _connector_seconds(out: dict, case: str, turn: int) -> float | None:
    """Engine-thread time inside the connector's calls during one turn, both sides."""
    parts = [_during(out, case, turn, k) for k in ("hook_seconds", "worker.hook_seconds")]
    return None if None in parts else sum(parts)


def _connector_costs(outs: list[dict], recs: list[dict], case: str, turn: int) -> dict:
    """What the connector cost kvtier's engines in one turn (medians over the engines)."""
    secs = [r["seconds"] for r in recs]
    out = {}
    conn = [_connector_seconds(o, case, turn) for o in outs]
    if None not in conn:         # the connector's direct cost: its share of the turn's time
        out["connector_seconds"] = round(statistics.median(conn), 4)
        out["connector_share"] = round(statistics.median(c / t for c, t in zip(conn, secs)), 5)
    copies = [_during(o, case, turn, "worker.store_seconds") for o in outs]
    if None not in copies:
        out["store_copy_seconds"] = round(statistics.median(copies), 4)
    # CPU of kvtier's own threads (transfer threads, native copy pool) during the turn:
    # with the hooks, an upper bound of what the connector takes from the engine
    threads = [sum(v for k, v in rec.get("thread_cpu_s", {}).items() if k.startswith("kvtier")) for rec in recs]
    out["kvtier_thread_cpu_seconds"] = round(statistics.median(threads), 4)
    if None not in conn:
        out["connector_cpu_share"] = round(statistics.median(
            (c + th) / t for c, th, t in zip(conn, threads, secs)), 5)
    return out


def report(runs: dict[str, list[dict]], args, sizes: dict) -> list[dict]:
    """Rows from the engines' results; see the module docstring."""
    floor_out = runs["floor"][0]        # the outputs every engine's are compared with
    rows = []
    cases = [("batched", "", ("kvtier", "plain", "floor", "batch"))]
    if _phase(floor_out, "seq") is not None:
        cases.append(("seq", "seq_", ("kvtier", "floor")))
    for case, prefix, engines in cases:
        for turn in (1, 2):
            floor_rec = _phase(floor_out, case)["turns"][turn - 1]
            ref = {}
            for name in ("floor", "plain", "batch"):
                secs = [_phase(o, case)["turns"][turn - 1]["seconds"] for o in runs[name]
                        if _phase(o, case) is not None]
                ref[name] = statistics.median(secs) if secs else None
            for name in engines:
                outs = [o for o in runs[name] if _phase(o, case) is not None]
                recs = [_phase(o, case)["turns"][turn - 1] for o in outs]
                secs = [r["seconds"] for r in recs]
                med = statistics.median(secs)
                cached = int(statistics.median(sum(r["cached"]) for r in recs))
                loaded = [_loaded_blocks(o, case, turn) for o in outs] if name == "kvtier" else [0]
                kv_tokens = (int(statistics.median(loaded)) * BLOCK_TOKENS
                             if all(n is not None for n in loaded) else None)
                same = [r["outputs"] == floor_rec["outputs"] for r in recs]
                r = row(SUITE, f"{prefix}turn{turn}_{CASES.get(name, name)}", (kv_tokens or 0) * sizes["per_token"],
                        med, None,
                        samples=[round(s, 3) for s in secs],
                        ratio_to_floor=round(med / ref["floor"], 4),
                        ratio_to_plain=round(med / ref["plain"], 4) if ref["plain"] else None,
                        cached_tokens=cached, kvtier_tokens=kv_tokens,
                        engine_tokens=cached - kv_tokens if kv_tokens is not None else None,
                        prompt_tokens=sum(recs[0]["prompt_tokens"]), same_as_floor=all(same),
                        engine_kv_bytes=sizes["floor_kv"] if name in ("floor", "batch") else sizes["engine_kv"],
                        host_bytes=sizes["host"] if name == "kvtier" else 0,
                        conversations=args.conversations, one_at_a_time=case == "seq")
                r["ratio"] = r["ratio_to_floor"] if turn == 2 or not ref["plain"] else r["ratio_to_plain"]
                if name == "batch":
                    r["max_num_seqs"] = sizes["same_batch"]
                if ref["batch"] and turn == 2:
                    r["ratio_to_same_batch"] = round(med / ref["batch"], 4)
                if name == "kvtier":
                    r.update(_connector_costs(outs, recs, case, turn))
                if name == "plain" and turn == 2:
                    r["evicted_all"] = cached == 0
                rows.append(r)
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .common import emit
    p = argparse.ArgumentParser(prog="python -m kvtier.bench.pressure", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="PATH")
    add_arguments(p)
    args = p.parse_args(argv)
    emit(run(args), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
