"""algorithm.outer_delay=1: each phase's average is applied one phase late, overlapping the next phase."""

from __future__ import annotations

import pytest
import torch
from helpers import build_test_group, final_params, max_rel_diff, tiny_config

from locoswarm.comm.sim import SimAverager
from locoswarm.compression import codec_factory
from locoswarm.config import CompressionConfig, OuterOptimizerConfig, validate
from locoswarm.netsim import NetworkModel
from locoswarm.outer import OuterOptimizer
from locoswarm.strategies import DiLoCo, EagerDiLoCo
from locoswarm.trainer import train


def test_delayed_outer_step_matches_a_hand_computed_schedule():
    """H=3, 9 steps: phase 1's average is applied after phase 2, phase 2's and 3's at the end."""
    cfg = tiny_config(workers=2, backend__execution="sequential")
    outer_cfg = OuterOptimizerConfig(name="nesterov", lr=0.7, momentum=0.5)
    group, _ = build_test_group(cfg)
    anchor = [p.detach().clone() for p in group.params(0)]
    averager = SimAverager(codec_factory(CompressionConfig(), 0), NetworkModel(cfg.network, 2))
    strategy = DiLoCo(group, averager, anchor, OuterOptimizer(anchor, outer_cfg), 3, outer_delay=1)
    applied = []
    while group.step < 9:
        applied.append(len(strategy.round(9 - group.step).comms))
    assert applied == [0, 1, 2]

    ref, _ = build_test_group(cfg)
    a = [p.detach().clone() for p in ref.params(0)]
    outer = OuterOptimizer(a, outer_cfg)

    def phase():
        ref.inner_steps(3)
        pg = [x.mean(0) for x in ref.pseudo_gradients(a)]
        ref.load_params(a)  # the next phase starts from the anchor as it is
        return pg

    first = phase()  # from A0; nothing applied
    second = phase()  # from A0 again
    outer.step(first)  # A1, one phase late
    ref.load_params(a)
    third = phase()  # from A1
    outer.step(second)
    outer.step(third)  # the end: both outstanding averages
    ref.load_params(a)
    for x, y in zip(anchor, a, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    for w, rw in zip(group.workers, ref.workers, strict=True):
        for p, r in zip(w.params, rw.params, strict=True):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-7)


def test_delay_hides_the_exchange_behind_the_next_phase(tmp_path):
    """sim_seconds: R (C + c) without the delay; R C + c with it (each exchange is shorter than a phase)."""
    common = dict(workers=4, train__max_steps=12, algorithm__inner_steps=3, network__step_seconds=0.01,
                  network__bandwidth_mbps=100.0, network__latency_ms=1.0)  # fmt: skip
    blocking = train(tiny_config(**common), tmp_path / "blocking")
    delayed = train(tiny_config(algorithm__outer_delay=1, **common), tmp_path / "delayed")
    assert blocking["status"] == delayed["status"] == "ok"
    assert blocking["tokens"] == delayed["tokens"] and blocking["bytes_sent_total"] == delayed["bytes_sent_total"]
    rounds, compute = 4, 0.03
    c = (blocking["sim_seconds"] - rounds * compute) / rounds
    assert 0 < c < compute
    assert delayed["sim_seconds"] == pytest.approx(rounds * compute + c)
    assert delayed["compute_utilisation"] > blocking["compute_utilisation"]
    assert delayed["final_val_loss"] != blocking["final_val_loss"]  # the algorithm changed, not only the price


def test_resume_with_an_average_pending(tmp_path):
    cfg = dict(workers=2, algorithm__outer_delay=1, train__max_steps=12, train__checkpoint_every=1,
               network__step_seconds=0.01)  # fmt: skip
    full = train(tiny_config(**cfg), tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(**cfg), tmp_path / "cut", stop_after_step=6)
    resumed = train(tiny_config(resume=True, **cfg), tmp_path / "cut")
    for key in ("final_val_loss", "tokens", "sim_seconds", "bytes_sent_total", "outer_steps"):
        assert resumed[key] == full[key], key


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(algorithm__outer_delay=2), "algorithm.outer_delay"),
        (dict(algorithm__name="ddp", algorithm__outer_delay=1), "algorithm.outer_delay"),
    ],
)
def test_bad_outer_delay_is_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        validate(tiny_config(**overrides))


def test_eager_with_one_worker_is_diloco(tmp_path):
    """g(t) = Δ(t) + (Δ̄(t-1) − Δ(t-1)) = Δ(t) when the group is one worker: eager K=1 is DiLoCo K=1, warm-up and
    Nesterov included. (With a lossy codec it is not: the own part is applied raw at once and its compression
    error one phase later, where DiLoCo applies the decoded part at once.)"""
    common = dict(workers=1, train__max_steps=14, train__checkpoint_every=1, algorithm__inner_steps=4,
                  algorithm__warmup_sync_steps=2, network__step_seconds=0.01)  # fmt: skip
    diloco = train(tiny_config(**common), tmp_path / "diloco")
    eager = train(tiny_config(algorithm__outer_delay=1, algorithm__eager=True, **common), tmp_path / "eager")
    assert diloco["status"] == eager["status"] == "ok"
    for key in ("final_val_loss", "tokens", "outer_steps", "bytes_sent_total"):
        assert eager[key] == pytest.approx(diloco[key], rel=1e-6), key
    a, b = final_params(tmp_path / "diloco"), final_params(tmp_path / "eager")
    assert max_rel_diff(b, a) <= 1e-6


def test_eager_applies_own_part_now_and_the_others_one_phase_late():
    """Two workers, H=3, 9 steps, outer SGD lr 1 (so anchors add updates): by hand from the same workers."""
    cfg = tiny_config(workers=2, backend__execution="sequential")
    sgd = OuterOptimizerConfig(name="sgd", lr=1.0, momentum=0.0)
    group, _ = build_test_group(cfg)
    anchor = [p.detach().clone() for p in group.params(0)]
    averager = SimAverager(codec_factory(CompressionConfig(), 0), NetworkModel(cfg.network, 2))
    strategy = EagerDiLoCo(group, averager, anchor, sgd, 3)
    while group.step < 9:
        strategy.round(9 - group.step)

    ref, _ = build_test_group(cfg)
    anchors = [[p.detach().clone() for p in ref.params(0)] for _ in range(2)]  # one per worker

    def phase():
        ref.inner_steps(3)
        return [[a - p for a, p in zip(anchors[j], w.params, strict=True)] for j, w in enumerate(ref.workers)]

    def apply(updates):
        for j, w in enumerate(ref.workers):
            for a, u, p in zip(anchors[j], updates[j], w.params, strict=True):
                a.sub_(u)
                p.data.copy_(a)

    def mean(d):
        return [(x + y) / 2 for x, y in zip(d[0], d[1], strict=True)]

    d1 = phase()
    apply([[x / 2 for x in d1[j]] for j in range(2)])  # own half now
    d2 = phase()
    apply([[x / 2 + m - o / 2 for x, m, o in zip(d2[j], mean(d1), d1[j], strict=True)] for j in range(2)])
    d3 = phase()  # the last phase: its whole average, plus the others' part of phase 2
    apply([[m3 + m2 - o / 2 for m3, m2, o in zip(mean(d3), mean(d2), d2[j], strict=True)] for j in range(2)])
    for j in range(2):
        for a, r in zip([x[j] for x in strategy.anchors], anchors[j], strict=True):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    assert max((strategy.anchors[0][0] - strategy.anchors[0][1]).abs().max().item(), 0) > 0  # they differ
