"""backend.execution=batched: K workers as one vmapped model must give the sequential group's numbers.

Tolerance: the vmapped forward/backward reduces in a different order than K separate models, so the two modes
agree to float32 rounding, not bit for bit. "Relative" below is per tensor: ||a - b|| / ||b||.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import tiny_config

from locoswarm.batched import BatchedWorkerGroup, StackedInnerOptimizer, resolve_execution
from locoswarm.comm.sim import SimAverager
from locoswarm.compression import make_codec
from locoswarm.config import Config, Execution
from locoswarm.data import BatchSampler, build_token_data
from locoswarm.model import GPT, GPTShape
from locoswarm.netsim import NetworkModel
from locoswarm.outer import OuterOptimizer
from locoswarm.seeding import derive_seed
from locoswarm.trainer import train
from locoswarm.worker import Worker, WorkerGroup, build_inner_optimizer, lr_lambda

REL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def max_rel(xs, ys) -> float:
    xs, ys = list(xs), list(ys)
    assert len(xs) == len(ys)
    return max(rel(a, b) for a, b in zip(xs, ys, strict=True))


def assert_losses_close(a: list[list[float]], b: list[list[float]]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        for x, y in zip(ra, rb, strict=True):
            if math.isnan(y):
                assert math.isnan(x)
            else:
                assert abs(x - y) <= REL * abs(y), (x, y)


def sampler(cfg: Config, data, r: int, seed_rank: int | None = None) -> BatchSampler:
    s = r if seed_rank is None else seed_rank
    return BatchSampler(data.train_shards[s], cfg.train.batch_size, cfg.model.seq_len, derive_seed(cfg.seed, "data", s))


def make_groups(cfg: Config) -> tuple[WorkerGroup, BatchedWorkerGroup]:
    """Both groups exactly as the trainer builds them (same init, samplers and seeds)."""
    data = build_token_data(cfg.data, cfg.workers, cfg.seed, cfg.model.seq_len)
    m = cfg.model
    shape = GPTShape(m.n_layer, m.n_head, m.d_model, m.seq_len, data.vocab_size, m.dropout)
    torch.manual_seed(derive_seed(cfg.seed, "model"))
    base = GPT(shape)
    cpu = torch.device("cpu")
    ranks = list(range(cfg.workers))
    seeds = [derive_seed(cfg.seed, "dropout", r) for r in ranks]
    seq = WorkerGroup(
        [
            Worker(r, copy.deepcopy(base), sampler(cfg, data, r), cfg.inner_optimizer, cfg.train, cpu, seeds[r])
            for r in ranks
        ]
    )
    bat = BatchedWorkerGroup(
        ranks, base, [sampler(cfg, data, r) for r in ranks], cfg.inner_optimizer, cfg.train, cpu, seeds
    )
    return seq, bat


class Sim:
    """A DiLoCo loop around one group, with per-worker step counts (what a time-budgeted strategy will do)."""

    def __init__(self, cfg: Config, group):
        self.group = group
        self.averager = SimAverager(
            lambda key, i: make_codec(cfg.compression, seed=i), NetworkModel(cfg.network, cfg.workers)
        )
        self.anchor = [p.detach().clone() for p in group.params(0)]
        self.outer = OuterOptimizer(self.anchor, cfg.outer_optimizer)
        self.n = cfg.algorithm.inner_steps

    def inner(self, counts=None):
        with torch.no_grad():
            for a, p in zip(self.anchor, self.group.params(0), strict=True):
                a.copy_(p)
        losses, _ = self.group.inner_steps(self.n, counts)
        return losses

    def sync(self, counts=None):
        pseudo = self.group.pseudo_gradients(self.anchor)
        steps = torch.tensor(counts if counts is not None else [self.n] * self.group.size, dtype=torch.float64)
        comm = self.averager.average(pseudo, self.group.tokens_per_step() * steps)
        self.outer.step(comm.tensors)
        self.group.load_params(self.anchor)
        return pseudo, comm

    def round(self, counts=None):
        losses = self.inner(counts)
        return (losses, *self.sync(counts))


# --- the inner optimiser on stacked tensors ---------------------------------------------------------------


@pytest.mark.parametrize("name,momentum", [("adamw", 0.0), ("sgd", 0.0), ("sgd", 0.9)])
def test_stacked_optimizer_matches_torch_per_worker(name, momentum):
    """K torch optimisers (decay/no-decay groups, LambdaLR) vs one stacked optimiser, with masked steps."""
    cfg = tiny_config(inner_optimizer__name=name, inner_optimizer__momentum=momentum, inner_optimizer__lr=0.05)
    cfg.train.warmup_steps = 3
    shape = GPTShape(1, 2, 16, 8)
    torch.manual_seed(0)
    models = [GPT(shape) for _ in range(3)]  # different params per worker
    opts = [build_inner_optimizer(m, cfg.inner_optimizer) for m in models]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(cfg.train)) for o in opts]
    plist = [list(m.parameters()) for m in models]
    stacked = [torch.stack([ps[i].detach() for ps in plist]) for i in range(len(plist[0]))]
    opt = StackedInnerOptimizer(stacked, [p.ndim for p in plist[0]], cfg.inner_optimizer)
    steps = [0, 0, 0]
    gen = torch.Generator().manual_seed(1)
    for t in range(8):
        active = [True, t % 3 != 1, t < 4]  # worker 1 skips some steps, worker 2 stops after 4
        grads = [torch.randn(p.shape, generator=gen) for p in stacked]
        for k in range(3):
            if active[k]:
                for p, g in zip(plist[k], grads, strict=True):
                    p.grad = g[k].clone()
                opts[k].step()
                scheds[k].step()
        lrs = [cfg.inner_optimizer.lr * lr_lambda(cfg.train)(s) for s in steps]
        opt.step(grads, lrs, steps, active)
        steps = [s + a for s, a in zip(steps, active, strict=True)]
    for k in range(3):
        assert max_rel([p[k] for p in stacked], plist[k]) <= 1e-6
    assert steps == [8, 5, 4]


# --- batched == sequential ----------------------------------------------------------------------------------


def test_diloco_k4_h5_nesterov_fp16_batched_equals_sequential():
    cfg = tiny_config(workers=4, algorithm__inner_steps=5, outer_optimizer__name="nesterov", compression__name="fp16")
    seq, bat = make_groups(cfg)
    seq, bat = Sim(cfg, seq), Sim(cfg, bat)
    for _ in range(3):
        (ls, ps, cs), (lb, pb, cb) = seq.round(), bat.round()
        assert_losses_close(lb, ls)
        assert len(lb) == 5 and len(lb[0]) == 4
        assert max_rel(pb, ps) <= 1e-4  # pseudo-gradients are differences of nearly equal params
        assert cb.payload_bytes == cs.payload_bytes and cb.compression_ratio < 1  # fp16 really ran
    assert max_rel(bat.anchor, seq.anchor) <= REL
    for w in range(4):
        assert max_rel(bat.group.params(w), seq.group.params(w)) <= REL
    # Training happened: the final params moved from the init by far more than the tolerance.
    assert max_rel(seq.anchor, [p.detach() for p in make_groups(cfg)[0].params(0)]) > 1e3 * REL


@pytest.mark.parametrize("algorithm", ["diloco", "ddp"])
def test_trainer_batched_equals_sequential(tmp_path, algorithm):
    """End to end through train(): per-step, per-worker losses, eval losses and final params."""

    def run(execution):
        cfg = tiny_config(
            workers=4,
            algorithm__name=algorithm,
            algorithm__inner_steps=5,
            outer_optimizer__name="nesterov",
            compression__name="fp16",
            train__max_steps=10 if algorithm == "diloco" else 6,
            train__checkpoint_every=1,
            backend__execution=execution,
        )
        losses = []
        summary = train(cfg, tmp_path / execution, on_round=lambda report, step: losses.extend(report.losses))
        ckpt = torch.load(tmp_path / execution / "checkpoint.pt", weights_only=False)
        return summary, losses, ckpt["group"], ckpt["strategy"]

    s_sum, s_loss, s_group, s_strat = run("sequential")
    b_sum, b_loss, b_group, b_strat = run("batched")
    assert s_sum["status"] == b_sum["status"] == "ok"
    assert b_group["execution"] == "batched" and "workers" in s_group  # each mode really ran
    assert_losses_close(b_loss, s_loss)
    assert len(s_loss) == s_sum["steps"]
    assert abs(b_sum["final_val_loss"] - s_sum["final_val_loss"]) <= REL * s_sum["final_val_loss"]
    assert b_sum["tokens"] == s_sum["tokens"] and b_sum["bytes_sent_total"] == s_sum["bytes_sent_total"]
    for w in range(4):
        seq_params = [t for name, t in s_group["workers"][w]["model"].items() if name != "head.weight"]  # tied
        assert max_rel([p[w] for p in b_group["params"]], seq_params) <= REL
    if algorithm == "diloco":
        assert max_rel(b_strat["anchor"], s_strat["anchor"]) <= REL


# --- heterogeneous step counts (masking) --------------------------------------------------------------------


def test_dropped_worker_is_masked():
    """Round 2: worker 1 runs 2 of 5 steps, worker 3 none. Each batched row equals the sequential worker that
    ran only its own steps, the masked rows stay bit for bit, and the averaged result matches sim."""
    cfg = tiny_config(workers=4, algorithm__inner_steps=5, compression__name="fp16")
    counts = [5, 2, 5, 0]
    seq, bat = (Sim(cfg, g) for g in make_groups(cfg))
    for sim in (seq, bat):
        sim.round()
    before = [p.clone() for p in bat.group.params(3)]
    before_opt = [t[3].clone() for t in bat.group.optimizer.state["exp_avg_sq"]]
    losses_s, losses_b = seq.inner(counts), bat.inner(counts)

    assert_losses_close(losses_b, losses_s)
    assert [math.isnan(losses_b[s][1]) for s in range(5)] == [False, False, True, True, True]
    assert all(math.isnan(losses_b[s][3]) for s in range(5))
    assert bat.group.steps == [w.step for w in seq.group.workers] == [10, 7, 10, 5]
    assert [s.batches_drawn for s in bat.group.samplers] == [10, 7, 10, 5]  # a masked worker draws no batch
    for w in range(4):
        assert max_rel(bat.group.params(w), seq.group.params(w)) <= REL
    assert all(torch.equal(a, b) for a, b in zip(bat.group.params(3), before, strict=True))
    assert all(torch.equal(t[3], b) for t, b in zip(bat.group.optimizer.state["exp_avg_sq"], before_opt, strict=True))
    assert not torch.equal(bat.group.params(1)[0], bat.group.params(0)[0])  # the others did move

    (pseudo_s, comm_s), (pseudo_b, comm_b) = seq.sync(counts), bat.sync(counts)
    assert comm_b.group_size == comm_s.group_size == 3  # the worker with 0 steps sent nothing
    assert all(not t[3].any() for t in pseudo_b) and all(not t[3].any() for t in pseudo_s)  # it never left the anchor
    assert comm_b.total_weight == comm_s.total_weight and comm_b.bytes_sent == comm_s.bytes_sent
    assert max_rel(comm_b.tensors, comm_s.tensors) <= 1e-4  # pseudo-gradients: differences of close params
    assert max_rel(bat.anchor, seq.anchor) <= REL

    for sim in (seq, bat):
        sim.round()  # everyone back: the masked optimiser states carry on from where they stopped
    assert max_rel(bat.anchor, seq.anchor) <= REL
    assert bat.group.steps == [15, 12, 15, 10]


def test_counts_are_validated():
    seq, bat = make_groups(tiny_config(workers=2))
    for group in (seq, bat):
        with pytest.raises(ValueError, match="counts"):
            group.inner_steps(3, [4, 1])
        with pytest.raises(ValueError, match="counts"):
            group.inner_steps(3, [1])


# --- dropout ------------------------------------------------------------------------------------------------


def same_data_group(cfg: Config, dropout_seed: int = 0) -> BatchedWorkerGroup:
    """K workers fed the identical batch stream (all use rank 0's shard and seed), so only dropout differs."""
    data = build_token_data(cfg.data, cfg.workers, cfg.seed, cfg.model.seq_len)
    m = cfg.model
    torch.manual_seed(0)
    base = GPT(GPTShape(m.n_layer, m.n_head, m.d_model, m.seq_len, data.vocab_size, m.dropout))
    ranks = list(range(cfg.workers))
    samplers = [sampler(cfg, data, r, seed_rank=0) for r in ranks]
    seeds = [derive_seed(dropout_seed, "dropout", r) for r in ranks]
    return BatchedWorkerGroup(ranks, base, samplers, cfg.inner_optimizer, cfg.train, torch.device("cpu"), seeds)


def test_dropout_differs_per_worker_and_replays():
    no_drop, _ = same_data_group(tiny_config(workers=3)).inner_steps(1)
    assert no_drop[0][0] == no_drop[0][1] == no_drop[0][2]  # same data, same params: same loss without dropout
    cfg = tiny_config(workers=3, model__dropout=0.2)
    a = same_data_group(cfg)
    losses_a, _ = a.inner_steps(2)
    assert len(set(losses_a[0])) == 3  # each worker drew its own dropout masks
    assert not torch.equal(a.params(0)[0], a.params(1)[0])
    mid = a.state_dict()
    more_a, _ = a.inner_steps(2)

    b = same_data_group(cfg)
    losses_b, _ = b.inner_steps(2)
    assert losses_b == losses_a  # replays exactly
    b.load_state_dict(mid)  # and resumes exactly: the dropout stream is in the state
    more_b, _ = b.inner_steps(2)
    assert more_b == more_a
    assert all(torch.equal(x, y) for x, y in zip(a.params(2), b.params(2), strict=True))
    other_losses, _ = same_data_group(cfg, dropout_seed=1).inner_steps(1)
    assert other_losses[0] != losses_a[0]  # other seeds, other masks


# --- checkpoints and mode selection -------------------------------------------------------------------------


def test_batched_resume_equals_uninterrupted(tmp_path):
    def cfg(**kw):
        return tiny_config(workers=3, model__dropout=0.1, algorithm__warmup_sync_steps=3, train__max_steps=15,
                           train__checkpoint_every=1, backend__execution="batched", **kw)  # fmt: skip

    full = train(cfg(), tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(cfg(), tmp_path / "cut", stop_after_step=9)
    resumed = train(cfg(resume=True), tmp_path / "cut")
    assert resumed["status"] == full["status"] == "ok"
    assert resumed["final_val_loss"] == full["final_val_loss"] and resumed["tokens"] == full["tokens"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["group"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["group"]
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"], strict=True))
    assert a["steps"] == b["steps"] == [15, 15, 15]


def test_state_formats_refuse_the_other_mode():
    seq, bat = make_groups(tiny_config(workers=2))
    with pytest.raises(ValueError, match="execution=batched"):
        seq.load_state_dict(bat.state_dict())
    with pytest.raises(ValueError, match="execution=sequential"):
        bat.load_state_dict(seq.state_dict())


def test_execution_resolution():
    cfg = tiny_config(workers=4, backend__execution="auto")
    mode, why = resolve_execution(cfg, torch.device("cpu"), 30_000, 4, 256)
    assert mode == Execution.sequential and "cpu" in why
    mode, why = resolve_execution(cfg, torch.device("cpu"), 30_000, 1, 256)
    assert mode == Execution.sequential and "one local worker" in why
    cfg.backend.execution = "batched"
    assert resolve_execution(cfg, torch.device("cpu"), 30_000, 4, 256)[0] == Execution.batched
    cfg.backend.execution = "sequential"
    assert resolve_execution(cfg, torch.device("cpu"), 30_000, 4, 256)[0] == Execution.sequential


def test_auto_on_cpu_runs_sequential(tmp_path, caplog):
    caplog.set_level("INFO", logger="locoswarm.build")
    summary = train(tiny_config(workers=2, train__max_steps=3, device="cpu", backend__execution="auto"), tmp_path)
    assert summary["status"] == "ok"
    assert any("execution: sequential (auto: device=cpu" in r.getMessage() for r in caplog.records)


def test_time_budget_stragglers_and_churn_batched_equals_sequential(tmp_path):
    """The trainer's time-budgeted phases drive the masking: a x2 straggler runs half the steps, an absent worker
    none; both execution modes give the same per-worker step counts, losses and result."""

    def run(execution):
        cfg = tiny_config(workers=4, algorithm__inner_steps=4, algorithm__time_budget=0.04, train__max_steps=12,
                          backend__execution=execution, train__checkpoint_every=1)  # fmt: skip
        cfg.network.step_seconds = 0.01
        cfg.network.stragglers.kind = "fixed"
        cfg.network.stragglers.factor = 2.0
        cfg.network.stragglers.workers = [0]
        cfg.network.churn.absent = [[2, 1, 2]]  # worker 2 misses round 1
        rounds = []
        summary = train(cfg, tmp_path / execution, on_round=lambda r, _: rounds.append((r.extras, r.losses)))
        return summary, rounds

    (s_sum, s_rounds), (b_sum, b_rounds) = run("sequential"), run("batched")
    assert [e.get("worker_steps") for e, _ in b_rounds] == [e.get("worker_steps") for e, _ in s_rounds]
    assert b_rounds[1][0]["worker_steps"] == [2, 4, 0, 4]  # the straggler ran half, the absent worker nothing
    for (_, lb), (_, ls) in zip(b_rounds, s_rounds, strict=True):
        assert_losses_close(lb, ls)
    assert abs(b_sum["final_val_loss"] - s_sum["final_val_loss"]) <= REL * s_sum["final_val_loss"]
