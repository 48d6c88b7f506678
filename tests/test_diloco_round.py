"""One DiLoCo round against its definition, on real workers: anchor' = outer(anchor, mean_k(anchor - local_k))."""

from __future__ import annotations

import copy

import torch
from helpers import tiny_config

from locoswarm.comm.sim import SimAverager
from locoswarm.compression import make_codec
from locoswarm.data import BatchSampler, build_token_data
from locoswarm.model import GPT, GPTShape
from locoswarm.netsim import NetworkModel
from locoswarm.outer import OuterOptimizer
from locoswarm.strategies import DiLoCo
from locoswarm.worker import Worker, WorkerGroup


def build(cfg, k):
    data = build_token_data(cfg.data, k, cfg.seed, cfg.model.seq_len)
    torch.manual_seed(0)
    m = cfg.model
    base = GPT(GPTShape(m.n_layer, m.n_head, m.d_model, m.seq_len, data.vocab_size))
    workers = [
        Worker(
            r,
            copy.deepcopy(base),
            BatchSampler(data.train_shards[r], 4, m.seq_len, seed=r),
            cfg.inner_optimizer,
            cfg.train,
            torch.device("cpu"),
            seed=r,
        )  # fmt: skip
        for r in range(k)
    ]
    return WorkerGroup(workers)


class CountingAverager(SimAverager):
    """The real sim averager, counting calls (the strategy must sync exactly once per round)."""

    calls = 0

    def start(self, tensors, weights, **kw):
        self.calls += 1
        return super().start(tensors, weights, **kw)


def test_one_round_matches_definition():
    cfg = tiny_config(workers=3)
    group = build(cfg, 3)
    anchor = [p.detach().clone() for p in group.params(0)]
    start = [a.clone() for a in anchor]
    outer_cfg = copy.deepcopy(cfg.outer_optimizer)
    averager = CountingAverager(lambda key, i: make_codec(cfg.compression), NetworkModel(cfg.network, 3))
    strategy = DiLoCo(group, averager, anchor, OuterOptimizer(anchor, cfg.outer_optimizer), inner_steps=3)

    # Reference: the same workers, run by hand.
    ref = build(cfg, 3)
    ref.inner_steps(3)
    locals_ = [[p.detach().clone() for p in w.params] for w in ref.workers]
    mean_pg = [sum(s - loc[i] for loc in locals_) / 3 for i, s in enumerate(start)]
    ref_anchor = [s.clone() for s in start]
    OuterOptimizer(ref_anchor, outer_cfg).step(mean_pg)

    report = strategy.round(remaining=100)
    assert averager.calls == 1 and report.steps == 3 and report.outer_step
    for a, r in zip(anchor, ref_anchor, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-7)
    # every worker restarts from the new anchor
    for w in group.workers:
        for p, a in zip(w.params, anchor, strict=True):
            assert torch.equal(p, a)
    # the anchor actually moved
    assert max((a - s).abs().max().item() for a, s in zip(anchor, start, strict=True)) > 1e-4
    # H caps at the steps remaining
    assert strategy.round(remaining=2).steps == 2 and averager.calls == 2
