"""Load only what beats recomputing it, in a real vLLM engine (CPU backend).

A disk tier slowed by a delay on every block read (kvtier.bench.vllm_engine's
``disk_read_delay_s``) makes a disk hit slower than a cold prefill of the same
tokens.  After the engine has measured its own prefill and one slow disk load,
the connector recomputes such a hit (same outputs), and over the same disk at
full speed it loads it.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from kvtier.bench.llama_fixture import build_llama
from kvtier.bench.vllm_engine import run_engine

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

BLOCK = 32


def _prompt(seed: int, n: int = 1500) -> list[int]:
    # Long enough that recomputing a hit costs clearly more than one scheduling round trip
    # (an async load waits at least one engine step), even for the tiny test model.
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


def _gen(prompts, case):
    return {"op": "generate", "prompts": prompts, "max_tokens": 8, "case": case}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """One engine writes prompts A and B through to a disk tier."""
    work = tmp_path_factory.mktemp("plan")
    model = build_llama(tmp_path_factory.mktemp("models"))
    kvtier = {"host": {"capacity_bytes": "16MiB"},
              "disk": {"path": str(work / "disk"), "capacity_bytes": "64MiB", "slab_bytes": "16MiB",
                       "write_mode": "through", "admission": "none", "durability": "data"}}
    a, b = _prompt(1), _prompt(2)
    out = run_engine(dict(model=str(model), dtype="float32", kvtier=kvtier,
                          phases=[_gen([a], "a"), _gen([b], "b")]), work, "store")
    return dict(model=model, work=work, kvtier=kvtier, a=a, b=b,
                outputs=[p["outputs"][0] for p in out["phases"]])


def _fresh(stored, tmp_path: Path, name: str, delay: float) -> dict:
    # Over a copy of the stored disk tier: three cold prompts teach the connector the
    # engine's prefill cost, prompt A the disk's speed (its hit loads: nothing is
    # measured yet), then prompt B is decided.
    disk = tmp_path / f"{name}-disk"
    shutil.copytree(stored["work"] / "disk", disk, ignore=shutil.ignore_patterns("LOCK"))
    kvtier = dict(stored["kvtier"], disk=dict(stored["kvtier"]["disk"], path=str(disk)))
    warm = [_gen([_prompt(100 + i)], f"warm{i}") for i in range(3)]
    spec = dict(model=str(stored["model"]), dtype="float32", kvtier=kvtier,
                disk_read_delay_s=delay, phases=[*warm, _gen([stored["a"]], "a"), _gen([stored["b"]], "b")])
    return run_engine(spec, tmp_path, name)


def test_a_hit_slower_than_recompute_is_recomputed_and_a_fast_one_loads(stored, tmp_path):
    expected = (len(stored["b"]) - 1) // BLOCK * BLOCK
    slow = _fresh(stored, tmp_path, "slow", delay=0.05)
    *_, a, b = slow["phases"]
    assert a["outputs"][0] == stored["outputs"][0] and b["outputs"][0] == stored["outputs"][1]
    assert a["cached"] == [expected]                     # nothing measured yet: the disk hit loads
    assert b["cached"] == [0]                            # measured slow: recomputed
    conn = slow["connector"]
    assert conn["plan_recomputed_blocks"] >= expected // BLOCK
    assert conn["plan"]["disk.load_measured"] and conn["plan"]["prefill.observations"] >= 3

    fast = _fresh(stored, tmp_path, "fast", delay=0.0)
    *_, a, b = fast["phases"]
    assert b["outputs"][0] == stored["outputs"][1]
    assert [p["cached"] for p in fast["phases"][:3]] == [[0]] * 3          # the warm-up prompts were cold
    assert b["cached"] == [expected]                     # the same hit at full speed loads
    assert fast["connector"]["plan_recomputed_blocks"] == 0
    assert fast["connector"]["plan"]["prefill.observations"] >= 3       # decided by the rule, not by default
