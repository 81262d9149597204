"""The replay's prefill-saved estimate applies the serving rule (kvtier.load_plan) request by request."""
from __future__ import annotations

import itertools
import json

import pytest

from kvtier.replay.report import block_saving_s, format_text, prefill_saved, summarize
from kvtier.replay.sim import ReplayConfig, ReplayResult, replay
from kvtier.replay.synthetic import GENERATORS

BT = 512
KV = 1024                                 # bytes per token: a 512 KiB block
BLOCK_MS = BT * 0.1                       # compute per block at 0.1 ms/token: 51.2 ms


def result(patterns: dict, tiers=("host", "disk"), num_blocks: int = 1000) -> ReplayResult:
    cfg = ReplayConfig(tuple(100 * BT for _ in tiers), kv_bytes_per_token=KV, block_tokens=BT)
    res = ReplayResult("crafted", cfg, num_requests=sum(patterns.values()), num_blocks=num_blocks)
    res.hit_patterns = dict(patterns)
    res.hit_blocks = {t: 0 for t in cfg.tier_names}
    for runs, count in patterns.items():
        for t, k in runs:
            res.hit_blocks[t] += k * count
    return res


def gbps_for_ms_per_block(ms: float) -> float:
    return BT * KV / (ms / 1000) / 1e9


def test_replay_records_where_each_requests_hits_came_from():
    tr = GENERATORS["rag"](num_requests=400)
    res = replay(tr, ReplayConfig((100 * BT, 400 * BT)))
    assert res.hit_patterns and res.hits > 0
    per_tier = {n: 0 for n in res.config.tier_names}
    for runs, count in res.hit_patterns.items():
        assert all(k > 0 for _, k in runs)
        assert all(a[0] != b[0] for a, b in itertools.pairwise(runs))      # runs: neighbours differ
        for t, k in runs:
            per_tier[t] += k * count
    assert per_tier == res.hit_blocks
    assert sum(res.hit_patterns.values()) <= res.num_requests


def test_a_slow_disk_tail_is_recomputed_and_the_host_head_still_counts():
    res = result({(("host", 4), ("disk", 4)): 10})
    pf = prefill_saved(res, 0.1, {"host": 10.0, "disk": gbps_for_ms_per_block(60.0)})
    assert pf["host"]["loaded_blocks"] == 40 and pf["disk"]["loaded_blocks"] == 0
    assert not pf["disk"]["worth_loading"] and pf["disk"]["compute_s"] == 0.0
    assert pf["total_net_s"] == pytest.approx(40 * (BLOCK_MS / 1000 - BT * KV / 10e9))
    assert pf["fraction_saved"] == pytest.approx(pf["total_net_s"] / (1000 * BLOCK_MS / 1000))


def test_a_slow_block_in_front_is_loaded_when_the_blocks_behind_it_pay():
    slow = {"host": 10.0, "disk": gbps_for_ms_per_block(200.0)}       # 200 ms against 51 ms of compute
    carried = prefill_saved(result({(("disk", 1), ("host", 30)): 1}), 0.1, slow)
    assert (carried["disk"]["loaded_blocks"], carried["host"]["loaded_blocks"]) == (1, 30)
    assert carried["disk"]["net_s"] < 0 < carried["total_net_s"]       # the disk block's loss is counted
    alone = prefill_saved(result({(("disk", 1), ("host", 1)): 1}), 0.1, slow)
    assert (alone["disk"]["loaded_blocks"], alone["host"]["loaded_blocks"]) == (0, 0)
    assert alone["total_net_s"] == 0.0


def test_the_margin_decides_a_near_tie():
    res = result({(("disk", 8),): 5})
    bw = {"host": 10.0, "disk": gbps_for_ms_per_block(45.0)}          # 45 ms against 51.2 ms
    assert prefill_saved(res, 0.1, bw, margin=1.0)["disk"]["loaded_blocks"] == 40
    none = prefill_saved(res, 0.1, bw, margin=1.2)                      # the default
    assert none["margin"] == 1.2 and none["disk"]["loaded_blocks"] == 0 and none["total_net_s"] == 0.0
    assert block_saving_s(BT, BT * KV, 0.1, gbps_for_ms_per_block(45.0), margin=1.0) > 0
    assert block_saving_s(BT, BT * KV, 0.1, gbps_for_ms_per_block(45.0)) == 0.0


def test_free_compute_saves_nothing_and_unknown_bandwidth_loads_for_free():
    res = result({(("host", 3),): 2}, tiers=("host",))
    assert prefill_saved(res, 0.0, {"host": 10.0})["total_net_s"] == 0.0
    pf = prefill_saved(res, 0.1, {"host": None})
    assert pf["host"]["loaded_blocks"] == 6 and pf["host"]["load_s"] is None
    assert pf["total_net_s"] == pytest.approx(6 * BLOCK_MS / 1000)


def test_report_says_how_many_hit_blocks_the_rule_loaded():
    res = result({(("host", 4), ("disk", 4)): 10})
    pf = prefill_saved(res, 0.1, {"host": 10.0, "disk": gbps_for_ms_per_block(60.0)})
    s = summarize(res, None, pf)
    text = format_text(s)
    assert "prefill host: 40 of 40 hit blocks loaded" in text
    assert "prefill disk: 0 of 40 hit blocks loaded" in text and "40 hit blocks cheaper to recompute" in text
    assert "by 1.2x, request by request" in text
    json.dumps(s)
