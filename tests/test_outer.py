"""The outer optimiser and one DiLoCo round, against hand-computed references."""

from __future__ import annotations

import pytest
import torch

from locoswarm.comm.sim import SimAverager
from locoswarm.compression import make_codec
from locoswarm.config import CompressionConfig, NetworkConfig, OuterOptimizerConfig
from locoswarm.netsim import NetworkModel
from locoswarm.outer import OuterOptimizer


def test_nesterov_matches_hand_computed_reference():
    cfg = OuterOptimizerConfig(name="nesterov", lr=0.7, momentum=0.9)
    p0 = torch.tensor([1.0, -2.0, 0.5])
    anchor = [p0.clone()]
    outer = OuterOptimizer(anchor, cfg)
    grads = [torch.tensor([0.1, 0.2, -0.3]), torch.tensor([0.05, -0.1, 0.0]), torch.tensor([-0.2, 0.0, 0.4])]
    # Nesterov momentum by hand: b <- mu*b + g (b_1 = g_1);  p <- p - lr*(g + mu*b)
    p, b = p0.double().clone(), None
    for g in grads:
        outer.step([g])
        g = g.double()
        b = g.clone() if b is None else 0.9 * b + g
        p = p - 0.7 * (g + 0.9 * b)
        torch.testing.assert_close(anchor[0].double(), p, rtol=0, atol=1e-6)


def test_the_step_and_momentum_norms_are_what_the_optimiser_did():
    """outer_update_norm is how far the anchor moved, outer_momentum_norm the momentum buffer's norm (by hand)."""
    cfg = OuterOptimizerConfig(name="nesterov", lr=0.7, momentum=0.9)
    anchor = [torch.tensor([1.0, -2.0]), torch.tensor([0.5])]
    outer = OuterOptimizer(anchor, cfg)
    g1, g2 = [torch.tensor([0.3, 0.4]), torch.tensor([1.2])], [torch.tensor([-0.1, 0.0]), torch.tensor([0.2])]
    outer.step(g1)  # b1 = g1; step = lr (g1 + mu b1) = 1.33 g1
    n1 = OuterOptimizer.norms([outer])
    assert n1["outer_momentum_norm"] == pytest.approx(1.3, rel=1e-6)  # ||g1|| = sqrt(0.09 + 0.16 + 1.44)
    assert n1["outer_update_norm"] == pytest.approx(0.7 * 1.9 * 1.3, rel=1e-5)
    outer.step(g2)  # b2 = mu b1 + g2
    b2 = [0.9 * a + b for a, b in zip(g1, g2, strict=True)]
    step = [0.7 * (b + 0.9 * m) for b, m in zip(g2, b2, strict=True)]
    sq = lambda ts: sum(float(t.double().pow(2).sum()) for t in ts)  # noqa: E731
    n2 = OuterOptimizer.norms([outer])
    assert n2["outer_momentum_norm"] == pytest.approx(sq(b2) ** 0.5, rel=1e-6)
    assert n2["outer_update_norm"] == pytest.approx(sq(step) ** 0.5, rel=1e-5)
    # two optimisers stepped in one round (streaming fragments): their squares add up; plain SGD has no momentum
    plain = OuterOptimizer([torch.zeros(2)], OuterOptimizerConfig(name="sgd", lr=1.0, momentum=0.0))
    plain.step([torch.tensor([3.0, 4.0])])
    both = OuterOptimizer.norms([outer, plain])
    assert both["outer_update_norm"] == pytest.approx((sq(step) + 25.0) ** 0.5, rel=1e-5)
    assert both["outer_momentum_norm"] == pytest.approx(n2["outer_momentum_norm"])
    assert OuterOptimizer.norms([plain]) == {"outer_update_norm": pytest.approx(5.0)}
    assert OuterOptimizer.norms([]) == {}


def test_sgd_lr1_returns_the_average():
    anchor = [torch.tensor([3.0, 4.0])]
    OuterOptimizer(anchor, OuterOptimizerConfig(name="sgd", lr=1.0, momentum=0.0)).step([torch.tensor([1.0, -1.0])])
    assert anchor[0].tolist() == [2.0, 5.0]


def test_adam_first_step_is_lr_times_sign():
    anchor = [torch.zeros(3)]
    OuterOptimizer(anchor, OuterOptimizerConfig(name="adam", lr=0.01)).step([torch.tensor([2.0, -0.5, 0.0])])
    torch.testing.assert_close(anchor[0], torch.tensor([-0.01, 0.01, 0.0]), rtol=0, atol=1e-6)


def test_nesterov_without_momentum_is_rejected():
    with pytest.raises(ValueError, match="outer_optimizer.momentum"):
        OuterOptimizer([torch.zeros(1)], OuterOptimizerConfig(name="nesterov", momentum=0.0))


def test_sim_averager_token_weighted_mean_and_bytes():
    net = NetworkModel(NetworkConfig(bandwidth_mbps=100.0, latency_ms=0.0), workers=3)
    avg = SimAverager(lambda key, i: make_codec(CompressionConfig()), net)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # 3 workers, one 2-element tensor
    r = avg.average([x], torch.tensor([1.0, 1.0, 2.0]))
    torch.testing.assert_close(r.tensors[0], torch.tensor([3.5, 4.5]))
    assert r.group_size == 3 and r.total_weight == 4.0
    # ring all-reduce: 2(K-1)/K of the 8-byte fp32 payload each way
    assert r.bytes_sent == pytest.approx(2 * 2 / 3 * 8) and r.bytes_received == r.bytes_sent
    assert r.payload_bytes == 8 and r.compression_ratio == 1.0
    # 100 Mbit/s: 2(K-1)/K * 8 bytes * 8 bits / 1e8
    assert r.seconds == pytest.approx(2 * 2 / 3 * 8 * 8 / 1e8)


def test_sim_averager_zero_weight_masks_a_worker():
    net = NetworkModel(NetworkConfig(), workers=3)
    avg = SimAverager(lambda key, i: make_codec(CompressionConfig()), net)
    x = torch.tensor([[1.0], [100.0], [3.0]])
    r = avg.average([x], torch.tensor([1.0, 0.0, 1.0]))
    assert r.tensors[0].item() == 2.0 and r.group_size == 2
    with pytest.raises(ValueError, match="weights"):
        avg.average([x], torch.tensor([0.0, 0.0, 0.0]))
