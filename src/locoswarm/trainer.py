"""The training harness: builds every component from a ``Config`` and runs strategy rounds to the end.

One loop for every algorithm and backend: ``strategy.round()`` advances all local workers by one
synchronisation round; the harness logs, evaluates, prices the round on the network model, checkpoints,
and always closes the run with a ``summary.json`` whose ``status`` says how it ended.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from locoswarm.batched import BatchedWorkerGroup, resolve_execution
from locoswarm.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from locoswarm.comm.base import Averager
from locoswarm.comm.sim import SimAverager
from locoswarm.compression import codec_factory
from locoswarm.config import AlgorithmName, BackendName, Config, Execution, config_hash, to_dict, validate
from locoswarm.data import BatchSampler, build_token_data
from locoswarm.faults import PhasePlanner
from locoswarm.model import GPT, GPTShape
from locoswarm.netsim import NetworkModel
from locoswarm.outer import OuterOptimizer
from locoswarm.runlog import RunLog, atomic_write_text, git_sha
from locoswarm.seeding import derive_seed
from locoswarm.strategies import DDP, DiLoCo, RoundReport, Strategy
from locoswarm.worker import Worker, WorkerGroup

log = logging.getLogger(__name__)

REQUIRED_SUMMARY_KEYS = (
    "final_val_loss", "tokens", "outer_steps", "bytes_sent_total", "wall_seconds", "sim_seconds",
    "compute_utilisation", "git_sha", "config_hash", "status",
)  # fmt: skip


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} but CUDA is not available on this machine (use device=cpu or auto)")
    return torch.device(name)


@torch.no_grad()
def evaluate(model: GPT, params: Sequence[torch.Tensor], val: np.ndarray, batch_size: int, batches: int) -> float:
    """Mean loss over fixed, evenly spaced validation windows (deterministic: no sampling)."""
    for p, src in zip(model.parameters(), params, strict=True):
        p.copy_(src)
    model.eval()
    t = model.shape.seq_len
    device = next(model.parameters()).device
    n_windows = batch_size * batches
    starts = np.linspace(0, len(val) - t - 1, num=n_windows).astype(np.int64)
    total = 0.0
    for b in range(batches):
        idx = starts[b * batch_size : (b + 1) * batch_size]
        x = torch.from_numpy(np.stack([val[s : s + t] for s in idx]).astype(np.int64)).to(device)
        y = torch.from_numpy(np.stack([val[s + 1 : s + 1 + t] for s in idx]).astype(np.int64)).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            _, loss = model(x, y)
        total += loss.item()
    return total / batches


def build_averager(cfg: Config, network: NetworkModel) -> Averager:
    backend = BackendName(cfg.backend.name)
    if backend == BackendName.sim:
        return SimAverager(codec_factory(cfg.compression, cfg.seed), network)
    # The real backends host one worker per process and are built by their launchers, which pass averager= and
    # ranks= to train(): locoswarm-swarm (hivemind) and torchrun locoswarm-train (torch, see cli/train.py).
    launcher = {BackendName.hivemind: "locoswarm-swarm --peers N", BackendName.torch: "torchrun ... locoswarm-train"}
    raise ValueError(f"backend={backend.value} runs one process per worker: start it with {launcher[backend]}")


def swarm_state(group: WorkerGroup, strategy: Strategy, counters: Counters) -> dict[str, Any]:
    """The run state a peer joining a real swarm takes from a live one at a round boundary (tensors, dicts and
    numbers only: it is loaded with ``weights_only=True``). The data position and dropout stream stay the
    joiner's own: its shard is its own."""
    w = group.workers[0]
    return {
        "params": [p.detach().clone() for p in w.params],
        "optimizer": w.optimizer.state_dict(),
        "scheduler": w.scheduler.state_dict(),
        "step": w.step,
        "strategy": strategy.state_dict(),
        "counters": {"outer_steps": counters.outer_steps, "rounds": counters.rounds},
    }


def load_swarm_state(state: dict[str, Any], group: WorkerGroup, strategy: Strategy, counters: Counters) -> None:
    for w in group.workers:
        w.load_params(state["params"])
        w.optimizer.load_state_dict(state["optimizer"])
        w.scheduler.load_state_dict(state["scheduler"])
        w.step = state["step"]
    strategy.load_state_dict(state["strategy"])
    counters.outer_steps = state["counters"]["outer_steps"]
    counters.rounds = state["counters"]["rounds"]
    counters.last_eval_step = max(counters.last_eval_step, state["step"])


def mean_active(losses: Sequence[float]) -> float:
    """Mean loss over the workers that stepped (a masked worker's loss is NaN for the steps it sat out)."""
    active = [x for x in losses if not math.isnan(x)]
    return sum(active) / len(active) if active else math.nan


class Counters:
    """Run-level totals, checkpointed with everything else."""

    def __init__(self) -> None:
        self.rounds = 0
        self.outer_steps = 0
        self.tokens = 0.0
        self.bytes_sent = 0.0
        self.bytes_received = 0.0
        self.comm_seconds = 0.0
        self.sim_seconds = 0.0
        self.compute_seconds = 0.0
        self.val_loss: float | None = None
        self.last_eval_step = 0
        self.compression_ratio = 1.0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, s: dict) -> None:
        self.__dict__.update(s)


def write_config_yaml(run_dir: Path, cfg: Config) -> None:
    """Runs launched without Hydra (tests, swarm peers) still get the run-dir contract's .hydra/config.yaml."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    ranks: Sequence[int] | None = None,
    averager: Averager | None = None,
    stop_after_step: int | None = None,
    on_round: Callable[[RoundReport, int], None] | None = None,
) -> dict[str, Any]:
    """Run one training job; returns the summary (also written to ``run_dir/summary.json``).

    ranks: the workers this process hosts (default all K, the ``sim`` backend); a peer on a real network
    hosts one. averager: overrides the backend's averager (real backends pass theirs). stop_after_step:
    raise KeyboardInterrupt once this inner step is done, exactly like a Ctrl+C (used to test resume).
    """
    validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config_yaml(run_dir, cfg)
    wall_start = time.time()
    ranks = list(range(cfg.workers)) if ranks is None else list(ranks)
    counters = Counters()
    runlog: RunLog | None = None
    group: WorkerGroup | BatchedWorkerGroup | None = None
    summary: dict[str, Any] = {}

    def make_summary(status: str, error: str | None = None) -> dict[str, Any]:
        wall = time.time() - wall_start
        sim_backend = BackendName(cfg.backend.name) == BackendName.sim
        sim_seconds = counters.sim_seconds if sim_backend else wall
        s = {
            "status": status,
            "final_val_loss": counters.val_loss,
            "tokens": counters.tokens,
            "steps": group.step if group is not None else 0,
            "outer_steps": counters.outer_steps,
            "rounds": counters.rounds,
            "bytes_sent_total": counters.bytes_sent,
            "bytes_received_total": counters.bytes_received,
            "comm_seconds": counters.comm_seconds,
            "compression_ratio": counters.compression_ratio,
            "wall_seconds": wall,
            "sim_seconds": sim_seconds,
            "compute_utilisation": counters.compute_seconds / sim_seconds if sim_seconds > 0 else 0.0,
            "tokens_per_second": counters.tokens / wall if wall > 0 else 0.0,
            "workers": cfg.workers,
            "algorithm": to_dict(cfg.algorithm.name),
            "name": cfg.name,
            "git_sha": git_sha(),
            "config_hash": config_hash(cfg),
        }
        if error is not None:
            s["error"] = error
        return s

    try:
        device = resolve_device(cfg.device)
        data = build_token_data(cfg.data, cfg.workers, cfg.seed, cfg.model.seq_len)
        shape = GPTShape(
            n_layer=cfg.model.n_layer,
            n_head=cfg.model.n_head,
            d_model=cfg.model.d_model,
            seq_len=cfg.model.seq_len,
            vocab_size=data.vocab_size,
            dropout=cfg.model.dropout,
        )
        # One init for everyone: every worker (and every peer on a network) starts from the same weights.
        torch.manual_seed(derive_seed(cfg.seed, "model"))
        base = GPT(shape)
        execution, why = resolve_execution(cfg, device, base.num_params(), len(ranks), data.vocab_size)
        log.info("execution: %s (%s)", execution.value, why)
        if execution == Execution.batched:
            group = BatchedWorkerGroup(
                ranks,
                base,
                [
                    BatchSampler(
                        data.train_shards[r], cfg.train.batch_size, shape.seq_len, derive_seed(cfg.seed, "data", r)
                    )
                    for r in ranks
                ],
                cfg.inner_optimizer,
                cfg.train,
                device,
                seeds=[derive_seed(cfg.seed, "dropout", r) for r in ranks],
            )
        else:
            workers = [
                Worker(
                    rank=r,
                    model=copy.deepcopy(base),
                    sampler=BatchSampler(
                        data.train_shards[r], cfg.train.batch_size, shape.seq_len, derive_seed(cfg.seed, "data", r)
                    ),
                    inner=cfg.inner_optimizer,
                    train=cfg.train,
                    device=device,
                    seed=derive_seed(cfg.seed, "dropout", r),
                )
                for r in ranks
            ]
            group = WorkerGroup(workers)
        eval_model = copy.deepcopy(base).to(device)
        network = NetworkModel(cfg.network, cfg.workers, seed=cfg.seed)
        # Who takes part in each round and for how many steps (churn, time budgets); priced by the network model.
        planner = PhasePlanner(network, ranks, cfg.algorithm.inner_steps, cfg.algorithm.time_budget)
        averager = averager or build_averager(cfg, network)
        strategy: Strategy
        if AlgorithmName(cfg.algorithm.name) == AlgorithmName.ddp:
            strategy = DDP(group, averager, planner=planner)
        else:
            anchor = [p.detach().clone() for p in group.params(0)]
            strategy = DiLoCo(
                group,
                averager,
                anchor,
                OuterOptimizer(anchor, cfg.outer_optimizer),
                cfg.algorithm.inner_steps,
                cfg.algorithm.warmup_sync_steps,
                planner=planner,
            )

        resume_step = None
        if cfg.resume:
            ckpt = load_checkpoint(run_dir)
            if ckpt is None:
                raise FileNotFoundError(
                    f"resume=true but {run_dir / CHECKPOINT_NAME} does not exist "
                    "(set train.checkpoint_every=N to write checkpoints, or drop resume=true)"
                )
            if ckpt["config_hash"] != config_hash(cfg):
                raise ValueError(
                    f"resume=true: the checkpoint in {run_dir} was written by a different config "
                    f"(hash {ckpt['config_hash']} != {config_hash(cfg)}); resume with the same overrides"
                )
            group.load_state_dict(ckpt["group"])
            strategy.load_state_dict(ckpt["strategy"])
            if hasattr(averager, "load_state_dict"):
                averager.load_state_dict(ckpt["averager"])
            counters.load_state_dict(ckpt["counters"])
            resume_step = group.step
            log.info("resumed from %s at step %d", run_dir / CHECKPOINT_NAME, resume_step)

        # Real peer networks (backend=hivemind): the averager shares the run state with the swarm, as opaque bytes.
        # A peer joining a running swarm starts from a live peer's state; every peer serves its own at round
        # boundaries and reloads the swarm's after a missed round (see comm/hivemind.py).
        swarm: Any = averager if hasattr(averager, "attach_run_state") else None
        if swarm is not None:
            if not isinstance(group, WorkerGroup):
                raise ValueError(f"backend={cfg.backend.name} needs backend.execution=sequential")
            swarm.attach_run_state(
                lambda: swarm_state(group, strategy, counters),
                lambda s: load_swarm_state(s, group, strategy, counters),
                rounds=counters.rounds,
            )

        runlog = RunLog(run_dir, cfg, resume_step=resume_step)
        log.info("%s | model %.2fM params | %s", data.description, base.num_params() / 1e6, device)

        def checkpoint() -> None:
            save_checkpoint(
                run_dir,
                {
                    "config_hash": config_hash(cfg),
                    "group": group.state_dict(),
                    "strategy": strategy.state_dict(),
                    "averager": averager.state_dict() if hasattr(averager, "state_dict") else {},
                    "counters": counters.state_dict(),
                },
            )

        max_steps = cfg.train.max_steps
        since_row = {"bytes_sent": 0.0, "bytes_received": 0.0, "comm_seconds": 0.0}
        bar = tqdm(total=max_steps, initial=group.step, disable=not cfg.train.progress, desc=cfg.name, unit="step")
        loop_start = time.time()
        tokens_at_start = counters.tokens
        while group.step < max_steps:
            step0, tokens0 = group.step, counters.tokens
            planned = planner.round
            report = strategy.round(max_steps - step0)
            comm = report.comm
            counters.rounds += 1
            counters.outer_steps += int(report.outer_step)
            counters.tokens += comm.total_weight
            counters.bytes_sent += comm.bytes_sent
            counters.bytes_received += comm.bytes_received
            counters.compression_ratio = comm.compression_ratio
            # Price the round as the strategy ran it (its plan: step counts, stragglers, who took part); a real
            # backend's averaging is measured, the sim's is modelled. compute_seconds: busy time, for utilisation.
            plan = planner.last if planner.round > planned else planner.unplanned(report.steps)
            modelled = isinstance(averager, SimAverager)
            measured_comm = None if modelled else comm.seconds
            cost = network.price_round(
                plan, report.compute_seconds, comm.payload_bytes, measured_comm, allgather=comm.allgather
            )
            comm_seconds = cost.comm_seconds
            counters.comm_seconds += comm_seconds
            counters.compute_seconds += cost.busy_seconds
            counters.sim_seconds += cost.seconds
            for k, v in (("bytes_sent", comm.bytes_sent), ("bytes_received", comm.bytes_received)):
                since_row[k] += v
            since_row["comm_seconds"] += comm_seconds
            step = group.step

            val_loss = None
            if (
                step // cfg.train.eval_interval > counters.last_eval_step // cfg.train.eval_interval
                or step >= max_steps
            ):
                val_loss = evaluate(
                    eval_model, strategy.global_params(), data.val, cfg.train.batch_size, cfg.train.eval_batches
                )
                counters.val_loss = val_loss
                counters.last_eval_step = step

            per_step_tokens = comm.total_weight / report.steps
            lr = group.lr
            for i, losses in enumerate(report.losses):
                s = step0 + i + 1
                last = s == step
                # Rows every log_interval steps, plus the end of every multi-step round (each diloco outer step).
                if not (s % cfg.train.log_interval == 0 or last and (report.steps > 1 or step >= max_steps)):
                    continue
                row: dict[str, Any] = {
                    "step": s,
                    "outer_step": counters.outer_steps if last else counters.outer_steps - int(report.outer_step),
                    "tokens": tokens0 + per_step_tokens * (i + 1),
                    "loss": mean_active(losses),
                }
                if len(losses) > 1:
                    row["worker_loss"] = losses
                if last:
                    row.update(since_row)
                    row.update(
                        lr=lr,
                        group_size=comm.group_size,
                        compression_ratio=comm.compression_ratio,
                        bytes_sent_total=counters.bytes_sent,
                        sim_seconds=counters.sim_seconds,
                        **report.extras,
                    )
                    since_row = dict.fromkeys(since_row, 0.0)
                    if val_loss is not None:
                        row["val_loss"] = val_loss
                runlog.log(row)
            logged_last = step % cfg.train.log_interval == 0 or report.steps > 1 or step >= max_steps
            if val_loss is not None and not logged_last:
                runlog.log({"step": step, "outer_step": counters.outer_steps, "tokens": counters.tokens,
                            "loss": mean_active(report.losses[-1]), "val_loss": val_loss})  # fmt: skip

            if on_round is not None:
                on_round(report, step)
            elapsed = time.time() - loop_start
            bar.update(step - step0)
            bar.set_postfix(
                loss=f"{mean_active(report.losses[-1]):.3f}",
                val=f"{counters.val_loss:.3f}" if counters.val_loss is not None else "-",
                tok_s=f"{(counters.tokens - tokens_at_start) / max(elapsed, 1e-9):.0f}",
            )
            every = cfg.train.checkpoint_every
            if every > 0 and report.outer_step and counters.outer_steps % every == 0:
                checkpoint()
            if swarm is not None:
                swarm.round_boundary()  # serve state requests, publish progress, resync after a missed round
            if stop_after_step is not None and step >= stop_after_step and step < max_steps:
                raise KeyboardInterrupt(f"stop_after_step={stop_after_step}")
        bar.close()
        if cfg.train.checkpoint_every > 0:
            checkpoint()
        summary = make_summary("ok")
        runlog.write_summary(summary)
        return summary
    except KeyboardInterrupt:
        summary = make_summary("failed", "interrupted (Ctrl+C); continue with resume=true from the last checkpoint")
        _write_summary_anyway(run_dir, runlog, summary)
        raise
    except Exception as e:
        summary = make_summary("failed", f"{type(e).__name__}: {e}")
        _write_summary_anyway(run_dir, runlog, summary)
        raise
    finally:
        if runlog is not None:
            runlog.close()
        if averager is not None:
            averager.close()


def _write_summary_anyway(run_dir: Path, runlog: RunLog | None, summary: dict[str, Any]) -> None:
    import json

    if runlog is not None:
        runlog.write_summary(summary)
    else:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
