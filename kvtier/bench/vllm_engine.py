"""Run one vLLM engine through a scripted scenario, in a subprocess of its own.

The vLLM tests and ``kvtier bench vllm`` start every engine through
:func:`run_engine`, which runs this module as a script so each engine starts
clean and gives its memory back when it exits:

    python -m bench.vllm_engine SPEC.json OUT.json

SPEC: {"model": path, "dtype": "float32", "kvtier": {...} | null, "inprocess": true,
       "max_model_len": 4096, "kv_cache_memory_bytes": n | null, "tensor_parallel_size": 1,
       "disk_read_delay_s": s (a slow disk tier: seconds added per block read), "phases": [PHASE, ...]}
PHASE: {"op": "generate", "prompts": [[ids...], ...], "max_tokens": 8}
     | {"op": "ttft", "prompt": [ids...], "case": name, "reset": bool, "settle_s": s}
                                                                  one request, one token
     | {"op": "chat", "conversations": c, "turns": t, "system_tokens": s,
        "user_tokens": u, "gen_tokens": g, "seed": n,
        "reset_between_turns": bool}                                     multi-turn rounds
     | {"op": "reset_prefix_cache"} | {"op": "drop_caches"}
OUT:  {"phases": [...], "connector": {...} | null, "cache": {...} | null}

``inprocess`` (default) runs vLLM's engine core and worker inside this process
(fast start-up; the connector's counters are then readable); ``false`` runs
the usual separate scheduler and worker processes.  With
``tensor_parallel_size`` > 1 the engine core stays in this process and each
rank runs in a worker process of its own, bound to one core
(``VLLM_CPU_OMP_THREADS_BIND``).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]      # the folder that holds the kvtier package


# ---- the parent side ----------------------------------------------------------------
def engine_env(extra: dict | None = None, ranks: int = 1) -> dict:
    env = dict(os.environ)
    if ranks > 1:   # one core per rank; vLLM's CPU backend cannot bind them by itself here
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % (os.cpu_count() or 1)) for i in range(ranks)))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CACHE_ROOT", str(Path(tempfile.gettempdir()) / f"kvtier-vllm-cache-{os.getuid()}"))
    # vLLM's CPU backend reserves one more core when a connector is configured;
    # a fixed count gives runs with and without kvtier the same cores.
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.update(extra or {})
    return env


def _launch(spec: dict, workdir: Path, name: str, timeout: float, env: dict | None):
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = (workdir / f"{name}.{ext}" for ext in ("spec.json", "out.json", "log"))
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    child_env = engine_env(env, int(spec.get("tensor_parallel_size", 1)) * int(spec.get("pipeline_parallel_size", 1)))
    if spec.get("kv_cache_memory_bytes"):
        # vLLM's CPU backend takes VLLM_CPU_KVCACHE_SPACE over kv_cache_memory_bytes
        child_env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "kvtier.bench.vllm_engine", str(spec_path), str(out_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=child_env,
                              timeout=timeout, cwd=str(REPO))
    return proc.returncode, out_path, log_path.read_text()


def run_engine(spec: dict, workdir: Path, name: str, timeout: float = 600, env: dict | None = None) -> dict:
    """Run one scenario; its JSON results. RuntimeError with the log's tail if it failed."""
    rc, out_path, log = _launch(spec, Path(workdir), name, timeout, env)
    if rc != 0 or not out_path.exists():
        raise RuntimeError(f"engine run {name!r} exited {rc}:\n{log[-4000:]}")
    return json.loads(out_path.read_text())


def start_failure(spec: dict, workdir: Path, name: str, timeout: float = 600) -> str:
    """Run a scenario that must fail while the engine starts; returns its log."""
    rc, _, log = _launch(spec, Path(workdir), name, timeout, None)
    if rc == 0:
        raise AssertionError(f"engine run {name!r} started although it should not have:\n{log[-2000:]}")
    return log


# ---- the engine side ------------------------------------------------------------------
def _engine_args(spec: dict) -> dict:
    args = dict(model=spec["model"], skip_tokenizer_init=True, block_size=32, enforce_eager=True,
                dtype=spec.get("dtype", "float32"), max_model_len=spec.get("max_model_len", 4096),
                max_num_seqs=spec.get("max_num_seqs", 16), enable_prefix_caching=True,
                max_num_batched_tokens=spec.get("max_num_batched_tokens", 4096), seed=0)
    for key in ("pipeline_parallel_size", "disable_hybrid_kv_cache_manager", "disable_log_stats"):
        if key in spec:
            args[key] = spec[key]
    if spec.get("kv_cache_memory_bytes"):
        args["kv_cache_memory_bytes"] = int(spec["kv_cache_memory_bytes"])
    tp = int(spec.get("tensor_parallel_size", 1))
    if tp > 1:
        args["tensor_parallel_size"] = tp
        args["distributed_executor_backend"] = "mp"
    elif spec.get("inprocess", True):
        args["distributed_executor_backend"] = "uni"
    if spec.get("kvtier") is not None:
        from vllm.config import KVTransferConfig

        args["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVTierConnector", kv_connector_module_path="kvtier.integrations.vllm",
            kv_role="kv_both", kv_load_failure_policy=spec.get("failure_policy", "recompute"),
            kv_connector_extra_config=spec["kvtier"])
    return args


def _connector_state(llm) -> tuple[dict | None, dict | None]:
    """Cumulative counters of the connector's scheduler side (in-process engines only)."""
    try:
        conn = llm.llm_engine.engine_core.engine_core.scheduler.connector
    except AttributeError:
        return None, None
    sched = getattr(conn, "scheduler", None)
    if sched is None:
        return None, None
    geo = sched.geometry
    hma_off = getattr(llm.llm_engine.vllm_config.scheduler_config, "disable_hybrid_kv_cache_manager", None)
    totals = dict(sched.totals.data, block_bytes=geo.block_bytes, rank_bytes=geo.rank_bytes,
                  tp_size=geo.tp_size, groups=[[g.kind, g.num_layers] for g in geo.groups],
                  hybrid_kv_cache_manager=not hma_off, namespace=geo.namespace.label,
                  plan=sched.planner.stats() if sched.planner is not None else None)
    try:
        from vllm.distributed.kv_transfer import get_kv_transfer_group
        worker = get_kv_transfer_group().worker
        totals.update({f"worker.{k}": v for k, v in worker.totals.data.items()})
    except Exception:  # the worker lives in another process
        pass
    return totals, sched.cache.stats()


def _tokens(seed: int, n: int, vocab: int = 500) -> list[int]:
    import random
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def _chat(llm, sp_cls, phase: dict) -> dict:
    c, t = phase["conversations"], phase["turns"]
    seed, vocab = phase.get("seed", 0), phase.get("vocab", 500)
    system = _tokens(seed, phase["system_tokens"], vocab)
    hist = [list(system) for _ in range(c)]
    sp = sp_cls(temperature=0.0, max_tokens=phase["gen_tokens"], detokenize=False, ignore_eos=True)
    digest, tokens, turns = hashlib.sha256(), 0, []
    t0 = time.perf_counter()
    for turn in range(t):
        if turn and phase.get("reset_between_turns"):
            llm.reset_prefix_cache()          # later turns can then only hit outside vLLM
        prompts = [hist[i] + _tokens(seed * 1000 + i * 100 + turn + 1, phase["user_tokens"], vocab)
                   for i in range(c)]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        record = {"prompt_tokens": [len(p) for p in prompts], "cached": [], "outputs": []}
        for i, o in enumerate(outs):
            out = list(o.outputs[0].token_ids)
            tokens += len(prompts[i]) + len(out)
            digest.update(json.dumps(out).encode())
            hist[i] = prompts[i] + out
            record["cached"].append(o.num_cached_tokens)
            record["outputs"].append(out)
        turns.append(record)
    return {"op": "chat", "seconds": time.perf_counter() - t0, "tokens": tokens, "digest": digest.hexdigest(),
            "turns": turns}


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process so far, by Python thread name, else by the
    thread's own name where kvtier set one (its native copy pool), else "native"."""
    import threading
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(task.name))
        if name is None:
            try:
                comm = (task / "comm").read_text().strip()
            except OSError:
                comm = ""
            name = comm if comm.startswith("kvtier") else "native"
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _turns(llm, sp_cls, phase: dict) -> dict:
    """Multi-turn conversations, turn by turn: turn k of every conversation as one batch (or one
    request at a time), its wall seconds, cached tokens, outputs, thread CPU seconds and the
    connector's counters after it; ``profile`` (a path prefix) writes a cProfile of each turn."""
    c, seed, vocab = phase["conversations"], phase.get("seed", 0), phase.get("vocab", 500)
    hist = [_tokens(seed * 7919 + i, phase["prompt_tokens"], vocab) for i in range(c)]
    sp = sp_cls(temperature=0.0, max_tokens=phase["gen_tokens"], detokenize=False, ignore_eos=True)
    turns = []
    for turn in range(phase.get("turns", 2)):
        if turn:
            hist = [h + _tokens(seed * 7919 + i + (turn << 20), phase["turn_tokens"], vocab)
                    for i, h in enumerate(hist)]
        batches = [[h] for h in hist] if phase.get("one_at_a_time") else [hist]
        prof = None
        if phase.get("profile"):
            import cProfile
            prof = cProfile.Profile()
        cpu0, t0 = _thread_cpu(), time.perf_counter()
        if prof is not None:
            prof.enable()
        outs = []
        for batch in batches:
            outs += llm.generate([{"prompt_token_ids": p} for p in batch], sp, use_tqdm=False)
        if prof is not None:
            prof.disable()
        seconds, cpu1 = time.perf_counter() - t0, _thread_cpu()
        record = {"turn": turn + 1, "seconds": seconds, "prompt_tokens": [len(h) for h in hist],
                  "cached": [o.num_cached_tokens for o in outs],
                  "outputs": [list(o.outputs[0].token_ids) for o in outs],
                  "thread_cpu_s": {k: round(v - cpu0.get(k, 0.0), 3) for k, v in cpu1.items()},
                  "connector": _connector_state(llm)[0]}
        if prof is not None:
            record["profile"] = f"{phase['profile']}.turn{turn + 1}.prof"
            prof.dump_stats(record["profile"])
        hist = [h + o for h, o in zip(hist, record["outputs"])]
        turns.append(record)
    return {"op": "turns", "case": phase.get("case"), "turns": turns}


def _drop_caches() -> dict:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return {"op": "drop_caches", "ok": True}
    except OSError as e:
        return {"op": "drop_caches", "ok": False, "error": f"{type(e).__name__}: {e}"}


def _throttle_disk(seconds_per_block: float) -> None:
    """Make every disk-tier read take ``seconds_per_block`` longer per block: a slow disk,
    for the load-or-recompute rule (in-process engines: the scheduler side reads)."""
    from kvtier.tiers.disk.tier import DiskTier

    read = DiskTier.read

    def slow_read(self, keys, slots, dsts):
        time.sleep(seconds_per_block * len(keys))
        return read(self, keys, slots, dsts)
    DiskTier.read = slow_read


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("disk_read_delay_s"):
        _throttle_disk(float(spec["disk_read_delay_s"]))
    if spec.get("inprocess", True):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    llm = LLM(**_engine_args(spec))
    results = []
    for phase in spec["phases"]:
        op = phase["op"]
        if op == "reset_prefix_cache":
            results.append({"op": op, "ok": bool(llm.reset_prefix_cache())})
            continue
        if op == "drop_caches":
            results.append(_drop_caches())
            continue
        if op == "chat":
            results.append(_chat(llm, SamplingParams, phase))
            continue
        if op == "turns":
            results.append(_turns(llm, SamplingParams, phase))
            continue
        if op == "ttft":
            if phase.get("reset"):
                llm.reset_prefix_cache()
            time.sleep(phase.get("settle_s", 0))     # let earlier background writes drain
            prompts, max_tokens = [phase["prompt"]], 1
        else:
            prompts, max_tokens = phase["prompts"], phase.get("max_tokens", 8)
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, detokenize=False, ignore_eos=True)
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        ttfts = [getattr(o.metrics, "first_token_latency", None) for o in outs]   # with log stats on
        results.append({"op": op, "case": phase.get("case"), "seconds": dt,
                        "outputs": [list(o.outputs[0].token_ids) for o in outs],
                        "cached": [o.num_cached_tokens for o in outs],
                        "ttfts": ttfts if all(t for t in ttfts) else None})
    totals, cache = _connector_state(llm)
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as e:  # teardown problems must not hide the results
        print(f"engine shutdown: {e}", file=sys.stderr)
    with open(out_path, "w") as f:
        json.dump({"phases": results, "connector": totals, "cache": cache}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
