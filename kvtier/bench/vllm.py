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
from .llama_fixture import BENCH, build_llama
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
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kvtier-bench-vllm-"))
    model = build_llama(work / "models", dtype=args.dtype, **BENCH)
    vocab = BENCH["vocab_size"]
    n, reps = args.prompt_tokens, args.repeat
    prompts = [_prompt(1000 + i, n, vocab) for i in range(reps)]
    misses = [_prompt(2000 + i, n, vocab) for i in range(reps)]
    env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": str(args.reserved_cpus)}
    disk = work / "disk"
    # staging_bytes bounds the blocks in flight to disk: it must hold a whole
    # prompt's blocks, or write-through drops (and counts) the ones that do not fit.
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
