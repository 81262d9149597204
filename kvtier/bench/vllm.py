"""``kvtier bench vllm``: time to first token through a real vLLM engine.

One run, on a local random-weight Llama (hidden 1024, 8 layers, 16 heads / 8
KV heads, head_dim 64) and 3,000-token prompts, each engine in its own
process:

    cold          a prompt nothing has seen (engine with kvtier)
    vllm_hit      the same prompt again: vLLM's own prefix cache (the floor)
    host_hit      vLLM's cache reset, kvtier serves it from the host tier
    disk_hit      a fresh engine over the same disk tier, page cache dropped
    miss          cold prompts with and without the connector (its cost on misses):
                  engines without it run before and after the one with it, so
                  drift in the machine's speed does not read as kvtier's cost
    chat          multi-turn chat tokens/s with and without kvtier

``--layouts`` adds the same TTFT cases (cold, vllm_hit, host_hit, disk_hit)
for other engine layouts, rows prefixed by the layout's name:

    tp2           the same model with tensor_parallel_size=2 (one core per rank)
    hybrid        a Gemma-3-style model of the same size whose layers alternate
                  sliding-window (512 tokens) and full attention, vLLM's hybrid
                  KV cache manager on

Their rows carry ``ratio`` (TTFT / cold) and ``ratio_to_floor`` (TTFT / vLLM's
own prefix-cache hit), both from the same engine run.

    plan          load or recompute on a throttled disk: every block read from the
                  disk tier is delayed so that a disk hit costs ``--throttle`` times
                  a cold prefill (measured in the same run); TTFT of such a hit with
                  the load-or-recompute rule (``plan_disk_hit_rule``) and without it
                  (``plan_disk_hit_all``), ratio to cold; then ``--burst`` concurrent
                  requests whose hits are all on the disk: p50/p99 TTFT with the
                  default per-tier in-flight bound (``burst_backpressure``) and none
                  (``burst_unbounded``)

Rows follow the suite format; for TTFT rows ``seconds`` is the median TTFT,
``bytes`` the KV bytes served from outside the engine and ``ratio`` the TTFT
relative to the cold TTFT of the same run (lower is better).  The chat rows
report tokens/s and ``ratio`` relative to the run without kvtier.
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from .common import row
from .llama_fixture import BENCH, build_hybrid, build_llama
from .vllm_engine import run_engine

SUITE = "vllm"


def add_arguments(p) -> None:
    p.add_argument("--prompt-tokens", type=int, default=3000)
    p.add_argument("--repeat", type=int, default=3, help="samples per TTFT case (median reported)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--workdir", default=None, help="model, disk tier and logs (default: a temp dir)")
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds of quiet before each TTFT sample (background writes drain)")
    p.add_argument("--reserved-cpus", default="1", help="VLLM_CPU_NUM_OF_RESERVED_CPU for every engine")
    p.add_argument("--layouts", default="single,tp2,hybrid,plan",
                   help="comma list of: single (the cases above), tp2, hybrid, plan")
    p.add_argument("--throttle", type=float, default=1.5,
                   help="plan: a throttled disk hit costs this many cold prefills")
    p.add_argument("--plan-tokens", type=int, default=1024, help="plan: prompt tokens")
    p.add_argument("--burst", type=int, default=8, help="plan: concurrent disk-hit requests of the burst rows")


def _prompt(seed: int, n: int, vocab: int) -> list[int]:
    import random
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def _ttfts(phases, case: str) -> list[float]:
    return [p["seconds"] for p in phases if p.get("case") == case]


def run(args) -> list[dict]:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        from ..errors import MissingDependencyError
        raise MissingDependencyError("vllm", "vllm", "kvtier bench vllm")
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad or not layouts:
        from ..errors import ConfigError
        raise ConfigError("--layouts", args.layouts, "a comma list of " + ", ".join(LAYOUTS))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kvtier-bench-vllm-"))
    rows = _single(args, work) if "single" in layouts else []
    for name in layouts:
        if name == "plan":
            rows += _plan(args, work)
        elif name != "single":
            rows += _layout(name, args, work)
    return rows


LAYOUTS = ("single", "tp2", "hybrid", "plan")


def _plan(args, work: Path) -> list[dict]:
    """Disk hits on a disk slowed to ``--throttle`` cold prefills: with the rule and without."""
    import shutil

    vocab, n, reps = BENCH["vocab_size"], args.plan_tokens, args.repeat
    model = build_llama(work / "models", dtype=args.dtype, **BENCH)
    env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": str(args.reserved_cpus)}
    disk = work / "disk-plan"
    kvtier = {"host": {"capacity_bytes": "1GiB"}, "staging_bytes": "256MiB",
              "disk": {"path": str(disk), "capacity_bytes": "2GiB", "write_mode": "through", "admission": "none"}}
    base = dict(model=str(model), dtype=args.dtype, max_model_len=n + 1024, kv_cache_memory_bytes=160 << 20,
                max_num_batched_tokens=4096)

    def ttft(prompt, case, reset=False):
        return {"op": "ttft", "prompt": prompt, "case": case, "reset": reset, "settle_s": args.settle}

    hits = [_prompt(6000 + i, n, vocab) for i in range(reps + 1)]       # the first one teaches the disk speed
    # ... and these the prefill cost (a prefill step is measured when a decode step follows it)
    warm = [{"op": "generate", "prompts": [_prompt(7000 + i, n, vocab)], "max_tokens": 2} for i in range(3)]
    # The last step's stores are reported (and published) by the step after it: end with one.
    flush = {"op": "generate", "prompts": [_prompt(7500, 64, vocab)], "max_tokens": 2}
    stored = run_engine(dict(base, kvtier=kvtier, phases=[ttft(_prompt(3000, n, vocab), "warmup")]
                             + [ttft(p, "cold") for p in hits] + [flush]), work, "plan-store", timeout=3600, env=env)
    cold = statistics.median(_ttfts(stored["phases"], "cold"))
    blocks = (n - 1) // 32
    delay = args.throttle * cold / blocks
    rows = [row(SUITE, "plan_cold", 0, cold, None, prompt_tokens=n, samples=reps + 1, ratio=1.0)]
    for name, plan in (("rule", None), ("all", False)):
        copy = work / f"disk-plan-{name}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(disk, copy, ignore=shutil.ignore_patterns("LOCK"))
        cfg = dict(kvtier, disk=dict(kvtier["disk"], path=str(copy)))
        if plan is False:
            cfg["load_plan"] = False
        phases = warm + [ttft(hits[0], "teach")] + [ttft(p, "hit") for p in hits[1:]]
        out = run_engine(dict(base, kvtier=cfg, disk_read_delay_s=delay, phases=phases), work, f"plan-{name}",
                         timeout=3600, env=env)
        samples = [p for p in out["phases"] if p.get("case") == "hit"]
        med = statistics.median(p["seconds"] for p in samples)
        served = statistics.median(p["cached"][0] for p in samples)
        conn = out.get("connector") or {}
        rows.append(row(SUITE, f"plan_disk_hit_{name}", 0, med, None, prompt_tokens=n, samples=len(samples),
                        served_tokens=int(served), ratio=round(med / cold, 4), throttle=args.throttle,
                        disk_delay_s_per_block=round(delay, 4),
                        recomputed_blocks=conn.get("plan_recomputed_blocks", 0)))
    # The burst's engine holds every request's KV at once, so the requests really run together.
    burst_kv = (args.burst + 2) * (-(-args.prompt_tokens // 32)) * block_bytes(args.dtype)
    return rows + _burst(args, work, dict(base, max_model_len=args.prompt_tokens + 1024,
                                          kv_cache_memory_bytes=burst_kv), kvtier, env)


def _burst(args, work: Path, base: dict, kvtier: dict, env: dict) -> list[dict]:
    """8 concurrent requests whose hits are all on the (unthrottled) disk: per-request TTFT
    with the default per-tier in-flight bound (back-pressure) and with no bound."""
    import shutil

    vocab, n = BENCH["vocab_size"], args.prompt_tokens     # long enough that a burst passes the disk bound
    prompts = [_prompt(8000 + i, n, vocab) for i in range(args.burst)]
    disk = work / "disk-burst"
    shutil.rmtree(disk, ignore_errors=True)
    cfg = dict(kvtier, disk=dict(kvtier["disk"], path=str(disk)))
    warm = [{"op": "generate", "prompts": [_prompt(7100 + i, n, vocab)], "max_tokens": 2} for i in range(3)]
    flush = {"op": "generate", "prompts": [_prompt(7500, 64, vocab)], "max_tokens": 2}
    run_engine(dict(base, kvtier=cfg, phases=[{"op": "generate", "prompts": [p], "max_tokens": 1} for p in prompts]
                    + [flush]), work, "burst-store", timeout=3600, env=env)
    rows = []
    for name, bound in (("backpressure", {}), ("unbounded", {"inflight_bytes": {"disk": "1TiB", "host": "1TiB"}})):
        copy = work / f"disk-burst-{name}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(disk, copy, ignore=shutil.ignore_patterns("LOCK"))
        c = dict(cfg, disk=dict(cfg["disk"], path=str(copy)), load_plan=bound)
        burst = {"op": "generate", "prompts": prompts, "max_tokens": 1, "case": "burst"}
        out = run_engine(dict(base, kvtier=c, disable_log_stats=False, max_num_seqs=max(16, args.burst),
                              phases=warm + [burst]), work, f"burst-{name}", timeout=3600, env=env)
        (ph,) = [p for p in out["phases"] if p.get("case") == "burst"]
        ttfts = sorted(ph["ttfts"] or [ph["seconds"]] * len(prompts))
        p50 = statistics.median(ttfts)
        p99 = ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))]
        conn = out.get("connector") or {}
        rows.append(row(SUITE, f"burst_{name}", 0, p50, None, prompt_tokens=n, requests=len(prompts),
                        p50_s=round(p50, 4), p99_s=round(p99, 4),
                        served_tokens=sum(ph["cached"]), waits=(conn.get("plan") or {}).get("plans.wait", 0),
                        per_request_ttft=ph["ttfts"] is not None))
    return rows
#: The hybrid benchmark model: BENCH's size, layers alternating sliding window and full attention.
HYBRID_BENCH = dict(BENCH, sliding_window=512,
                    layer_types=["sliding_attention", "full_attention"] * (BENCH["num_hidden_layers"] // 2))


def _layout(name: str, args, work: Path) -> list[dict]:
    """cold / vllm_hit / host_hit / disk_hit TTFT of one engine layout; rows named ``{name}_ttft_*``."""
    vocab = BENCH["vocab_size"]
    n, reps = args.prompt_tokens, args.repeat
    if name == "tp2":
        model, extra = build_llama(work / "models", dtype=args.dtype, **BENCH), {"tensor_parallel_size": 2}
    else:
        model, extra = build_hybrid(work / "models", dtype=args.dtype, **HYBRID_BENCH), {}
    env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": str(args.reserved_cpus)}
    disk = work / f"disk-{name}"
    kvtier = {"host": {"capacity_bytes": "2GiB"}, "staging_bytes": "512MiB",
              "disk": {"path": str(disk), "capacity_bytes": "4GiB", "write_mode": "through", "admission": "none"}}
    base = dict(model=str(model), dtype=args.dtype, max_model_len=n + 1024, inprocess=False,
                kv_cache_memory_bytes=160 << 20, max_num_batched_tokens=4096, **extra)

    def ttft(prompt, case, reset=False):
        return {"op": "ttft", "prompt": prompt, "case": case, "reset": reset, "settle_s": args.settle}

    prompts = [_prompt(5000 + i, n, vocab) for i in range(reps)]
    phases = [ttft(_prompt(3000, n, vocab), "warmup")]
    for p in prompts:
        phases += [ttft(p, "cold"), ttft(p, "vllm_hit"), ttft(p, "host_hit", reset=True)]
    tiered = run_engine(dict(base, kvtier=kvtier, phases=phases), work, f"{name}-kvtier", timeout=3600, env=env)
    disk_phases = [ttft(_prompt(3000, n, vocab), "warmup")]
    for p in prompts:
        disk_phases += [{"op": "drop_caches"}, ttft(p, "disk_hit", reset=True)]
    fresh = run_engine(dict(base, kvtier=kvtier, phases=disk_phases), work, f"{name}-fresh", timeout=3600, env=env)
    cold = statistics.median(_ttfts(tiered["phases"], "cold"))
    floor = statistics.median(_ttfts(tiered["phases"], "vllm_hit"))
    outputs = {}
    rows = []
    for case, src in (("cold", tiered), ("vllm_hit", tiered), ("host_hit", tiered), ("disk_hit", fresh)):
        samples = [p for p in src["phases"] if p.get("case") == case]
        outputs[case] = [p["outputs"] for p in samples]
        med = statistics.median(p["seconds"] for p in samples)
        served = statistics.median(p["cached"][0] for p in samples) if case != "cold" else 0
        rows.append(row(SUITE, f"{name}_ttft_{case}", 0, med, None, prompt_tokens=n, served_tokens=int(served),
                        samples=len(samples), ratio_to_floor=round(med / floor, 4)))
        rows[-1]["ratio"] = round(med / cold, 4)
    same = all(outputs[c] == outputs["cold"] for c in outputs)
    for r in rows:
        r["same_first_tokens"] = same
    return rows


def _single(args, work: Path) -> list[dict]:
    model = build_llama(work / "models", dtype=args.dtype, **BENCH)
    vocab = BENCH["vocab_size"]
    n, reps = args.prompt_tokens, args.repeat
    prompts = [_prompt(1000 + i, n, vocab) for i in range(reps)]
    misses = [_prompt(2000 + i, n, vocab) for i in range(reps)]
    env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": str(args.reserved_cpus)}
    disk = work / "disk"
    # A staging pool that holds a whole prompt's blocks lets write-through finish without
    # making stores wait for slots (a full pool is back-pressure, not a drop).
    kvtier = {"host": {"capacity_bytes": "2GiB"}, "staging_bytes": "512MiB",
              "disk": {"path": str(disk), "capacity_bytes": "4GiB", "write_mode": "through",
                       "admission": "none"}}
    chat = {"op": "chat", "conversations": args.conversations, "turns": args.turns,
            "system_tokens": 512, "user_tokens": 192, "gen_tokens": 32, "seed": 7}
    # Engines run as vLLM deploys them: scheduler and worker in separate
    # processes, so kvtier's background I/O runs on the scheduler's core.
    base = dict(model=str(model), dtype=args.dtype, max_model_len=n + 1024, inprocess=False,
                kv_cache_memory_bytes=160 << 20, max_num_batched_tokens=4096)

    def ttft(prompt, case, reset=False):
        return {"op": "ttft", "prompt": prompt, "case": case, "reset": reset, "settle_s": args.settle}

    # Every engine first serves one unrelated prompt: its first request pays one-time costs.
    warm = ttft(_prompt(3000, n, vocab), "warmup")
    # Without the connector: cold misses and the chat workload.
    plain = run_engine(dict(base, kvtier=None, phases=[
        warm, *[ttft(p, "miss_plain") for p in misses],
        {"op": "reset_prefix_cache"}, chat]), work, "plain", timeout=3600, env=env)
    later = [_prompt(4000 + i, n, vocab) for i in range(reps)]
    # With the connector: cold, vLLM hit, host hit; misses; chat.
    phases = [warm]
    for p in prompts:
        phases += [ttft(p, "cold"), ttft(p, "vllm_hit"), ttft(p, "host_hit", reset=True)]
    phases += [ttft(p, "miss_kvtier") for p in misses]
    phases += [{"op": "reset_prefix_cache"}, chat]
    tiered = run_engine(dict(base, kvtier=kvtier, phases=phases), work, "kvtier", timeout=3600, env=env)
    # A fresh engine over the same disk tier; page cache dropped before each prompt.
    disk_phases = [warm]
    for p in prompts:
        disk_phases += [{"op": "drop_caches"}, ttft(p, "disk_hit", reset=True)]
    fresh = run_engine(dict(base, kvtier=kvtier, phases=disk_phases), work, "fresh", timeout=3600, env=env)
    # Misses without the connector once more, after the engine with it.
    plain2 = run_engine(dict(base, kvtier=None, phases=[warm, *[ttft(p, "miss_plain") for p in later]]),
                        work, "plain2", timeout=3600, env=env)
    plain["phases"] += plain2["phases"]
    return report(plain, tiered, fresh, n, reps, block_bytes(args.dtype))


def block_bytes(dtype: str, block_tokens: int = 32) -> int:
    """KV bytes of one block of the benchmark model: K and V, every layer."""
    import torch
    item = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return BENCH["num_hidden_layers"] * 2 * BENCH["num_key_value_heads"] * BENCH["head_dim"] * block_tokens * item


def report(plain: dict, tiered: dict, fresh: dict, n: int, reps: int, block_bytes: int) -> list[dict]:
    """Rows from the three engines' results."""
    cold = statistics.median(_ttfts(tiered["phases"], "cold"))
    rows = []
    for case, src in (("cold", tiered), ("vllm_hit", tiered), ("host_hit", tiered), ("disk_hit", fresh)):
        samples = [p for p in src["phases"] if p.get("case") == case]
        med = statistics.median(p["seconds"] for p in samples)
        served = statistics.median(p["cached"][0] for p in samples) if case != "cold" else 0
        extra = {}
        if case == "disk_hit":
            drops = [p for p in fresh["phases"] if p["op"] == "drop_caches"]
            extra["page_cache_dropped"] = all(d["ok"] for d in drops)
            if not extra["page_cache_dropped"]:
                extra["drop_error"] = drops[0].get("error")
        rows.append(row(SUITE, f"ttft_{case}", int(served // 32 * block_bytes), med, None,
                        ratio_to_cold=round(med / cold, 4), prompt_tokens=n, served_tokens=int(served),
                        samples=len(samples), **extra))
    for r in rows:
        r["ratio"] = r.pop("ratio_to_cold")
    m_plain = statistics.median(_ttfts(plain["phases"], "miss_plain"))
    m_tier = statistics.median(_ttfts(tiered["phases"], "miss_kvtier"))
    rows.append(row(SUITE, "ttft_miss_plain", 0, m_plain, None, prompt_tokens=n,
                    samples=len(_ttfts(plain["phases"], "miss_plain"))))
    rows.append(row(SUITE, "ttft_miss_kvtier", n // 32 * block_bytes, m_tier, None, prompt_tokens=n,
                    samples=reps, miss_overhead=round(m_tier / m_plain - 1, 4)))
    rows[-1]["ratio"] = round(m_tier / m_plain, 4)
    chat_plain = next(p for p in plain["phases"] if p["op"] == "chat")
    chat_tier = next(p for p in tiered["phases"] if p["op"] == "chat")
    for name, c in (("chat_plain", chat_plain), ("chat_kvtier", chat_tier)):
        tps = c["tokens"] / c["seconds"]
        rows.append(row(SUITE, name, 0, c["seconds"], None, tokens=c["tokens"], tokens_per_s=round(tps, 1),
                        ratio=round(tps / (chat_plain["tokens"] / chat_plain["seconds"]), 3),
                        same_outputs=chat_plain["digest"] == c["digest"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .common import emit
    p = argparse.ArgumentParser(prog="python -m bench.vllm", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="PATH")
    add_arguments(p)
    args = p.parse_args(argv)
    emit(run(args), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
