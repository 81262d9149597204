"""The kvtier connector against a real vLLM engine (CPU backend, random-weight Llama).

Each engine runs in its own subprocess (bench/vllm_engine.py) so tests stay
isolated and memory is returned.  Greedy outputs are compared token by token.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from kvtier.bench.llama_fixture import build_llama
from kvtier.bench.vllm_engine import run_engine, start_failure

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

BLOCK = 32
MAX_TOKENS = 10


def _prompts() -> list[list[int]]:
    """Several prompts sharing one prefix to different depths, plus one unrelated."""
    rng = random.Random(1234)
    base = [rng.randrange(3, 500) for _ in range(320)]
    tail = lambda n: [rng.randrange(3, 500) for _ in range(n)]  # noqa: E731
    return [base[:40] + tail(9), base[:100] + tail(30), base[:170] + tail(3), base[:256],
            base[:300] + tail(17), tail(75)]


def _expected_hits(prompt: list[int]) -> int:
    """Tokens an engine can take from outside: full blocks, leaving the last token to compute."""
    return (len(prompt) - 1) // BLOCK * BLOCK


def _spec(model: Path, kvtier: dict | None, phases: list[dict], **kw) -> dict:
    return dict(model=str(model), dtype="float32", kvtier=kvtier, phases=phases, **kw)


def _pass(prompts) -> dict:
    return {"op": "generate", "prompts": prompts, "max_tokens": MAX_TOKENS, "concurrent": True}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_llama(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def disk_run(model, tmp_path_factory):
    """One engine with host + disk (write-through): cold pass, reset vLLM's cache, second pass."""
    work = tmp_path_factory.mktemp("disk_run")
    disk = work / "disk"
    kvtier = {"host": {"capacity_bytes": "32MiB"},
              "disk": {"path": str(disk), "capacity_bytes": "64MiB", "slab_bytes": "16MiB",
                       "write_mode": "through", "admission": "none", "durability": "data"}}
    prompts = _prompts()
    out = run_engine(_spec(model, kvtier, [_pass(prompts), {"op": "reset_prefix_cache"}, _pass(prompts)]),
                     work, "disk_run")
    return dict(out=out, prompts=prompts, kvtier=kvtier, disk=disk, work=work)


def test_external_hits_give_identical_outputs(disk_run):
    """(a), (b), (f): after reset_prefix_cache every full block comes back from kvtier,
    for concurrent requests sharing prefixes of different lengths, and greedy
    outputs match the cold pass token by token."""
    cold, reset, warm = disk_run["out"]["phases"]
    assert reset["ok"]
    assert warm["outputs"] == cold["outputs"]
    assert warm["cached"] == [_expected_hits(p) for p in disk_run["prompts"]]
    conn, cache = disk_run["out"]["connector"], disk_run["out"]["cache"]
    assert conn["hit_blocks"] > 0 and conn["load_failed_blocks"] == 0
    assert cache["loaded_blocks"] == conn["hit_blocks"]
    assert cache["host.stored_blocks"] > 0


def test_sync_load_mode_gives_identical_outputs(model, tmp_path):
    """(e): the synchronous load path (loads inside the step) behaves the same."""
    prompts = _prompts()
    kvtier = {"host": {"capacity_bytes": "32MiB"}, "load_mode": "sync"}
    out = run_engine(_spec(model, kvtier, [_pass(prompts), {"op": "reset_prefix_cache"}, _pass(prompts)]),
                     tmp_path, "sync")
    cold, _, warm = out["phases"]
    assert warm["outputs"] == cold["outputs"]
    assert warm["cached"] == [_expected_hits(p) for p in prompts]
    assert out["connector"]["hit_blocks"] > 0 and out["connector"]["load_failed_blocks"] == 0


def test_fresh_engine_reuses_disk_tier(disk_run, model):
    """(c): a new engine process over the same disk directory gets hits and the same outputs."""
    prompts = disk_run["prompts"]
    cold = disk_run["out"]["phases"][0]
    out = run_engine(_spec(model, disk_run["kvtier"], [_pass(prompts)]), disk_run["work"], "fresh")
    (warm,) = out["phases"]
    assert warm["outputs"] == cold["outputs"]
    assert warm["cached"] == [_expected_hits(p) for p in prompts]
    assert out["cache"].get("disk.promoted_blocks", 0) > 0
    assert out["connector"]["load_failed_blocks"] == 0


def _corrupt_slot(disk: Path, block_bytes: int, capacity: int, slab_bytes: int, slot: int) -> None:
    from kvtier.tiers.disk.slabs import SlotGeometry, slab_file

    geo = SlotGeometry.plan(block_bytes, capacity, slab_bytes)
    path = slab_file(str(disk), geo.slab_of(slot))
    with open(path, "r+b") as f:
        f.seek(geo.offset_of(slot) + block_bytes // 2)
        raw = bytearray(f.read(64))
        f.seek(geo.offset_of(slot) + block_bytes // 2)
        f.write(bytes(b ^ 0xFF for b in raw))


def test_corrupt_disk_block_is_recomputed(disk_run, model, tmp_path):
    """(d): a block corrupted on disk fails its checksum, is reported as a load
    error, vLLM recomputes it, and the output stays identical."""
    disk = tmp_path / "disk"
    shutil.copytree(disk_run["disk"], disk, ignore=shutil.ignore_patterns("LOCK"))
    kvtier = {**disk_run["kvtier"], "disk": {**disk_run["kvtier"]["disk"], "path": str(disk)}}
    from kvtier.config import parse_size

    block_bytes = disk_run["out"]["connector"]["block_bytes"]
    d = kvtier["disk"]
    for slot in (0, 1, 2):
        _corrupt_slot(disk, block_bytes, parse_size("c", d["capacity_bytes"]), parse_size("s", d["slab_bytes"]), slot)
    prompts = disk_run["prompts"]
    cold = disk_run["out"]["phases"][0]
    out = run_engine(_spec(model, kvtier, [_pass(prompts)]), tmp_path, "corrupt")
    (warm,) = out["phases"]
    assert warm["outputs"] == cold["outputs"]
    assert out["connector"]["load_failed_blocks"] >= 1
    assert out["cache"].get("disk.failed_reads", 0) >= 1
    # Blocks other than the corrupted ones still come back.
    assert out["cache"].get("disk.promoted_blocks", 0) > 0


def test_multiprocess_engine_shares_host_arena(model, tmp_path):
    """The default deployment: scheduler and worker in separate processes share the host arena."""
    prompts = _prompts()[:4]
    kvtier = {"host": {"capacity_bytes": "16MiB"}}
    out = run_engine(_spec(model, kvtier, [_pass(prompts), {"op": "reset_prefix_cache"}, _pass(prompts)],
                           inprocess=False), tmp_path, "multiprocess", timeout=600)
    cold, _, warm = out["phases"]
    assert warm["outputs"] == cold["outputs"]
    assert warm["cached"] == [_expected_hits(p) for p in prompts]


def test_bad_connector_config_fails_at_startup(model, tmp_path):
    """An unknown key stops vLLM while it starts, with a message naming the key."""
    kvtier = {"host": {"capacity_bytes": "16MiB"}, "hots": {"capacity_bytes": "1GiB"}}
    log = start_failure(_spec(model, kvtier, [_pass([[5] * 40])]), tmp_path, "badkey")
    assert "kv_connector_extra_config.hots" in log
    assert "Traceback" in log
