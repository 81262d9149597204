"""The load-or-recompute rule and its measurements, on a fake clock."""
from __future__ import annotations

import json
import threading

import pytest

from kvtier.errors import ConfigError
from kvtier.load_cost import DEFAULT_PRIORS, PrefillCost, TierPrior, class_label, size_class
from kvtier.load_plan import LoadPlanConfig, LoadPlanner, Plan

BT = 16                                   # tokens per block
BB = BT * (128 << 10)                     # 2 MiB a block: 128 KiB of KV per token
US = 1e-6


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def planner(prefill_us: float | None = 50.0, **kw) -> tuple[LoadPlanner, Clock]:
    clock = Clock()
    p = LoadPlanner(LoadPlanConfig(**kw), clock=clock)
    if prefill_us is not None:
        for _ in range(3):
            p.observe_prefill(1024, 1024 * prefill_us * US)
    return p, clock


def teach(p: LoadPlanner, tier: str, gbps: float, latency_s: float = 0.0, n: int = 8, nbytes: int = 4 * BB):
    for _ in range(n):
        p.observe(tier, nbytes, latency_s + nbytes / (gbps * 1e9))


def verify_rule(plan: Plan, margin: float = 1.2) -> None:
    """Whatever is loaded is expected to beat its recompute by the margin."""
    if plan.num_blocks and plan.recompute_s is not None:
        assert plan.load_s * margin < plan.recompute_s
    assert sum(t.blocks for t in plan.tiers.values()) == plan.num_blocks
    assert plan.load_s == pytest.approx(sum(t.load_s for t in plan.tiers.values()))


# ---- the rule ---------------------------------------------------------------------------------
def test_fast_tier_loads_everything():
    p, _ = planner()
    teach(p, "host", gbps=20)
    plan = p.plan(["host"] * 8, BB, BT)
    assert (plan.num_blocks, plan.reason, plan.wait) == (8, "load", False)
    assert plan.recompute_s == pytest.approx(8 * BT * 50 * US)
    assert plan.load_s == pytest.approx(8 * BB / 20e9)
    verify_rule(plan)


def test_slow_tier_recomputes():
    p, _ = planner()
    teach(p, "disk", gbps=0.5)              # 4 ms a block against 0.8 ms of compute
    plan = p.plan(["disk"] * 8, BB, BT)
    assert (plan.num_blocks, plan.reason) == (0, "recompute")
    assert plan.hit_load_s > plan.hit_recompute_s
    assert plan.tiers == {}


def test_mixed_loads_the_host_prefix_and_recomputes_the_slow_disk_tail():
    p, _ = planner()
    teach(p, "host", gbps=40)
    teach(p, "disk", gbps=1.5)              # 1.4 ms a block: slower than its 0.8 ms of compute,
    tiers = ["host"] * 12 + ["disk"] * 4    # but the fast head would carry it under a plain bound
    plan = p.plan(tiers, BB, BT)
    assert (plan.num_blocks, plan.reason) == (12, "partial")
    assert set(plan.tiers) == {"host"} and plan.tiers["host"].blocks == 12
    assert plan.hit_load_s * 1.2 < plan.hit_recompute_s      # all 16 would pass "load < compute / margin"
    verify_rule(plan)


def test_a_tier_whose_latency_only_pays_off_over_many_blocks():
    p, _ = planner()
    p2, _ = planner(priors={"remote": TierPrior(gbps=50.0, latency_s=3e-3)})
    assert p2.plan(["remote"], BB, BT).num_blocks == 0               # 3 ms for 0.8 ms of compute
    plan = p2.plan(["remote"] * 16, BB, BT)                           # 3.7 ms for 12.8 ms
    assert (plan.num_blocks, plan.reason) == (16, "load")
    # a slow block in the middle is worth loading when the blocks behind it pay for it
    assert p.plan(["host", "remote"] + ["host"] * 30, BB, BT).num_blocks == 32     # remote: 3.1 ms
    assert p.plan(["host", "remote"] + ["host"] * 2, BB, BT).num_blocks == 1       # for 0.8 ms


def test_margin_turns_a_near_tie_into_recompute():
    plans = {}
    for margin in (1.0, 1.5):
        p, _ = planner(margin=margin)
        teach(p, "disk", gbps=BB / (0.7e-3) / 1e9)                     # 0.7 ms a block, 0.8 ms compute
        plans[margin] = p.plan(["disk"] * 4, BB, BT)
    assert plans[1.0].num_blocks == 4 and plans[1.5].num_blocks == 0


def test_a_miss_and_an_empty_hit():
    p, _ = planner()
    plan = p.plan([], BB, BT)
    assert (plan.num_blocks, plan.num_hit_blocks, plan.reason) == (0, 0, "miss")
    assert p.stats()["plans.miss"] == 1


# ---- priors -----------------------------------------------------------------------------------
def test_before_any_measurement_every_hit_loads():
    p, _ = planner(prefill_us=None)
    plan = p.plan(["host"] * 4 + ["disk"] * 4 + ["remote"] * 4, BB, BT)
    assert (plan.num_blocks, plan.reason) == (12, "load")
    assert plan.recompute_s is None and plan.prefill_s_per_token is None
    s = p.stats()
    assert "prefill.s_per_token" not in s and s["host.load_measured"] == 0
    assert s["host.load_gbps"] == DEFAULT_PRIORS["host"].gbps


@pytest.mark.parametrize("kv_per_token", [32 << 10, 128 << 10, 320 << 10])
@pytest.mark.parametrize("block_tokens", [16, 256])
def test_host_prior_loads_a_single_block_against_any_realistic_prefill(kv_per_token, block_tokens):
    """1B, 8B, 70B-class KV sizes; prefill at 15 us/token per 128 KiB of KV (above any H100 rate)."""
    p, _ = planner(prefill_us=15 * max(kv_per_token / (128 << 10), 1) + 5)
    bb = kv_per_token * block_tokens
    assert p.plan(["host"], bb, block_tokens).num_blocks == 1
    assert p.model("host").measured is False


def test_configured_priors_stand_in_until_measured():
    p, _ = planner(priors={"disk": TierPrior(gbps=0.1, latency_s=0.0)})
    assert p.plan(["disk"] * 4, BB, BT).num_blocks == 0
    teach(p, "disk", gbps=10)
    assert p.plan(["disk"] * 4, BB, BT).num_blocks == 4
    p2, _ = planner(prefill_us=None, prefill_s_per_token=1e-9)        # a compute prior
    assert p2.plan(["host"] * 4, BB, BT).reason == "recompute"


def test_a_stale_measurement_gives_way_to_the_prior_and_is_then_replaced():
    p, clock = planner(stale_s=30.0, prefill_us=200.0)                  # 3.2 ms of compute a block
    teach(p, "disk", gbps=0.2)                                          # 10.5 ms a block
    assert p.plan(["disk"] * 4, BB, BT).num_blocks == 0
    clock.t += 31
    assert p.plan(["disk"] * 4, BB, BT).num_blocks == 4               # tried again on the prior
    p.begin("disk", 4 * BB)                                            # ... and while that load runs,
    assert p.plan(["disk"] * 4, BB, BT).num_blocks == 0               # others use what was measured
    p.end("disk", 4 * BB, seconds=4 * BB / 5e9)                        # it came back fast:
    assert p.stats()["disk.load_observations"] == 1                   # the old window is gone
    assert p.plan(["disk"] * 4, BB, BT).num_blocks == 4


# ---- robustness -------------------------------------------------------------------------------
def test_one_stalled_load_is_an_outlier_not_a_new_estimate():
    p, _ = planner()
    teach(p, "disk", gbps=5, n=10)
    p.observe("disk", 4 * BB, 2.0)                                     # one load stalls for 2 s
    assert p.plan(["disk"] * 4, BB, BT).num_blocks == 4
    assert p.stats()["disk.load_gbps"] == pytest.approx(5, rel=1e-6)
    for _ in range(11):                                               # a tier that really slowed down
        p.observe("disk", 4 * BB, 2.0)
    assert p.plan(["disk"] * 4, BB, BT).num_blocks == 0


def test_prefill_estimate_resists_outliers_and_ignores_decode_steps():
    c = PrefillCost(alpha=0.2, min_tokens=16)
    for s in (1e-3, 1e-3, 1.0):                                        # seeded by the median
        assert c.observe(1000, s)
    assert c.s_per_token == pytest.approx(1e-6)
    c.observe(1000, 1000.0)                                            # a 1000x stall: clipped to 4x
    assert c.s_per_token == pytest.approx(1e-6 * (1 + 0.2 * 3))
    assert not c.observe(4, 1.0) and not c.observe(1000, 0.0) and not c.observe(1000, float("inf"))
    assert c.observations == 4


def test_failed_and_untimed_loads_are_not_measurements():
    p, _ = planner()
    p.begin("disk", BB)
    p.end("disk", BB, seconds=0.001, ok=False)
    p.begin("disk", BB)
    p.end("disk", BB)
    p.observe("disk", 0, 1.0)
    p.observe("disk", BB, -1.0)
    s = p.stats()
    assert s["disk.load_failures"] == 1 and s["disk.load_observations"] == 0
    assert s["disk.inflight_bytes"] == 0 and s["disk.inflight_ops"] == 0
    p.end("disk", BB)                                                  # an unmatched end never goes negative
    assert p.stats()["disk.inflight_bytes"] == 0


def test_size_classes_separate_small_and_large_loads():
    assert [size_class(n) for n in (0, 1, 255 << 10, 256 << 10, (1 << 20) - 1, 1 << 20, 1 << 50)] == \
        [0, 0, 0, 1, 1, 2, 9]
    assert [class_label(c) for c in (0, 1, 2, 3)] == ["0B", "256KiB", "1MiB", "4MiB"]
    p, _ = planner()
    for _ in range(5):
        p.observe("remote", 64 << 10, 1e-3)                            # small loads: latency-bound
        p.observe("remote", 64 << 20, 64e-3)                           # large ones: ~1 GB/s
    m = p.model("remote")
    assert m.seconds(64 << 10) == pytest.approx(1e-3)
    assert m.seconds(32 << 20) == pytest.approx(32e-3, rel=0.1)        # the line: class without data
    assert set(m.class_gbps()) == {"0B", "64MiB"}


# ---- back-pressure ----------------------------------------------------------------------------
def test_a_full_queue_makes_a_request_wait_a_bounded_time_then_recompute():
    limit = 8 * BB
    p, clock = planner(inflight_bytes={"disk": limit}, max_wait_s=0.5)
    teach(p, "disk", gbps=20)
    p.begin("disk", limit)                                             # the queue is full
    plan = p.plan(["disk"] * 4, BB, BT)
    assert plan.wait and plan.reason == "wait" and plan.load_now == 0 and plan.num_blocks == 4
    assert plan.deadline == pytest.approx(clock.t + 0.5)
    assert 0 < plan.retry_after_s <= 0.5
    clock.t += 0.2                                                     # still full: keeps its deadline
    again = p.plan(["disk"] * 4, BB, BT, deadline=plan.deadline)
    assert again.wait and again.deadline == plan.deadline
    clock.t = plan.deadline                                            # past it: never waits again
    late = p.plan(["disk"] * 4, BB, BT, deadline=plan.deadline)
    assert (late.wait, late.num_blocks, late.reason) == (False, 0, "back_pressure")
    p.end("disk", limit, seconds=limit / 20e9)                          # the queue drained
    done = p.plan(["disk"] * 4, BB, BT, deadline=plan.deadline)
    assert (done.wait, done.num_blocks, done.reason) == (False, 4, "load")


def test_a_full_queue_loads_what_fits_when_waiting_would_take_too_long():
    p, _ = planner(inflight_bytes={"disk": 4 * BB}, max_wait_s=0.03, prefill_us=None)
    teach(p, "host", gbps=40)
    teach(p, "disk", gbps=0.1)                                          # room for 2 blocks: 42 ms
    p.begin("disk", 4 * BB)
    plan = p.plan(["host"] * 6 + ["disk"] * 2, BB, BT)                  # compute unknown: all would load
    assert (plan.wait, plan.num_blocks, plan.reason) == (False, 6, "back_pressure")
    assert set(plan.tiers) == {"host"}
    p2, _ = planner(inflight_bytes={"disk": 4 * BB}, max_wait_s=0.05, prefill_us=None)
    teach(p2, "disk", gbps=0.1)
    p2.begin("disk", 4 * BB)
    plan = p2.plan(["host"] * 6 + ["disk"] * 2, BB, BT)                 # 42 ms is within 50 ms
    assert plan.wait and plan.retry_after_s == pytest.approx(2 * BB / 0.1e9)


def test_queued_bytes_count_against_a_load_even_under_the_bound():
    p, _ = planner(inflight_bytes={"disk": 1 << 40})
    teach(p, "disk", gbps=4)                                            # 0.5 ms a block: loads
    assert p.plan(["disk"] * 4, BB, BT).num_blocks == 4
    p.begin("disk", 64 * BB)                                            # 32 ms queued ahead of it
    plan = p.plan(["disk"] * 4, BB, BT)
    assert plan.num_blocks == 0 and plan.hit_load_s > 0.03


def test_an_idle_tier_admits_one_load_larger_than_its_bound():
    p, _ = planner(inflight_bytes={"host": BB})
    assert p.plan(["host"] * 8, BB, BT).num_blocks == 8
    p.begin("host", 8 * BB)
    assert p.plan(["host"] * 8, BB, BT, deadline=0.0).reason == "back_pressure"


# ---- threads, stats, config -------------------------------------------------------------------
def test_concurrent_observations_and_plans_keep_consistent_counts():
    p = LoadPlanner()
    errors = []

    def transfers():
        try:
            for i in range(500):
                p.begin("disk", BB)
                p.end("disk", BB, seconds=1e-3 + (i % 7) * 1e-5)
                p.observe_prefill(256, 256 * 40e-6)
        except Exception as e:                                          # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=transfers) for _ in range(4)]
    for t in threads:
        t.start()
    plans = [p.plan(["host", "disk", "disk"], BB, BT) for _ in range(300)]
    for t in threads:
        t.join()
    assert not errors and all(0 <= x.num_blocks <= 3 for x in plans)
    s = p.stats()
    assert s["disk.inflight_bytes"] == 0 and s["disk.inflight_ops"] == 0
    assert s["plans"] == 300 and s["prefill.observations"] == 2000
    assert s["disk.load_observations"] == 64                            # the window


def test_stats_names_and_plan_as_dict_are_metrics_ready():
    p, _ = planner()
    teach(p, "host", gbps=20)
    plan = p.plan(["host"] * 3, BB, BT)
    json.dumps(plan.as_dict())
    assert plan.as_dict()["tiers"]["host"]["blocks"] == 3
    s = p.stats()
    for key in ("plans", "plans.load", "blocks.hit", "blocks.load", "prefill.s_per_token",
                "prefill.observations", "host.load_gbps", "host.load_latency_s", "host.load_measured",
                "host.load_gbps.4MiB", "host.load_observations", "host.load_failures",
                "host.inflight_bytes", "host.inflight_ops", "host.inflight_limit_bytes"):
        assert isinstance(s[key], (int, float)), key
    assert s["host.inflight_limit_bytes"] == 2 << 30


@pytest.mark.parametrize("kw, key", [
    ({"margin": 0.9}, "margin"),
    ({"margin": "1.2"}, "margin"),
    ({"max_wait_s": -1}, "max_wait_s"),
    ({"max_wait_s": float("inf")}, "max_wait_s"),
    ({"inflight_bytes": {"disk": 0}}, "inflight_bytes.disk"),
    ({"inflight_bytes": [1]}, "inflight_bytes"),
    ({"default_inflight_bytes": True}, "default_inflight_bytes"),
    ({"priors": {"disk": TierPrior(0.0, 0.0)}}, "priors.disk.gbps"),
    ({"priors": {"disk": TierPrior(1.0, -1.0)}}, "priors.disk.latency_s"),
    ({"priors": {"disk": (1.0, 0.0)}}, "priors.disk"),
    ({"prefill_s_per_token": 0}, "prefill_s_per_token"),
    ({"prefill_alpha": 1.5}, "prefill_alpha"),
    ({"prefill_min_tokens": 0}, "prefill_min_tokens"),
    ({"window": 2.5}, "window"),
    ({"stale_s": 0}, "stale_s"),
])
def test_bad_config_names_the_key(kw, key):
    with pytest.raises(ConfigError) as e:
        LoadPlanConfig(**kw)
    assert e.value.key == key


def test_config_from_plain_values():
    cfg = LoadPlanConfig.from_dict({"margin": 1.5, "inflight_bytes": {"disk": "1GiB"},
                                    "priors": {"remote": {"gbps": 3, "latency_s": 0.002}}})
    assert cfg.inflight_limit("disk") == 1 << 30 and cfg.inflight_limit("host") == 2 << 30
    assert cfg.inflight_limit("nvme2") == 256 << 20
    assert cfg.prior("remote") == TierPrior(3, 0.002) and cfg.prior("host") == DEFAULT_PRIORS["host"]
    for bad, key in (({"margn": 1.5}, "margn"), ({"priors": {"disk": {"gbps": 1}}}, "priors.disk"),
                     ({"inflight_bytes": {"disk": "lots"}}, "inflight_bytes.disk")):
        with pytest.raises(ConfigError) as e:
            LoadPlanConfig.from_dict(bad)
        assert e.value.key == key
    with pytest.raises(ConfigError, match="block_bytes"):
        LoadPlanner().plan(["host"], 0, BT)
    with pytest.raises(ConfigError, match="load_plan"):
        LoadPlanner({"margin": 1.2})
