"""The connector under tensor parallelism and with a hybrid (sliding-window + full) model.

Real vLLM CPU engines, each in a subprocess of its own (kvtier.bench.vllm_engine).
TP=2 runs one core per rank.  Greedy outputs are compared token for token.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kvtier.bench.llama_fixture import build_hybrid, build_llama
from kvtier.bench.vllm_engine import run_engine, start_failure
from kvtier.config import parse_size

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1200)]

BLOCK = 32
DISK = {"capacity_bytes": "64MiB", "slab_bytes": "16MiB", "write_mode": "through",
        "admission": "none", "durability": "data"}
# Two turns of four conversations; vLLM's own prefix cache is reset between them,
# so every second-turn hit must come from kvtier.
CHAT = {"op": "chat", "conversations": 4, "turns": 2, "system_tokens": 150, "user_tokens": 40,
        "gen_tokens": 12, "seed": 3, "reset_between_turns": True}


def _kvtier(disk: Path) -> dict:
    return {"host": {"capacity_bytes": "16MiB"}, "disk": dict(DISK, path=str(disk))}


def _spec(model: Path, kvtier: dict | None, phases: list[dict], **kw) -> dict:
    return dict(model=str(model), dtype="float32", kvtier=kvtier, phases=phases, **kw)


def _expected_turn2_hits(turn1: dict, turn2: dict) -> list[int]:
    """Full blocks of each first-turn prompt plus its output, the last token kept local."""
    return [min((p + len(o) - 1) // BLOCK, (p2 - 1) // BLOCK) * BLOCK
            for p, o, p2 in zip(turn1["prompt_tokens"], turn1["outputs"], turn2["prompt_tokens"])]


def _corrupt(disk: Path, block_bytes: int, offset: int, slots=(0, 1, 2)) -> None:
    """Flip bytes at ``offset`` inside the given disk slots (one rank's slice, one group's pages)."""
    from kvtier.tiers.disk.slabs import SlotGeometry, slab_file

    geo = SlotGeometry.plan(block_bytes, parse_size("c", DISK["capacity_bytes"]), parse_size("s", DISK["slab_bytes"]))
    for slot in slots:
        with open(slab_file(str(disk), geo.slab_of(slot)), "r+b") as f:
            f.seek(geo.offset_of(slot) + offset)
            raw = bytearray(f.read(64))
            f.seek(geo.offset_of(slot) + offset)
            f.write(bytes(b ^ 0xFF for b in raw))


def _copy_disk(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("LOCK"))
    return dst


# ---- tensor parallel ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    """TP=2 without and with kvtier (host + disk) on the same chat workload."""
    work = tmp_path_factory.mktemp("tp")
    model = build_llama(tmp_path_factory.mktemp("models"))
    plain = run_engine(_spec(model, None, [CHAT], tensor_parallel_size=2), work, "tp-plain", timeout=900)
    kvtier = _kvtier(work / "disk")
    tiered = run_engine(_spec(model, kvtier, [CHAT], tensor_parallel_size=2), work, "tp-kvtier", timeout=900)
    return dict(model=model, work=work, kvtier=kvtier, plain=plain, tiered=tiered)


def test_tp2_outputs_equal_and_second_turns_hit_kvtier(tp):
    (plain,), (tiered,) = tp["plain"]["phases"], tp["tiered"]["phases"]
    assert tiered["digest"] == plain["digest"]
    t1, t2 = tiered["turns"]
    assert t2["outputs"] == plain["turns"][1]["outputs"]
    assert t2["cached"] == _expected_turn2_hits(t1, t2)
    conn = tp["tiered"]["connector"]
    assert conn["tp_size"] == 2 and conn["block_bytes"] == 2 * conn["rank_bytes"]
    assert conn["hit_blocks"] > 0 and conn["load_failed_blocks"] == 0


def test_tp2_fresh_engine_reuses_disk_and_recomputes_a_damaged_rank_slice(tp, tmp_path):
    """A new TP=2 engine over the disk directory hits; with rank 1's slice of some
    blocks damaged, those blocks are recomputed on every rank and outputs stay equal."""
    plain_turns = tp["plain"]["phases"][0]["turns"]
    fresh = run_engine(_spec(tp["model"], tp["kvtier"], [CHAT], tensor_parallel_size=2), tmp_path, "tp-fresh",
                       timeout=900)
    (chat,) = fresh["phases"]
    assert [t["outputs"] for t in chat["turns"]] == [t["outputs"] for t in plain_turns]
    assert all(c > 0 for c in chat["turns"][0]["cached"])          # first turns hit the disk tier now
    assert fresh["cache"].get("disk.promoted_blocks", 0) > 0

    disk = _copy_disk(tp["work"] / "disk", tmp_path / "damaged")
    conn = tp["tiered"]["connector"]
    _corrupt(disk, conn["block_bytes"], offset=conn["rank_bytes"] + conn["rank_bytes"] // 3)
    kvtier = dict(tp["kvtier"], disk=dict(tp["kvtier"]["disk"], path=str(disk)))
    damaged = run_engine(_spec(tp["model"], kvtier, [CHAT], tensor_parallel_size=2), tmp_path, "tp-damaged",
                         timeout=900)
    (chat,) = damaged["phases"]
    assert [t["outputs"] for t in chat["turns"]] == [t["outputs"] for t in plain_turns]
    assert damaged["cache"].get("disk.failed_reads", 0) >= 1
    assert damaged["connector"]["load_failed_blocks"] + damaged["cache"].get("miss_blocks", 0) >= 1


def test_other_tp_size_finds_nothing(tp, tmp_path):
    """TP=1 over the TP=2 directory: a different namespace, so no hit, and correct outputs."""
    disk = _copy_disk(tp["work"] / "disk", tmp_path / "disk")
    kvtier = dict(tp["kvtier"], disk=dict(tp["kvtier"]["disk"], path=str(disk)))
    chat = dict(CHAT, turns=1)
    out = run_engine(_spec(tp["model"], kvtier, [chat, {"op": "reset_prefix_cache"}, chat]), tmp_path, "tp1")
    first, _, second = out["phases"]
    assert out["connector"]["tp_size"] == 1
    assert out["cache"].get("disk.promoted_blocks", 0) == 0      # nothing of the TP=2 blocks was found
    # Its own blocks (host tier) do come back, and give the same outputs.
    assert second["turns"][0]["outputs"] == first["turns"][0]["outputs"]
    assert all(c > 0 for c in second["turns"][0]["cached"])


def test_pipeline_parallel_is_refused_at_startup(tmp_path):
    model = build_llama(tmp_path / "models")
    log = start_failure(_spec(model, {"host": {"capacity_bytes": "8MiB"}}, [CHAT], pipeline_parallel_size=2,
                              tensor_parallel_size=1, inprocess=False), tmp_path, "pp2")
    assert "pipeline_parallel_size" in log


# ---- hybrid: sliding window + full attention ----------------------------------------------
@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    work = tmp_path_factory.mktemp("hybrid")
    model = build_hybrid(tmp_path_factory.mktemp("models"))
    plain = run_engine(_spec(model, None, [CHAT]), work, "hy-plain")
    kvtier = _kvtier(work / "disk")
    tiered = run_engine(_spec(model, kvtier, [CHAT]), work, "hy-kvtier")
    return dict(model=model, work=work, kvtier=kvtier, plain=plain, tiered=tiered)


def test_hybrid_keeps_vllm_hybrid_manager_and_outputs_equal(hybrid):
    conn = hybrid["tiered"]["connector"]
    assert conn["hybrid_kv_cache_manager"] is True
    assert sorted(kind for kind, _ in conn["groups"]) == ["full", "sliding"]
    (plain,), (tiered,) = hybrid["plain"]["phases"], hybrid["tiered"]["phases"]
    assert tiered["digest"] == plain["digest"]
    t1, t2 = tiered["turns"]
    assert t2["cached"] == _expected_turn2_hits(t1, t2)
    assert conn["hit_blocks"] > 0 and conn["load_failed_blocks"] == 0
    assert "Turning off hybrid kv cache manager" not in (hybrid["work"] / "hy-kvtier.log").read_text()


def test_hybrid_fresh_engine_and_damaged_sliding_window_pages(hybrid, tmp_path):
    plain_turns = hybrid["plain"]["phases"][0]["turns"]
    fresh = run_engine(_spec(hybrid["model"], hybrid["kvtier"], [CHAT]), tmp_path, "hy-fresh")
    (chat,) = fresh["phases"]
    assert [t["outputs"] for t in chat["turns"]] == [t["outputs"] for t in plain_turns]
    assert all(c > 0 for c in chat["turns"][0]["cached"])
    assert fresh["connector"]["load_failed_blocks"] == 0

    disk = _copy_disk(hybrid["work"] / "disk", tmp_path / "damaged")
    conn = hybrid["tiered"]["connector"]
    sliding = [i for i, (kind, _) in enumerate(conn["groups"]) if kind == "sliding"][0]
    group_bytes = conn["rank_bytes"] // len(conn["groups"])        # the groups have equal pages here
    _corrupt(disk, conn["block_bytes"], offset=sliding * group_bytes + group_bytes // 2,
             slots=range(0, 24))
    kvtier = dict(hybrid["kvtier"], disk=dict(hybrid["kvtier"]["disk"], path=str(disk)))
    damaged = run_engine(_spec(hybrid["model"], kvtier, [CHAT]), tmp_path, "hy-damaged")
    (chat,) = damaged["phases"]
    assert [t["outputs"] for t in chat["turns"]] == [t["outputs"] for t in plain_turns]
    assert damaged["cache"].get("disk.failed_reads", 0) >= 1
    assert damaged["connector"]["load_failed_blocks"] >= 1      # promised, then recomputed by vLLM


def test_hybrid_with_other_group_layout_finds_nothing(hybrid, tmp_path):
    """The same model with vLLM's hybrid manager turned off has one group: another namespace."""
    disk = _copy_disk(hybrid["work"] / "disk", tmp_path / "disk")
    kvtier = dict(hybrid["kvtier"], disk=dict(hybrid["kvtier"]["disk"], path=str(disk)))
    chat = dict(CHAT, turns=1)
    out = run_engine(_spec(hybrid["model"], kvtier, [chat], disable_hybrid_kv_cache_manager=True),
                     tmp_path, "hy-nohma")
    (first,) = out["phases"]
    assert out["connector"]["hybrid_kv_cache_manager"] is False
    assert out["connector"]["hit_blocks"] == 0
    assert out["cache"].get("disk.promoted_blocks", 0) == 0
    assert first["turns"][0]["outputs"] == hybrid["plain"]["phases"][0]["turns"][0]["outputs"]


def test_hybrid_with_sync_loads_is_refused_at_startup(hybrid, tmp_path):
    log = start_failure(_spec(hybrid["model"], {"host": {"capacity_bytes": "8MiB"}, "load_mode": "sync"},
                              [CHAT]), tmp_path, "hy-sync")
    assert "kv_connector_extra_config.load_mode" in log
