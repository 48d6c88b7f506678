"""NoLoCo: pinned to DiLoCo (one group of every worker), to a hand-computed gossip step, and to itself (seeded
groups, exact resume); its keys validated."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build_test_group, final_params, max_rel_diff, tiny_config

from locoswarm.checkpoint import load_checkpoint
from locoswarm.comm.sim import SimAverager
from locoswarm.compression import codec_factory
from locoswarm.config import CompressionConfig, OuterOptimizerConfig, validate
from locoswarm.faults import PhasePlanner
from locoswarm.netsim import NetworkModel
from locoswarm.strategies.noloco import NoLoCo, gossip_groups
from locoswarm.trainer import train

SAME = ("final_val_loss", "tokens", "outer_steps")


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _cfg(**kw):
    common = dict(workers=4, train__max_steps=14, train__checkpoint_every=1, algorithm__inner_steps=4,
                  algorithm__warmup_sync_steps=2, network__step_seconds=0.01)  # fmt: skip
    return tiny_config(**{**common, **kw})


@pytest.mark.parametrize("execution", ["sequential", "batched"])
def test_one_group_of_every_worker_is_diloco(tmp_path, execution):
    """group_size = K: one group, identical replicas, the consensus pull is zero to rounding; the rest is DiLoCo's
    step (warm-up and outer Nesterov included). It sends the replicas too, so only its bytes (twice) and the modelled time they take differ."""
    diloco = train(_cfg(algorithm__name="diloco", backend__execution=execution), tmp_path / "diloco")
    noloco = train(_cfg(algorithm__name="noloco", algorithm__group_size=4, backend__execution=execution),
                   tmp_path / "noloco")  # fmt: skip
    assert diloco["status"] == noloco["status"] == "ok"
    for key in SAME:
        assert noloco[key] == pytest.approx(diloco[key], rel=1e-6), key
    ref, got = _rows(tmp_path / "diloco"), _rows(tmp_path / "noloco")
    warm = sum(r["bytes_sent"] for r in ref if r["step"] <= 2)  # the warm-up steps average gradients alike
    assert warm > 0
    assert noloco["bytes_sent_total"] - warm == pytest.approx(2 * (diloco["bytes_sent_total"] - warm), rel=1e-9)
    for w in range(4) if execution == "sequential" else ():  # (a batched group checkpoints stacked params)
        assert max_rel_diff(final_params(tmp_path / "noloco", w), final_params(tmp_path / "diloco", w)) <= 1e-6
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-6)
    spreads = [r["replica_spread"] for r in got if "replica_spread" in r]
    assert len(spreads) == 3 and max(spreads) <= 1e-6  # phases end at 6, 10, 14


def test_pairs_are_not_diloco_and_stay_close(tmp_path):
    """The identity above can see a difference: pairs give other numbers; the replicas differ, and the consensus
    pull keeps them closer than pairs that only share pseudo-gradients (same seed, same groups)."""
    train(_cfg(algorithm__name="diloco"), tmp_path / "diloco")
    pairs = train(_cfg(algorithm__name="noloco"), tmp_path / "pairs")
    loose = train(_cfg(algorithm__name="noloco", algorithm__consensus=0.0), tmp_path / "loose")
    assert pairs["status"] == loose["status"] == "ok"
    assert max_rel_diff(final_params(tmp_path / "pairs"), final_params(tmp_path / "diloco")) > 1e-4
    spread = [r["replica_spread"] for r in _rows(tmp_path / "pairs") if "replica_spread" in r]
    loose_spread = [r["replica_spread"] for r in _rows(tmp_path / "loose") if "replica_spread" in r]
    assert min(spread) > 1e-4
    assert spread[-1] < loose_spread[-1]
    groups = [r["gossip_groups"] for r in _rows(tmp_path / "pairs") if "gossip_groups" in r]
    assert all(sorted(r for g in gs for r in g) == [0, 1, 2, 3] and [len(g) for g in gs] == [2, 2] for gs in groups)


def test_groups_are_seeded_and_change_every_phase():
    a = [gossip_groups(list(range(8)), 2, 7, phase) for phase in range(6)]
    assert a == [gossip_groups(list(range(8)), 2, 7, phase) for phase in range(6)]  # every peer draws the same
    assert len({json.dumps(g) for g in a}) > 1
    assert a != [gossip_groups(list(range(8)), 2, 8, phase) for phase in range(6)]
    assert [len(g) for g in gossip_groups(list(range(5)), 2, 0, 0)] == [2, 2, 1]


def test_gossip_steps_match_a_hand_computed_sequence():
    """K=4 in pairs, outer SGD (lr 0.7, momentum 0.5), c = 0.6, two phases of H=3, computed by hand from the same
    workers: phi_m <- OuterSGD(phi_m, mean_G(delta) + c (phi_m - mean_G(phi))), equal tokens so plain means."""
    cfg = tiny_config(workers=4, backend__execution="sequential")
    outer_cfg = OuterOptimizerConfig(name="sgd", lr=0.7, momentum=0.5)
    group = build_test_group(cfg)[0]
    averager = SimAverager(codec_factory(CompressionConfig(), 0), NetworkModel(cfg.network, 4))
    anchor = [p.detach().clone() for p in group.params(0)]
    strategy = NoLoCo(group, averager, anchor, outer_cfg, inner_steps=3, group_size=2, consensus=0.6, seed=11)
    while group.step < 6:
        strategy.round(6 - group.step)

    ref = build_test_group(cfg)[0]
    phi = [[p.detach().clone() for p in ref.params(j)] for j in range(4)]  # phi[worker][tensor]
    buf = [[torch.zeros_like(p) for p in phi[0]] for _ in range(4)]
    for phase in range(2):
        ref.inner_steps(3)
        delta = [[a - p for a, p in zip(phi[j], ref.params(j), strict=True)] for j in range(4)]
        new = []
        for j in range(4):
            (members,) = [g for g in gossip_groups([0, 1, 2, 3], 2, 11, phase) if j in g]
            g = [sum(delta[m][i] for m in members) / len(members)
                 + 0.6 * (phi[j][i] - sum(phi[m][i] for m in members) / len(members)) for i in range(len(phi[j]))]  # fmt: skip
            buf[j] = [0.5 * b + gi for b, gi in zip(buf[j], g, strict=True)]
            new.append([p - 0.7 * b for p, b in zip(phi[j], buf[j], strict=True)])
        phi = new
        ref.load_params_each([torch.stack([phi[j][i] for j in range(4)]) for i in range(len(phi[0]))])
    assert (
        max(float((phi[0][i] - phi[1][i]).detach().abs().max()) for i in range(len(phi[0]))) > 1e-5
    )  # replicas differ
    for j in range(4):
        for got, want in zip(group.params(j), phi[j], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("partner_absent", [False, True])
def test_a_diverged_member_gets_its_group_a_zero_update_not_a_zero_mean(partner_absent):
    """Worker 1's params turn NaN before a phase: its group's round (summed on the wire) is rejected whole, and that
    group's replicas stay where they were (outer SGD without momentum), finite; the other group steps. Also when
    its partner sat the phase out (churn), so that worker 1 is the round's only member."""
    (bad,) = [g for g in gossip_groups([0, 1, 2, 3], 2, 3, 0) if 1 in g]
    partner = next(r for r in bad if r != 1)
    cfg = tiny_config(workers=4, backend__execution="sequential",
                      network__churn__absent=[[partner, 0, 1]] if partner_absent else [])  # fmt: skip
    group = build_test_group(cfg)[0]
    network = NetworkModel(cfg.network, 4)
    averager = SimAverager(codec_factory(CompressionConfig(), 0), network)
    anchor = [p.detach().clone() for p in group.params(0)]
    strategy = NoLoCo(group, averager, anchor, OuterOptimizerConfig(name="sgd", lr=0.7, momentum=0.0), inner_steps=2,
                      group_size=2, seed=3, planner=PhasePlanner(network, group.ranks, 2))  # fmt: skip
    with torch.no_grad():
        group.params(1)[0].fill_(float("nan"))
    before = [a.clone() for a in strategy.anchors]
    report = strategy.round(2)
    assert [g for g in report.extras["gossip_groups"] if 1 in g] == [bad]
    assert set(report.comm.rejected) == ({1} if partner_absent else set(bad))
    for j in range(4):
        moved = max(float((a[j] - b[j]).abs().max()) for a, b in zip(strategy.anchors, before, strict=True))
        assert (moved == 0.0) == (j in bad), j
        assert all(bool(torch.isfinite(p).all()) for p in group.params(j))


def test_resume_is_exact(tmp_path):
    cfg = dict(algorithm__name="noloco", workers=4, train__max_steps=16, algorithm__warmup_sync_steps=0)
    full = train(_cfg(**cfg), tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(**cfg), tmp_path / "cut", stop_after_step=9)
    assert load_checkpoint(tmp_path / "cut")["strategy"]["phases"] == 3  # the round that passed step 9 ended at 12
    resumed = train(_cfg(**cfg, resume=True), tmp_path / "cut")
    assert resumed["status"] == full["status"] == "ok"
    assert resumed["final_val_loss"] == full["final_val_loss"]
    for w in range(4):
        assert max_rel_diff(final_params(tmp_path / "cut", w), final_params(tmp_path / "full", w)) == 0.0


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (dict(algorithm__name="noloco", algorithm__group_size=0), "algorithm.group_size"),
        (dict(algorithm__name="noloco", algorithm__group_size=5), "algorithm.group_size"),
        (dict(algorithm__name="noloco", algorithm__consensus=-1.0), "algorithm.consensus"),
        (dict(algorithm__name="diloco", algorithm__group_size=3), "algorithm.group_size"),
        (dict(algorithm__name="noloco", backend__name="torch"), "algorithm"),
        (dict(algorithm__name="noloco", compression__name="int8"), "compression"),
        (dict(algorithm__name="noloco", aggregator__name="median"), "aggregator"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=rf"^{key}="):
        validate(tiny_config(workers=4, **overrides))
