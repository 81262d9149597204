"""Trace replay: loader validation, prefix semantics, bounds, the TieredCache replay in both modes."""
from __future__ import annotations

import json
import os

import pytest

from kvtier.errors import ConfigError
from kvtier.replay.belady import belady_hits, infinite_hits
from kvtier.replay.report import bounds, format_text, prefill_saved, summarize
from kvtier.replay.sim import ReplayConfig, block_bytes_of, block_key, replay, simulate
from kvtier.replay.synthetic import GENERATORS, make_trace
from kvtier.replay.trace import load_trace, parse_lines, trace_from_blocks, write_trace

from tests.helpers import ROOT

MOONCAKE = os.path.join(ROOT.parent, "shared", "data", "mooncake", "conversation_trace.jsonl")


def line(ts=0, n_in=1024, n_out=10, ids=(1, 2, 3)):
    return json.dumps({"timestamp": ts, "input_length": n_in, "output_length": n_out, "hash_ids": list(ids)})


# ---- loader --------------------------------------------------------------------------------
def test_only_full_blocks_are_kept(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(line(0, 1500, ids=(7, 8, 9)) + "\n\n" + line(5, 511, ids=(7,)) + "\n")
    tr = load_trace(p)
    assert [r.blocks for r in tr.requests] == [(7, 8), ()]
    assert tr.num_blocks == 2 and len(tr) == 2 and tr.duration_s == 0.005


@pytest.mark.parametrize("text, where", [
    ("{not json", "t.jsonl:2"),
    ("[1, 2]", "t.jsonl:2"),
    (json.dumps({"input_length": 10, "hash_ids": []}), "timestamp"),
    (json.dumps({"timestamp": 1, "hash_ids": []}), "input_length"),
    (line(ts=-1), "timestamp"),
    (line(n_in=1.5), "input_length"),
    (line(n_in=True), "input_length"),
    (json.dumps({"timestamp": 1, "input_length": 10, "hash_ids": "abc"}), "hash_ids"),
    (line(n_in=4096, ids=(1, 2)), "hash_ids"),
    (line(ids=(1, -2)), "hash_ids[1]"),
    (line(ids=(1, "x")), "hash_ids[1]"),
    (line(ts=-0.5), "timestamp"),
])
def test_malformed_lines_name_the_line_and_field(tmp_path, text, where):
    p = tmp_path / "t.jsonl"
    p.write_text(line(0) + "\n" + text + "\n")
    with pytest.raises(ConfigError) as e:
        load_trace(p)
    assert "t.jsonl:2" in str(e.value) and where in str(e.value)


def test_time_must_not_go_back(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(line(10) + "\n" + line(5) + "\n")
    with pytest.raises(ConfigError, match="t.jsonl:2: timestamp"):
        load_trace(p)


def test_unreadable_and_empty_files(tmp_path):
    with pytest.raises(ConfigError, match="readable"):
        load_trace(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="at least one request"):
        load_trace(tmp_path / "empty.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_trace(tmp_path / "bin.jsonl")
    with pytest.raises(ConfigError, match="limit"):
        load_trace(tmp_path / "empty.jsonl", limit=0)


def test_limit_and_round_trip(tmp_path):
    tr = GENERATORS["rag"](num_requests=50)
    p = tmp_path / "rag.jsonl"
    write_trace(tr, p)
    back = load_trace(p)
    assert [r.blocks for r in back.requests] == [r.blocks for r in tr.requests]
    assert len(load_trace(p, limit=7)) == 7
    assert list(parse_lines([line(0)], limit=0)) == []


# ---- semantics and bounds ---------------------------------------------------------------------
def test_prefix_semantics_by_hand():
    # A hits nothing; B shares A's first two blocks; C's first block differs, so nothing after it hits.
    tr = trace_from_blocks("t", [[1, 2, 3], [1, 2, 4], [9, 2, 3]])
    assert infinite_hits(tr) == 2
    assert simulate(tr, "lru", 100) == 2
    assert belady_hits(tr, 100) == 2


def test_belady_beats_every_policy_and_stays_under_infinite():
    for name in ("rag", "chat", "tenants"):
        tr = GENERATORS[name](num_requests=800)
        inf = infinite_hits(tr)
        for cap in (20, 100, 400):
            opt = belady_hits(tr, cap)
            assert opt <= inf
            for pol in ("lru", "s3fifo", "prefix"):
                assert simulate(tr, pol, cap) <= opt


def test_belady_by_hand():
    # capacity 2: [3] never comes back, so the optimum drops it at once and keeps 1 and 2;
    # LRU drops 1 for 3, then 2 for 1, and misses both.
    tr = trace_from_blocks("t", [[1, 2], [3], [1], [2]])
    assert belady_hits(tr, 2) == 2
    assert simulate(tr, "lru", 2) == 0
    # capacity 2, every block comes back: after [3] the farthest next use (2) leaves
    tr = trace_from_blocks("t", [[1, 2], [3], [1], [3], [2]])
    assert belady_hits(tr, 2) == 2


def test_bad_capacities_are_config_errors():
    tr = trace_from_blocks("t", [[1]])
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError):
            belady_hits(tr, bad)
        with pytest.raises(ConfigError):
            simulate(tr, "lru", bad)
    with pytest.raises(ConfigError, match="policy"):
        simulate(tr, "nope", 4)
    with pytest.raises(ConfigError, match="synthetic"):
        make_trace("nope")


@pytest.mark.parametrize("kwargs", [
    {"capacities_tokens": ()}, {"capacities_tokens": (100,)}, {"capacities_tokens": (1024, 2048, 4096)},
    {"capacities_tokens": (1024,), "mode": "fast"}, {"capacities_tokens": (1024,), "policy": "nope"},
    {"capacities_tokens": (1024,), "kv_bytes_per_token": 0},
    {"capacities_tokens": (1024, 4096), "mode": "bytes"},
])
def test_replay_config_validation(kwargs):
    with pytest.raises(ConfigError):
        ReplayConfig(**kwargs)


# ---- through the TieredCache -------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["lru", "prefix", "adaptive"])
def test_metadata_replay_matches_the_policy_simulation(policy):
    """The cache evicts a request's worth of blocks at once before inserting them, the simulation
    one at a time: identical for LRU, within a few blocks for a policy whose clock sees the order."""
    tr = GENERATORS["rag"](num_requests=1500)
    cap_blocks = 300
    res = replay(tr, ReplayConfig((cap_blocks * 512,), policy=policy))
    sim = simulate(tr, policy, cap_blocks)
    if policy == "lru":
        assert res.hits == sim
    else:
        assert abs(res.hits - sim) <= 0.002 * sim
    assert res.hit_blocks["host"] == res.hits and res.failed_loads == 0
    assert res.num_blocks == tr.num_blocks


def test_a_disk_tier_only_adds_hits_and_counts_its_bytes():
    tr = GENERATORS["rag"](num_requests=1500)
    one = replay(tr, ReplayConfig((300 * 512,)))
    two = replay(tr, ReplayConfig((300 * 512, 3000 * 512)))
    assert two.hits > one.hits
    assert two.hit_blocks["disk"] > 0
    lb = two.config.logical_block_bytes
    assert two.bytes_read["disk"] == two.hit_blocks["disk"] * lb
    assert two.bytes_written["disk"] == two.stats["disk.stored_blocks"] * lb > 0
    assert two.hits <= infinite_hits(tr)


def test_block_bytes_are_a_function_of_the_key():
    a, b = block_bytes_of(block_key(5), 4096), block_bytes_of(block_key(6), 4096)
    assert (a == block_bytes_of(block_key(5), 4096)).all() and not (a == b).all()
    assert block_key(2**130) == block_key(2**130)


def test_bytes_replay_host_only_verifies_every_hit():
    tr = GENERATORS["system-prompts"](num_requests=300)
    cfg = ReplayConfig((200 * 512,), mode="bytes", stored_block_bytes=4096)
    res = replay(tr, cfg)
    assert res.hits > 0 and res.verified_blocks == res.hits and res.bad_blocks == 0
    assert res.hits == replay(tr, ReplayConfig((200 * 512,))).hits


def test_bytes_replay_through_host_and_disk_verifies_every_hit(tmp_path):
    pytest.importorskip("lmdb")
    tr = GENERATORS["rag"](num_requests=600)
    cfg = ReplayConfig((100 * 512, 800 * 512), mode="bytes", stored_block_bytes=4096, disk_path=str(tmp_path))
    res = replay(tr, cfg)
    assert res.hit_blocks["disk"] > 0
    assert res.verified_blocks == res.hits and res.bad_blocks == 0
    meta = replay(tr, ReplayConfig((100 * 512, 800 * 512)))
    assert res.hits == meta.hits


def test_report_and_prefill_estimate():
    tr = GENERATORS["rag"](num_requests=400)
    res = replay(tr, ReplayConfig((100 * 512, 400 * 512), kv_bytes_per_token=1024))
    refs = bounds(tr, 100)
    pf = prefill_saved(res, 0.1, {"host": 10.0, "disk": 1.0})
    host = pf["host"]
    assert host["compute_s"] == pytest.approx(res.hit_blocks["host"] * 512 * 0.1 / 1000)
    assert host["load_s"] == pytest.approx(res.hit_blocks["host"] * 512 * 1024 / 10e9)
    assert pf["prefill_without_cache_s"] == pytest.approx(tr.num_blocks * 512 * 0.1 / 1000)
    disk = pf["disk"]
    assert host["loaded_blocks"] == host["hit_blocks"] and disk["loaded_blocks"] == disk["hit_blocks"]
    assert disk["worth_loading"] and disk["net_s"] > 0                  # both beat 51 ms of compute
    assert pf["total_net_s"] == pytest.approx(host["net_s"] + disk["net_s"])
    slow = prefill_saved(res, 0.1, {"host": 10.0, "disk": 1e-6})       # a disk slower than recompute
    assert not slow["disk"]["worth_loading"] and slow["disk"]["loaded_blocks"] == 0
    assert slow["total_net_s"] == pytest.approx(slow["host"]["net_s"]) and slow["total_net_s"] <= host["net_s"]
    s = summarize(res, refs, pf)
    assert s["bounds"]["belady"] >= s["bounds"]["lru"] and s["fraction_of_infinite"] <= 1.0
    text = format_text(s)
    assert "disk" in text and "infinite" in text and "prefill saved" in text
    json.dumps(s)


def test_cli_replay_writes_json(tmp_path, capsys):
    from kvtier.cli import main
    tr = GENERATORS["scan"](num_requests=200)
    p = tmp_path / "scan.jsonl"
    write_trace(tr, p)
    out = tmp_path / "out.jsonl"
    rc = main(["replay", str(p), "--host-tokens", "64k", "--host-gbps", "10", "--json", str(out),
               "--no-progress"])
    assert rc == 0
    s = json.loads(out.read_text())
    assert s["requests"] == 200 and s["capacities_tokens"] == {"host": 64000}
    assert "hit ratio" in capsys.readouterr().out
    assert main(["replay", str(p), "--host-tokens", "lots"]) == 2


# ---- the Mooncake conversation trace -----------------------------------------------------------
mooncake = pytest.mark.skipif(not os.path.exists(MOONCAKE), reason="Mooncake trace not present")


@mooncake
def test_reproduces_the_published_reference_figures():
    tr = load_trace(MOONCAKE)
    n = tr.num_blocks
    assert round(infinite_hits(tr) / n, 4) == 0.3819
    assert round(simulate(tr, "lru", 3_000_000 // 512) / n, 4) == 0.1467
    assert round(belady_hits(tr, 3_000_000 // 512) / n, 4) == 0.3682


@mooncake
@pytest.mark.slow
def test_mooncake_goals():
    tr = load_trace(MOONCAKE)
    n = tr.num_blocks
    inf = infinite_hits(tr) / n
    lru = replay(tr, ReplayConfig((3_000_000,), policy="lru")).hit_ratio
    best = replay(tr, ReplayConfig((3_000_000,))).hit_ratio            # the default policy
    assert best > lru + 0.04
    stack = replay(tr, ReplayConfig((3_000_000, 20_000_000)))
    assert stack.hit_ratio >= 0.95 * inf
