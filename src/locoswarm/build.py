"""Everything a run needs, built from a ``Config``: data, the workers of this process, the averager and the
strategy (``build_run``). Plain Python: the trainer, tests and benchmarks call it without Hydra."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from locoswarm.batched import BatchedWorkerGroup, resolve_execution
from locoswarm.comm.adversary import Adversary, AttackedAverager
from locoswarm.comm.aggregate import build_aggregator
from locoswarm.comm.base import Averager
from locoswarm.comm.sim import SimAverager
from locoswarm.comm.staged import StagedAverager
from locoswarm.compression import codec_factory, make_codec
from locoswarm.config import AlgorithmName, BackendName, CompressionConfig, Config, Execution
from locoswarm.data import BatchSampler, TokenData, build_token_data
from locoswarm.evaluation import evaluate
from locoswarm.faults import PhasePlanner
from locoswarm.model import GPT, GPTShape
from locoswarm.netsim import NetworkModel
from locoswarm.outer import OuterOptimizer
from locoswarm.pipeline import PipelineGroup, PipelineNetwork, Router, split_stages
from locoswarm.pipeline.peer import StagePeerGroup
from locoswarm.pipeline.remote import NOT_YET
from locoswarm.seeding import derive_seed
from locoswarm.strategies import (
    DDP,
    AsyncDiLoCo,
    AsyncDiLoCoPeer,
    DiLoCo,
    EagerDiLoCo,
    NoLoCo,
    Strategy,
    StreamingDiLoCo,
    fragment_indices,
)
from locoswarm.timeline import Timeline
from locoswarm.verify import LocalReplay, PeerReplay, Verifier
from locoswarm.worker import Worker, WorkerGroup

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} but CUDA is not available on this machine (use device=cpu or auto)")
    return torch.device(name)


def build_averager(cfg: Config, network: NetworkModel) -> Averager:
    backend = BackendName(cfg.backend.name)
    if backend == BackendName.sim:
        return SimAverager(codec_factory(cfg.compression, cfg.seed), network, build_aggregator(cfg.aggregator),
                           cfg.aggregator.max_norm_ratio)  # fmt: skip
    # The real backends host one worker per process and are built by their launchers, which pass averager= and
    # ranks= to train(): locoswarm-swarm (hivemind) and torchrun locoswarm-train (torch, see cli/train.py).
    launcher = {BackendName.hivemind: "locoswarm-swarm --peers N", BackendName.torch: "torchrun ... locoswarm-train"}
    raise ValueError(f"backend={backend.value} runs one process per worker: start it with {launcher[backend]}")


@dataclass
class Run:
    """The built run: what the trainer loop and the bookkeeper work with."""

    cfg: Config
    data: TokenData
    model: GPT  # the initial model every worker starts from; also the evaluation model's template
    device: torch.device
    group: WorkerGroup | BatchedWorkerGroup
    averager: Averager
    network: NetworkModel
    strategy: Strategy
    evaluate: Callable[[Sequence[torch.Tensor]], float]  # the validation loss of the params a strategy evaluates


def build_group(
    cfg: Config, data: TokenData, base: GPT, ranks: Sequence[int], device: torch.device
) -> WorkerGroup | BatchedWorkerGroup:
    execution, why = resolve_execution(cfg, device, base.num_params(), len(ranks), data.vocab_size)
    log.info("execution: %s (%s)", execution.value, why)
    if execution == Execution.batched:
        samplers = [_sampler(cfg, data, base, r) for r in ranks]
        seeds = [derive_seed(cfg.seed, "dropout", r) for r in ranks]
        return BatchedWorkerGroup(ranks, base, samplers, cfg.inner_optimizer, cfg.train, device, seeds=seeds)
    return WorkerGroup([build_worker(cfg, data, base, r, device) for r in ranks])


def _sampler(cfg: Config, data: TokenData, base: GPT, rank: int) -> BatchSampler:
    return BatchSampler(data.train_shards[rank], cfg.train.batch_size, base.shape.seq_len,
                        derive_seed(cfg.seed, "data", rank))  # fmt: skip


def build_worker(cfg: Config, data: TokenData, base: GPT, rank: int, device: torch.device) -> Worker:
    """Worker ``rank`` as it starts the run: its shard, its seeds, a copy of the shared initial model."""
    return Worker(rank=rank, model=copy.deepcopy(base), sampler=_sampler(cfg, data, base, rank),
                  inner=cfg.inner_optimizer, train=cfg.train, device=device,
                  seed=derive_seed(cfg.seed, "dropout", rank))  # fmt: skip


def build_verifier(cfg: Config, averager: Averager, replica: Callable[[int], Worker]) -> Verifier | None:
    """verify.fraction > 0: the sim replays its own workers; a real swarm's peers replay each other
    (``replica(rank)``: a fresh worker on that rank's shard, for a groupmate's phase)."""
    v = cfg.verify
    if v.fraction <= 0:
        return None
    seed = derive_seed(cfg.seed, "verify")
    if BackendName(cfg.backend.name) == BackendName.sim:
        return LocalReplay(v.fraction, v.tolerance, seed)
    return PeerReplay(v.fraction, v.tolerance, seed, averager, replica, cfg.algorithm.inner_steps)


def build_strategy(
    cfg: Config, group: WorkerGroup | BatchedWorkerGroup, averager: Averager, network: NetworkModel, names: list[str],
    verifier: Verifier | None = None,
) -> Strategy:  # fmt: skip
    """The algorithm: every strategy gets the planner (who trains how many steps: churn, time budgets) and the
    timeline its rounds are priced on. ``names``: the parameter names, in the order of ``group.params``;
    ``verifier``: diloco's spot-checks by replay (``build_verifier``)."""
    a = cfg.algorithm
    f = cfg.faults
    lazy = range(cfg.workers - f.byzantine - f.lazy, cfg.workers - f.byzantine)
    planner = PhasePlanner(network, group.ranks, a.inner_steps, a.time_budget, lazy, f.lazy_fraction)
    timeline = Timeline(network)
    name = AlgorithmName(a.name)
    if name == AlgorithmName.ddp:
        return DDP(group, averager, planner, timeline)
    if name == AlgorithmName.diloco and a.eager:
        anchor = [p.detach().clone() for p in group.params(0)]
        return EagerDiLoCo(group, averager, anchor, cfg.outer_optimizer, a.inner_steps, a.warmup_sync_steps, planner,
                           timeline)  # fmt: skip
    if name == AlgorithmName.diloco:
        anchor = [p.detach().clone() for p in group.params(0)]
        return DiLoCo(group, averager, anchor, OuterOptimizer(anchor, cfg.outer_optimizer), a.inner_steps,
                      a.warmup_sync_steps, planner, timeline, a.outer_delay, verifier)  # fmt: skip
    if name == AlgorithmName.async_diloco and BackendName(cfg.backend.name) != BackendName.sim:
        # a real swarm: this process's one worker, the global model held by a peer (comm/shared_model.py)
        anchor = [p.detach().clone() for p in group.params(0)]
        return AsyncDiLoCoPeer(group, averager, anchor, cfg.outer_optimizer, a.inner_steps, a.momentum_delay,
                               a.dynamic_steps, a.warmup_sync_steps, planner, timeline, cfg.workers)  # fmt: skip
    if name == AlgorithmName.async_diloco:
        anchor = [p.detach().clone() for p in group.params(0)]
        return AsyncDiLoCo(group, averager, anchor, cfg.outer_optimizer, a.inner_steps, a.momentum_delay,
                           a.dynamic_steps, a.warmup_sync_steps, planner, timeline)  # fmt: skip
    if name == AlgorithmName.noloco:
        anchor = [p.detach().clone() for p in group.params(0)]
        return NoLoCo(group, averager, anchor, cfg.outer_optimizer, a.inner_steps, a.group_size, a.consensus,
                      derive_seed(cfg.seed, "noloco"), a.warmup_sync_steps, planner, timeline, cfg.workers)  # fmt: skip
    fragments = fragment_indices(names, a.fragments, a.fragment_pattern)
    return StreamingDiLoCo(group, averager, fragments, cfg.outer_optimizer, a.inner_steps, a.overlap_steps,
                           a.mixing, a.warmup_sync_steps, planner, timeline)  # fmt: skip


def build_pipeline(
    cfg: Config, data: TokenData, base: GPT, device: torch.device
) -> tuple[PipelineGroup, PipelineNetwork, Averager]:
    """pipeline.stages > 1 (sim): K replicas cut into S stages, their S x K peers' network, per-stage averaging."""
    p = cfg.pipeline
    if cfg.model.tie_embeddings:
        log.info("pipeline: the head is untied from the embedding (the first and the last stage are different "
                 "peers), so this model differs from a model.tie_embeddings=true run without stages")  # fmt: skip
    specs = split_stages(base, p.stages)
    log.info("pipeline: %d stages x %d peers; blocks per stage %s, parameter shares %s", p.stages, cfg.workers,
             [s.blocks for s in specs], [round(s.numel / base.num_params(), 3) for s in specs])  # fmt: skip
    network = PipelineNetwork(cfg.network, cfg.workers, p.stages, seed=cfg.seed, call_failure_prob=p.failure_prob)
    # One replica (column) per worker; with rebalancing, room for every peer but one per other stage in one stage.
    columns = cfg.workers if p.rebalance_every == 0 else p.stages * cfg.workers - p.stages + 1
    workers = [build_worker(cfg, data, base, c % cfg.workers, device) for c in range(columns)]
    for c, w in enumerate(workers):
        w.rank = c  # columns past K hold no data: their samplers never draw
    router = Router(p.routing, p.stages * cfg.workers, derive_seed(cfg.seed, "routing"))
    codec = make_codec(CompressionConfig(name=p.activation_codec, block_size=cfg.compression.block_size))
    group = PipelineGroup(workers, cfg.workers, specs, router, network, p.microbatches, codec, p.rebalance_every)
    names = [n for n, _ in base.named_parameters()]
    fragments = fragment_indices(names, cfg.algorithm.fragments, cfg.algorithm.fragment_pattern)
    key_params = {f"fragment{i}": idx for i, idx in enumerate(fragments)}  # streaming_diloco's rounds
    averager = StagedAverager(build_averager(cfg, network), [s.params for s in specs], group.stage_peers,
                              group.stage_work, key_params)  # fmt: skip
    return group, network, averager


def build_stage_peer(
    cfg: Config, data: TokenData, base: GPT, device: torch.device, averager: Averager
) -> StagePeerGroup:
    """pipeline.stages > 1 on a real swarm: this process serves one stage (the averager's ``join_stage``) as the peer
    with its rank in that stage; stage 0 drives worker ``rank``'s data through the others (pipeline/peer.py)."""
    p = cfg.pipeline
    stage, rank = getattr(averager, "stage", None), averager.rank
    if stage is None or rank is None:
        raise ValueError("pipeline.stages > 1 on a real swarm: start the peers with locoswarm-swarm, which assigns "
                         "each its stage")  # fmt: skip
    specs = split_stages(base, p.stages)
    codec = make_codec(CompressionConfig(name=p.activation_codec, block_size=cfg.compression.block_size))
    limit = cfg.train.batch_size * base.shape.seq_len * max(base.shape.d_model, 1)  # elements of the largest tensor
    launched = cfg.workers if getattr(averager, "expected_peers", None) else 0
    # a launched driver is owed from the first step on; a joiner announces its first step once it has the state
    link = averager.stage_link(codec, limit, joined=0 if launched else NOT_YET)
    router = Router(p.routing, p.stages * cfg.workers, derive_seed(cfg.seed, "routing"))
    log.info("pipeline: stage %d of %d, peer %d of %d; blocks %s", stage, p.stages, rank, cfg.workers,
             specs[stage].blocks)  # fmt: skip
    return StagePeerGroup(build_worker(cfg, data, base, rank, device), specs, stage, cfg.workers, link, router,
                          p.microbatches, launched=launched)  # fmt: skip


def build_run(cfg: Config, ranks: Sequence[int] | None = None, averager: Averager | None = None) -> Run:
    """ranks: the workers this process hosts (default all K: the ``sim`` backend); averager: a real backend's
    (its launcher builds it), else the config's."""
    ranks = list(range(cfg.workers)) if ranks is None else list(ranks)
    device = resolve_device(cfg.device)
    data = build_token_data(cfg.data, cfg.workers, cfg.seed, cfg.model.seq_len)
    pipelined = cfg.pipeline.stages > 1  # a pipeline's first and last stage are different peers: untied head
    shape = GPTShape(n_layer=cfg.model.n_layer, n_head=cfg.model.n_head, d_model=cfg.model.d_model,
                     seq_len=cfg.model.seq_len, vocab_size=data.vocab_size, dropout=cfg.model.dropout,
                     tie_embeddings=cfg.model.tie_embeddings and not pipelined)  # fmt: skip
    # One init for everyone: every worker (and every peer on a network) starts from the same weights.
    torch.manual_seed(derive_seed(cfg.seed, "model"))
    base = GPT(shape)
    names = [n for n, _ in base.named_parameters()]
    eval_model = copy.deepcopy(base).to(device)
    t = cfg.train

    def evaluate_model(params: Sequence[torch.Tensor]) -> float:
        return evaluate(eval_model, params, data.val, t.batch_size, t.eval_batches)

    evaluator = evaluate_model
    if pipelined and averager is not None:  # a real swarm's stage peer: its stage, the pipeline evaluated through it
        group = build_stage_peer(cfg, data, base, device, averager)
        network = NetworkModel(cfg.network, cfg.workers, seed=cfg.seed)
        names = [names[i] for i in group.spec.params]

        def evaluator(params: Sequence[torch.Tensor]) -> float:
            return group.evaluate(data.val, t.batch_size, t.eval_batches)
    elif pipelined:
        group, network, averager = build_pipeline(cfg, data, base, device)
    else:
        group = build_group(cfg, data, base, ranks, device)
        network = NetworkModel(cfg.network, cfg.workers, seed=cfg.seed)
        averager = averager or build_averager(cfg, network)
    if cfg.faults.byzantine > 0:  # simulated attackers: what the last n ranks send is replaced
        averager = AttackedAverager(averager, Adversary(cfg.faults, cfg.workers, cfg.seed))
    verifier = build_verifier(cfg, averager, lambda r: build_worker(cfg, data, base, r, device))
    strategy = build_strategy(cfg, group, averager, network, names, verifier)
    return Run(cfg, data, base, device, group, averager, network, strategy, evaluator)
