"""Screening and robust aggregation (comm/aggregate.py), and simulated attackers against them on real runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from locoswarm.comm.adversary import Adversary
from locoswarm.comm.aggregate import CenteredClip, Median, TrimmedMean, WeightedMean, combine, exchange_path, screen
from locoswarm.comm.sim import SimAverager
from locoswarm.compression import codec_factory
from locoswarm.config import CompressionConfig, FaultsConfig, NetworkConfig, validate
from locoswarm.netsim import NetworkModel
from locoswarm.trainer import train


def rows_of(*values):
    return [[torch.tensor(v, dtype=torch.float32)] for v in values]


def test_aggregators_on_a_small_example():
    rows = rows_of([1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [100.0, -1000.0])
    shares = [0.25] * 4
    torch.testing.assert_close(WeightedMean()(rows, shares)[0], torch.tensor([26.5, -235.0]))
    torch.testing.assert_close(Median()(rows, shares)[0], torch.tensor([2.5, 15.0]))
    torch.testing.assert_close(TrimmedMean(0.25)(rows, shares)[0], torch.tensor([2.5, 15.0]))
    torch.testing.assert_close(TrimmedMean(0.0)(rows, shares)[0], torch.tensor([26.5, -235.0]))
    # an unbounded radius clips nothing: one step from the median lands on the mean
    torch.testing.assert_close(CenteredClip(tau=1e30, iterations=1)(rows, shares)[0], torch.tensor([26.5, -235.0]))
    # the automatic radius keeps the outlier's pull small
    cc = CenteredClip(iterations=5)(rows, shares)[0]
    assert (cc - torch.tensor([2.0, 20.0])).norm() < 20


def test_weighted_mean_is_the_rank_order_sum():
    rows = rows_of([1.0], [2.0], [4.0])
    out = WeightedMean()(rows, [0.5, 0.0, 0.5])
    assert out[0].item() == 2.5  # the zero share is skipped, not multiplied


def test_screening_drops_non_finite_and_oversized_rows():
    rows = rows_of([1.0, 1.0], [1.0, float("nan")], [1.1, 0.9], [0.9, 1.1], [50.0, 50.0])
    shares = [0.2] * 5
    assert screen(rows, shares) == {1: "non-finite values"}
    dropped = screen(rows, shares, max_norm_ratio=10.0)
    assert set(dropped) == {1, 4} and dropped[4].startswith("norm")
    result, dropped = combine(WeightedMean(), rows, shares, max_norm_ratio=10.0)
    torch.testing.assert_close(result[0], torch.tensor([1.0, 1.0]))  # the three kept rows, shares renormalised
    # every row dropped: no update
    result, dropped = combine(Median(), rows_of([float("inf")], [float("nan")]), [0.5, 0.5])
    assert result[0].item() == 0.0 and set(dropped) == {0, 1}


def test_exchange_paths():
    mean, median = WeightedMean(), Median()
    assert exchange_path(True, False, mean) == "allreduce"
    assert exchange_path(False, True, mean) == "reduce_scatter"
    assert exchange_path(False, False, mean) == "allgather"
    assert exchange_path(True, False, median) == "allgather"
    assert exchange_path(False, True, median) == "allgather"


@settings(max_examples=50, deadline=None)
@given(
    honest=st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=5, max_size=5),
    outlier=st.floats(-1e30, 1e30, allow_nan=False),
)
def test_one_outlier_cannot_move_median_or_trimmed_mean_out_of_the_honest_range(honest, outlier):
    rows = rows_of(*([h] for h in honest), [outlier])
    shares = [1 / 6] * 6
    lo, hi = min(honest), max(honest)
    for agg in (Median(), TrimmedMean(0.2)):
        v = agg(rows, shares)[0].item()
        assert lo - 1e-6 <= v <= hi + 1e-6, (agg, v)


def test_sim_averager_reports_the_rejected_rank():
    net = NetworkModel(NetworkConfig(), 14)
    x = torch.tensor([[1.0], [2.0], [float("nan")], [3.0]])
    ranks = [10, 11, 12, 13]
    for name, agg in (("topk", WeightedMean()), ("none", Median())):
        avg = SimAverager(codec_factory(CompressionConfig(name=name, ratio=1.0), 0), net, agg)
        r = avg.average([x], torch.ones(4), ranks=ranks)
        assert r.rejected == {12: "non-finite values"} and r.allgather
        assert r.tensors[0].item() == 2.0
    # summed on the wire: the sum is all anyone sees; the round is rejected whole, no NaN gets through
    r = SimAverager(codec_factory(CompressionConfig(), 0), net).average([x], torch.ones(4), ranks=ranks)
    assert r.tensors[0].item() == 0.0 and set(r.rejected) == set(ranks)
    # a quantiser refuses to encode NaN: that worker sends nothing this round, and says why
    y = torch.randn(4, 256)
    y[2, 0] = math.nan
    r = SimAverager(codec_factory(CompressionConfig(name="int8"), 0), net).average([y], torch.ones(4), ranks=ranks)
    assert set(r.rejected) == {12} and torch.isfinite(r.tensors[0]).all()


def test_adversary_rows():
    x = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    w = torch.ones(4)
    for attack, check in [
        ("nan", lambda row: torch.isnan(row).all()),
        ("scale", lambda row: torch.equal(row, x[3] * -100)),
        ("signflip", lambda row: torch.equal(row, -x[3])),
        ("random", lambda row: torch.isclose(row.norm(), x[3].norm()) and not torch.equal(row, x[3])),
    ]:
        adv = Adversary(FaultsConfig(byzantine=1, attack=attack), workers=4)
        out = adv.corrupt([x], w, [0, 1, 2, 3], round_=0)[0]
        assert check(out[3]), attack
        assert torch.equal(out[:3], x[:3]) and torch.equal(x, torch.arange(12.0).reshape(4, 3))  # input untouched
    adv = Adversary(FaultsConfig(byzantine=1, attack="alie"), workers=4)
    out = adv.corrupt([x], w, [0, 1, 2, 3], round_=0)[0]
    honest = x[:3]
    torch.testing.assert_close(out[3], honest.mean(0) - adv.alie_z() * honest.std(0, unbiased=False))
    late = Adversary(FaultsConfig(byzantine=1, attack="nan", start_round=2), workers=4)
    assert torch.equal(late.corrupt([x], w, [0, 1, 2, 3], round_=1)[0], x)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_nan_peer_is_excluded_and_logged_and_never_ends_ok_at_nan(tmp_path):
    common = dict(workers=4, train__max_steps=24)
    clean = train(tiny_config(**common), tmp_path / "clean")
    attacked = dict(faults__byzantine=1, faults__attack="nan", **common)
    median = train(tiny_config(aggregator__name="median", **attacked), tmp_path / "median")
    mean = train(tiny_config(**attacked), tmp_path / "mean")
    assert clean["status"] == median["status"] == mean["status"] == "ok"
    assert math.isfinite(median["final_val_loss"]) and math.isfinite(mean["final_val_loss"])
    # median: the NaN peer is excluded every round and training goes on near the clean run
    assert median["rejections"] == 8 and abs(median["final_val_loss"] - clean["final_val_loss"]) < 0.05
    rejected = [x for r in _rows(tmp_path / "median") for x in r.get("rejected", [])]
    assert {x["rank"] for x in rejected} == {3} and all(x["reason"] == "non-finite values" for x in rejected)
    # mean over an all-reduce cannot see who: every round is rejected whole, so nothing is learned, but no NaN
    assert mean["rejections"] == 32 and mean["final_val_loss"] > clean["final_val_loss"] + 0.2


def test_a_diverged_run_reports_failed(tmp_path):
    cfg = tiny_config(workers=4, train__max_steps=12, faults__byzantine=1, faults__attack="scale",
                      faults__scale=1e30)  # fmt: skip
    s = train(cfg, tmp_path)
    assert not math.isfinite(s["final_val_loss"]) and s["status"] == "failed" and "diverged" in s["error"]


def test_robust_aggregators_survive_a_scaled_peer(tmp_path):
    common = dict(workers=5, train__max_steps=24, faults__byzantine=1, faults__attack="scale")
    mean = train(tiny_config(**common), tmp_path / "mean")
    for name in ("median", "centered_clip"):
        s = train(tiny_config(aggregator__name=name, **common), tmp_path / name)
        assert s["final_val_loss"] < mean["final_val_loss"] - 1.0, name


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(aggregator__trim=0.5), "aggregator.trim"),
        (dict(aggregator__clip_tau=0.0), "aggregator.clip_tau"),
        (dict(aggregator__iterations=0), "aggregator.iterations"),
        (dict(aggregator__max_norm_ratio=0.5), "aggregator.max_norm_ratio"),
        (dict(faults__byzantine=4, faults__attack="nan"), "faults.byzantine"),
        (dict(faults__byzantine=1), "faults.attack"),
        (dict(faults__attack="nan"), "faults.attack"),
    ],
)
def test_bad_values_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        validate(tiny_config(**overrides))
