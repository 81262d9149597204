"""Run one vLLM engine through a scripted scenario; print the results as JSON.

Used by the vLLM tests and the benchmark in a subprocess per engine, so every
engine starts clean and its memory goes away with it:

    python engine_run.py SPEC.json OUT.json

SPEC: {"model": path, "dtype": "float32", "kvtier": {...} | null,
       "inprocess": true, "max_model_len": 4096, "phases": [PHASE, ...]}
PHASE: {"op": "generate", "prompts": [[ids...], ...], "max_tokens": 8, "concurrent": true}
     | {"op": "reset_prefix_cache"}
     | {"op": "ttft", "prompt": [ids...]}            one request, max_tokens 1, wall seconds
OUT:  {"phases": [{"outputs": [[ids...]], "cached": [n, ...], "seconds": s}, ...],
       "connector": {...} | null, "cache": {...} | null}
"""
from __future__ import annotations

import json
import os
import sys
import time


def _engine_args(spec: dict) -> dict:
    args = dict(model=spec["model"], skip_tokenizer_init=True, block_size=32, enforce_eager=True,
                dtype=spec.get("dtype", "float32"), max_model_len=spec.get("max_model_len", 4096),
                max_num_seqs=spec.get("max_num_seqs", 16), enable_prefix_caching=True,
                max_num_batched_tokens=spec.get("max_num_batched_tokens", 4096), seed=0)
    if spec.get("inprocess", True):
        args["distributed_executor_backend"] = "uni"
    if spec.get("kvtier") is not None:
        from vllm.config import KVTransferConfig

        args["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVTierConnector", kv_connector_module_path="kvtier.integrations.vllm",
            kv_role="kv_both", kv_load_failure_policy=spec.get("failure_policy", "recompute"),
            kv_connector_extra_config=spec["kvtier"])
    return args


def _connector_state(llm) -> tuple[dict | None, dict | None]:
    """Cumulative kvtier counters of the scheduler side (in-process engines only)."""
    try:
        core = llm.llm_engine.engine_core.engine_core
        conn = core.scheduler.connector
    except AttributeError:
        return None, None
    if conn is None or getattr(conn, "scheduler", None) is None:
        return None, None
    sched = conn.scheduler
    totals = dict(sched.totals.data, block_bytes=sched.geometry.block_bytes)
    return totals, sched.cache.stats()


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if spec.get("inprocess", True):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    llm = LLM(**_engine_args(spec))
    results = []
    for phase in spec["phases"]:
        op = phase["op"]
        if op == "reset_prefix_cache":
            ok = llm.reset_prefix_cache()
            results.append({"op": op, "ok": bool(ok)})
            continue
        if op == "ttft":
            prompts, max_tokens = [phase["prompt"]], 1
        else:
            prompts, max_tokens = phase["prompts"], phase.get("max_tokens", 8)
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, detokenize=False, ignore_eos=True)
        items = [{"prompt_token_ids": list(p)} for p in prompts]
        t0 = time.perf_counter()
        if phase.get("concurrent", True):
            outs = llm.generate(items, sp, use_tqdm=False)
        else:
            outs = [llm.generate([it], sp, use_tqdm=False)[0] for it in items]
        dt = time.perf_counter() - t0
        results.append({"op": op, "seconds": dt,
                        "outputs": [list(o.outputs[0].token_ids) for o in outs],
                        "cached": [o.num_cached_tokens for o in outs]})
    totals, cache = _connector_state(llm)
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as e:  # teardown problems must not hide the results
        print(f"engine shutdown: {e}", file=sys.stderr)
    with open(out_path, "w") as f:
        json.dump({"phases": results, "connector": totals, "cache": cache}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
