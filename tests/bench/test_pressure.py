"""``kvtier bench pressure`` end to end on the tiny Llama: its rows, and the control's outputs."""
from __future__ import annotations

import argparse
import json

import pytest

from kvtier.errors import ConfigError

TINY_RUN = ["--model", "tiny", "--engine-kv", "1MiB", "--conversations", "4", "--prompt-tokens", "512",
            "--turn-tokens", "64", "--gen-tokens", "4", "--alternations", "1", "--no-progress"]
FIELDS = {"suite", "case", "bytes", "seconds", "ratio", "samples", "ratio_to_floor", "ratio_to_plain",
          "cached_tokens", "kvtier_tokens", "engine_tokens", "prompt_tokens", "same_as_floor",
          "engine_kv_bytes", "host_bytes", "one_at_a_time"}


def _args(**over) -> argparse.Namespace:
    from kvtier.bench import pressure
    p = argparse.ArgumentParser()
    pressure.add_arguments(p)
    args = p.parse_args(TINY_RUN[:-1])
    for k, v in over.items():
        setattr(args, k, v)
    return args


@pytest.mark.parametrize("over, key", [
    ({"engine_kv": "64MiB"}, "--engine-kv"),         # holds every first turn: nothing is evicted
    ({"engine_kv": "256KiB"}, "--engine-kv"),        # smaller than one second turn
    ({"conversations": 0}, "--conversations"),
    ({"prompt_tokens": 5000}, "--prompt-tokens"),    # past the model's positions
])
def test_plan_refuses_a_workload_that_does_not_overflow(over, key):
    pytest.importorskip("torch")
    from kvtier.bench.pressure import plan
    with pytest.raises(ConfigError) as e:
        plan(_args(**over))
    assert e.value.key == key


def test_plan_sizes_the_floor_and_host_tier_for_everything():
    pytest.importorskip("torch")
    from kvtier.bench.pressure import plan
    sizes = plan(_args())
    first_turns = 4 * 512 * sizes["per_token"]
    assert sizes["engine_kv"] == 1 << 20 < first_turns
    assert sizes["floor_kv"] > 2 * first_turns and sizes["host"] > sizes["floor_kv"]
    # the small engine holds 1 MiB / (32 tokens x per_token) blocks; a second turn needs 19 of them
    blocks = (1 << 20) // (32 * sizes["per_token"])
    assert sizes["same_batch"] == max(1, min(16, blocks // 19))


@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_pressure_suite_end_to_end(tmp_path):
    from kvtier.cli import main
    out = tmp_path / "rows.jsonl"
    assert main(["bench", "pressure", *TINY_RUN, "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    rows = {r["case"]: r for r in map(json.loads, out.read_text().splitlines())}
    expected = {f"turn{t}_{e}" for t in (1, 2) for e in ("kvtier", "plain", "floor")}
    expected |= {f"turn{t}_floor_same_batch" for t in (1, 2)}
    expected |= {f"seq_turn{t}_{e}" for t in (1, 2) for e in ("kvtier", "floor")}
    assert set(rows) == expected
    for r in rows.values():
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["suite"] == "pressure" and r["seconds"] > 0 and r["prompt_tokens"] > 0
    # the workload: vLLM alone keeps nothing for the second turns, the floor keeps every full block
    assert rows["turn2_plain"]["cached_tokens"] == 0 and rows["turn2_plain"]["evicted_all"] is True
    full_blocks = 4 * (512 // 32) * 32
    assert rows["turn2_floor"]["cached_tokens"] == full_blocks
    # kvtier serves them from the host tier (counted by the connector and by vLLM)
    for case in ("turn2_kvtier", "seq_turn2_kvtier"):
        assert rows[case]["kvtier_tokens"] == full_blocks == rows[case]["cached_tokens"]
        assert rows[case]["bytes"] > 0
    assert rows["turn1_kvtier"]["kvtier_tokens"] == 0
    # the connector's own time on the engine thread is measured, and is part of the turn's
    for case in ("turn1_kvtier", "turn2_kvtier"):
        assert 0 < rows[case]["connector_seconds"] < rows[case]["seconds"]
        assert 0 < rows[case]["connector_share"] < 1
    assert rows["turn1_kvtier"]["store_copy_seconds"] > 0
    assert rows["turn1_kvtier"]["connector_cpu_share"] >= rows["turn1_kvtier"]["connector_share"]
    # the same-batch floor runs no more second turns at once than the small engine holds
    assert rows["turn2_floor_same_batch"]["max_num_seqs"] >= 1
    assert rows["turn2_floor_same_batch"]["cached_tokens"] == full_blocks
    assert rows["turn2_kvtier"]["ratio_to_same_batch"] > 0
    # one sequence at a time, kvtier's outputs are the floor's, token for token
    assert rows["seq_turn1_kvtier"]["same_as_floor"] and rows["seq_turn2_kvtier"]["same_as_floor"]
    assert rows["seq_turn2_floor"]["ratio_to_floor"] == 1.0
