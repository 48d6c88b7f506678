"""Stragglers, churn and time-budgeted phases: deterministic schedules, hand-computed rounds, real runs."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import tiny_config

from locoswarm.checkpoint import load_checkpoint
from locoswarm.comm.sim import SimAverager
from locoswarm.compression import make_codec
from locoswarm.config import NetworkConfig, OuterOptimizerConfig, validate
from locoswarm.data import BatchSampler, build_token_data
from locoswarm.faults import FaultSchedule, PhasePlanner
from locoswarm.model import GPT, GPTShape
from locoswarm.netsim import NetworkModel
from locoswarm.outer import OuterOptimizer
from locoswarm.strategies import DiLoCo
from locoswarm.trainer import train
from locoswarm.worker import Worker, WorkerGroup


def schedule(seed=0, k=4, **net) -> FaultSchedule:
    return FaultSchedule(NetworkConfig(**net), k, seed)


def test_straggler_draws_are_deterministic_per_seed():
    cfg = NetworkConfig()
    cfg.stragglers.kind, cfg.stragglers.sigma = "lognormal", 0.5
    a = [[FaultSchedule(cfg, 4, 7).slowdown(w, r) for r in range(50)] for w in range(4)]
    b = [[FaultSchedule(cfg, 4, 7).slowdown(w, r) for r in reversed(range(50))][::-1] for w in range(4)]
    c = [[FaultSchedule(cfg, 4, 8).slowdown(w, r) for r in range(50)] for w in range(4)]
    assert a == b  # random access: order of questions does not matter
    assert a != c
    # log-slowdowns are N(0, sigma): over 4x500 draws the sample mean and std are close to 0 and 0.5
    logs = [math.log(FaultSchedule(cfg, 4, 7).slowdown(w, r)) for w in range(4) for r in range(500)]
    mean = sum(logs) / len(logs)
    std = math.sqrt(sum((x - mean) ** 2 for x in logs) / len(logs))
    assert abs(mean) < 0.05 and abs(std - 0.5) < 0.05
    # a fixed stragglers.seed replays the same draws whatever the run seed
    cfg.stragglers.seed = 3
    assert FaultSchedule(cfg, 4, 0).slowdown(2, 9) == FaultSchedule(cfg, 4, 1).slowdown(2, 9)


def test_fixed_straggler():
    cfg = NetworkConfig()
    cfg.stragglers.kind, cfg.stragglers.factor, cfg.stragglers.workers = "fixed", 3.0, [2]
    s = FaultSchedule(cfg, 4, 0)
    assert [s.slowdown(w, r) for w in range(4) for r in (0, 5)] == [1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 1.0, 1.0]


def test_churn_windows_and_random_dropouts():
    cfg = NetworkConfig()
    cfg.churn.absent = [[1, 2, 4], [3, 0, 1]]
    s = FaultSchedule(cfg, 4, 0)
    assert [[s.present(w, r) for w in range(4)] for r in range(5)] == [
        [True, True, True, False], [True, True, True, True], [True, False, True, True], [True, False, True, True],
        [True, True, True, True],
    ]  # fmt: skip
    cfg = NetworkConfig()
    cfg.churn.drop_prob, cfg.churn.rejoin_after = 0.1, 3
    s1, s2, s3 = FaultSchedule(cfg, 4, 5), FaultSchedule(cfg, 4, 5), FaultSchedule(cfg, 4, 6)
    grid = [[s1.present(w, r) for r in range(200)] for w in range(4)]
    assert grid == [[s2.present(w, r) for r in range(200)] for w in range(4)]
    assert grid != [[s3.present(w, r) for r in range(200)] for w in range(4)]
    # absent exactly for the rejoin_after rounds starting at each drop (rank 0 stays if everyone would leave)
    drops = [[r for r in range(200) if s1._drops_at(w, r)] for w in range(4)]
    assert all(drops), "with p=0.1 over 200 rounds every worker drops at least once"
    scheduled = [[not any(d <= r < d + 3 for d in drops[w]) for r in range(200)] for w in range(4)]
    for w in range(4):
        for r in range(200):
            keep_zero = w == 0 and not any(scheduled[x][r] for x in range(1, 4))
            assert grid[w][r] == (scheduled[w][r] or keep_zero)
    assert 0.6 < sum(map(sum, grid)) / 800 < 0.8  # ~ (1 - 0.1)^3 = 0.73 present


def test_everyone_absent_keeps_rank_zero():
    cfg = NetworkConfig()
    cfg.churn.absent = [[0, 0, 1], [1, 0, 1]]
    s = FaultSchedule(cfg, 2, 0)
    assert [s.present(0, 0), s.present(1, 0)] == [True, False]


def test_time_budget_counts_are_proportional_to_speed():
    cfg = NetworkConfig(step_seconds=0.1, compute_speed=[2.0, 1.0, 0.5, 0.25])
    planner = PhasePlanner(NetworkModel(cfg, 4), range(4), inner_steps=7, time_budget=2.0)
    assert planner.plan(remaining=1000).counts == [40, 20, 10, 5]
    assert planner.plan(remaining=12).counts == [12, 12, 10, 5]  # nobody runs past train.max_steps
    # a straggler at x4 this round fits a quarter of its steps
    cfg.stragglers.kind, cfg.stragglers.factor, cfg.stragglers.workers = "fixed", 4.0, [1]
    planner = PhasePlanner(NetworkModel(cfg, 4), range(4), inner_steps=7, time_budget=2.0)
    assert planner.plan(remaining=1000).counts == [40, 5, 10, 5]


def test_time_budget_from_measured_step_time():
    cfg = NetworkConfig(compute_speed=[1.0, 0.5])
    planner = PhasePlanner(NetworkModel(cfg, 2), range(2), inner_steps=5, time_budget=1.0)
    assert planner.plan(remaining=100).counts == [5, 5]  # nothing measured yet: a fixed-H calibration phase
    planner.observe([5, 5], [0.5, 0.5])  # 0.1 s per step on this machine
    assert planner.plan(remaining=100).counts == [10, 5]
    with pytest.raises(ValueError, match="algorithm.time_budget"):
        PhasePlanner(NetworkModel(NetworkConfig(step_seconds=2.0), 2), range(2), 5, time_budget=1.0).plan(100)


def _group(cfg, k):
    data = build_token_data(cfg.data, k, cfg.seed, cfg.model.seq_len)
    torch.manual_seed(0)
    m = cfg.model
    base = GPT(GPTShape(m.n_layer, m.n_head, m.d_model, m.seq_len, data.vocab_size))
    return WorkerGroup([
        Worker(r, copy.deepcopy(base), BatchSampler(data.train_shards[r], 4, m.seq_len, seed=r), cfg.inner_optimizer,
               cfg.train, torch.device("cpu"), seed=r)
        for r in range(k)
    ])  # fmt: skip


def test_time_budgeted_round_is_a_token_weighted_mean():
    """FedAvg outer step (sgd, lr 1, no momentum): the new anchor is the token-weighted mean of the workers."""
    cfg = tiny_config(workers=4)
    cfg.network.step_seconds, cfg.network.compute_speed = 0.1, [1.0, 0.5, 0.25, 1.0]
    cfg.network.stragglers.kind, cfg.network.stragglers.factor, cfg.network.stragglers.workers = "fixed", 2.0, [3]
    network = NetworkModel(cfg.network, 4)
    group = _group(cfg, 4)
    anchor = [p.detach().clone() for p in group.params(0)]
    fedavg = OuterOptimizerConfig(name="sgd", lr=1.0, momentum=0.0)
    planner = PhasePlanner(network, range(4), inner_steps=3, time_budget=0.4)
    averager = SimAverager(lambda key, i: make_codec(cfg.compression), network)
    strategy = DiLoCo(group, averager, anchor, OuterOptimizer(anchor, fedavg), inner_steps=3, planner=planner)

    ref = _group(cfg, 4)
    counts = [4, 2, 1, 2]  # 0.4 s / (0.1 s x slowdown / speed)
    ref.inner_steps(4, counts)
    tokens = [c * w.tokens_per_step for c, w in zip(counts, ref.workers, strict=True)]
    expected = [sum(t * w.params[i].detach() for t, w in zip(tokens, ref.workers, strict=True)) / sum(tokens)
                for i in range(len(anchor))]  # fmt: skip

    report = strategy.round(remaining=100)
    assert planner.last.counts == counts and report.steps == 4
    assert report.extras["worker_steps"] == counts and report.comm.total_weight == sum(tokens)
    for a, e in zip(anchor, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    assert [w.step for w in group.workers] == counts
    # pricing: the phase lasts as long as its slowest worker, all fit the 0.4 s budget
    cost = network.price_round(planner.last, report.compute_seconds, report.comm.payload_bytes)
    assert cost.compute_seconds == pytest.approx(0.4)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_under_churn_masks_rounds(tmp_path):
    cfg = tiny_config(workers=4, name="churn")
    cfg.network.churn.absent = [[1, 1, 3]]  # worker 1 misses rounds 1 and 2 of 4
    cfg.train.checkpoint_every = 1
    summary = train(validate(cfg), tmp_path)
    assert summary["status"] == "ok"
    sync = [r for r in _rows(tmp_path) if "group_size" in r]
    assert [r["group_size"] for r in sync] == [4, 3, 3, 4]
    # a masked round is an all-reduce among 3: 2(n-1)/n of the payload
    assert sync[1]["bytes_sent"] / sync[0]["bytes_sent"] == pytest.approx((2 * 2 / 3) / (2 * 3 / 4))
    steps = [w["step"] for w in load_checkpoint(tmp_path)["group"]["workers"]]
    assert steps == [12, 6, 12, 12]  # worker 1 trained rounds 0 and 3 only, rejoining from the anchor


def test_ddp_under_churn(tmp_path):
    cfg = tiny_config(workers=3, name="ddp-churn")
    cfg.algorithm.name = "ddp"
    cfg.train.max_steps = 6
    cfg.network.churn.absent = [[2, 0, 4]]
    summary = train(validate(cfg), tmp_path)
    assert summary["status"] == "ok"
    assert [r["group_size"] for r in _rows(tmp_path) if "group_size" in r] == [2, 2, 3]  # steps 2, 4, 6


def test_sim_seconds_and_utilisation_wiring_exact(tmp_path):
    """With network.step_seconds, sim_seconds is a formula of the config alone."""
    cfg = tiny_config(workers=4, name="priced")
    cfg.network.step_seconds, cfg.network.bandwidth_mbps, cfg.network.latency_ms = 0.01, 100.0, 1.0
    cfg.network.compute_speed = [1.0, 1.0, 1.0, 0.5]  # worker 3 sets the pace: 3 steps x 0.02 s
    s = train(validate(cfg), tmp_path)
    payload = s["bytes_sent_total"] / 4 / (2 * 3 / 4)  # 4 rounds of a ring all-reduce among 4
    comm = 2 * 3 / 4 * payload * 8 / 100e6 + 6 * 0.001
    assert s["sim_seconds"] == pytest.approx(4 * (0.06 + comm))
    busy = (3 * 0.03 + 0.06) / 4  # mean over workers; the fast ones wait for worker 3
    assert s["compute_utilisation"] == pytest.approx(busy / (0.06 + comm))
    # overlap (price only): each exchange hides behind the next phase; the last one has none to hide behind
    cfg.network.overlap = True
    s2 = train(validate(cfg), tmp_path / "overlap")
    assert comm < 0.06 and s2["sim_seconds"] == pytest.approx(4 * 0.06 + comm)


def test_time_budget_run(tmp_path):
    cfg = tiny_config(workers=2, name="budget")
    cfg.algorithm.time_budget = 0.05
    cfg.network.step_seconds, cfg.network.compute_speed = 0.01, [1.0, 0.5]
    s = train(validate(cfg), tmp_path)
    assert s["status"] == "ok"
    sync = [r for r in _rows(tmp_path) if "group_size" in r]
    assert [r.get("worker_steps") for r in sync] == [[5, 2], [5, 2], None]
    assert s["steps"] == 12


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("algorithm__time_budget", 0.0, "algorithm.time_budget"),
        ("network__worker_uplink_mbps", [10.0, 0.0], "network.worker_uplink_mbps"),
        ("network__step_seconds", -1.0, "network.step_seconds"),
    ],
)
def test_validation_names_the_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        validate(tiny_config(**{key: value}))


def test_validation_of_schedules():
    cfg = tiny_config(workers=2)
    cfg.network.churn.absent = [[2, 0, 1]]
    with pytest.raises(ValueError, match="network.churn.absent"):
        validate(cfg)
    cfg = tiny_config(workers=2)
    cfg.algorithm.name, cfg.algorithm.time_budget = "ddp", 1.0
    with pytest.raises(ValueError, match="algorithm=diloco"):
        validate(cfg)
