"""The run's books: counters, metrics rows, evaluation, checkpoints, resume, the summary, and the run state a
real swarm shares. The trainer hands it one ``RoundReport`` per round (``Bookkeeper.record``); it never looks
inside a round, so a new strategy needs nothing here.

Contract (DESIGN.md): every row has ``step``, ``outer_step``, ``tokens``, ``loss``; eval rows add ``val_loss``;
sync rows add ``bytes_sent``, ``bytes_received``, ``comm_seconds``; ``summary.json`` has ``status`` ``ok`` or
``failed`` with ``error``, also after a crash or Ctrl+C. A run whose final validation loss is not finite
did not train: its status is ``failed``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from locoswarm.build import Run
from locoswarm.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from locoswarm.comm.base import Averager
from locoswarm.config import BackendName, Config, config_hash, to_dict
from locoswarm.progress import Progress
from locoswarm.runlog import RunLog, atomic_write_text, git_sha
from locoswarm.strategies import RoundReport, Strategy
from locoswarm.worker import WorkerGroup

log = logging.getLogger(__name__)

REQUIRED_SUMMARY_KEYS = (
    "final_val_loss", "tokens", "outer_steps", "bytes_sent_total", "wall_seconds", "sim_seconds",
    "compute_utilisation", "git_sha", "config_hash", "status",
)  # fmt: skip


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
        self.activation_bytes = 0.0  # a pipeline's bytes between stages, per stage peer
        self.stage_failures = 0
        self.stage_load: list[list[int]] | None = None  # micro-batches per [stage][column]
        self.stage_moves = 0  # peers moved between stages (pipeline.rebalance_every)
        self.rebalance_bytes = 0.0  # the stage state they downloaded
        self.stage_peers: list[int] | None = None  # peers per stage at the end
        # sync fields accumulated since the last row (a round of one step may end between rows)
        self.since_row = {"bytes_sent": 0.0, "bytes_received": 0.0, "comm_seconds": 0.0}
        self.rejected: list[dict] = []  # contributions screened out since the last row: {rank, reason, key}
        self.rejections = 0  # over the run

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, s: dict) -> None:
        self.__dict__.update(s)


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


def write_config_yaml(run_dir: Path, cfg: Config) -> None:
    """Runs launched without Hydra (tests, swarm peers) still get the run-dir contract's .hydra/config.yaml."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))


class Bookkeeper:
    """``with Bookkeeper(cfg, run_dir) as book: book.attach(run); ... book.record(report) ...; book.finish()``.

    Leaving the block by an exception (a crash, Ctrl+C) writes a ``failed`` summary and closes the averager;
    the exception propagates."""

    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        *,
        stop_after_step: int | None = None,
        on_round: Callable[[RoundReport, int], None] | None = None,
        averager: Averager | None = None,
    ):
        """averager: a real backend's, closed on the way out even if building the run fails."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.stop_after_step = stop_after_step
        self.on_round = on_round
        self.counters = Counters()
        self.run: Run | None = None
        self._averager = averager
        self.runlog: RunLog | None = None
        self.summary: dict[str, Any] = {}
        self._wall_start = time.time()
        self._warned: set[int] = set()

    # ------------------------------------------------------------------ entering the run
    def __enter__(self) -> Bookkeeper:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_config_yaml(self.run_dir, self.cfg)
        return self

    def attach(self, run: Run) -> None:
        """Resume from the checkpoint (resume=true), share the run state with a real swarm, open the log."""
        self.run = run
        cfg, group, strategy, averager = self.cfg, run.group, run.strategy, run.averager
        resume_step = self._resume() if cfg.resume else None
        if averager.shares_run_state:
            # A peer joining a running swarm starts from a live peer's state; every peer serves its own at round
            # boundaries and reloads the swarm's after a missed round (see comm/hivemind.py).
            if not isinstance(group, WorkerGroup):
                raise ValueError(f"backend={cfg.backend.name} needs backend.execution=sequential")
            averager.attach_run_state(
                lambda: swarm_state(group, strategy, self.counters),
                lambda s: load_swarm_state(s, group, strategy, self.counters),
                rounds=self.counters.rounds,
            )
        self.runlog = RunLog(self.run_dir, cfg, resume_step=resume_step)
        log.info("%s | model %.2fM params | %s", run.data.description, run.model.num_params() / 1e6, run.device)
        self.bar = Progress(cfg.train.max_steps, group.step, cfg.name, cfg.train.progress, cfg.train.progress_every)
        self._loop_start, self._tokens_at_start = time.time(), self.counters.tokens

    def _resume(self) -> int:
        assert self.run is not None
        ckpt = load_checkpoint(self.run_dir)
        if ckpt is None:
            raise FileNotFoundError(
                f"resume=true but {self.run_dir / CHECKPOINT_NAME} does not exist "
                "(set train.checkpoint_every=N to write checkpoints, or drop resume=true)"
            )
        if ckpt["config_hash"] != config_hash(self.cfg):
            raise ValueError(
                f"resume=true: the checkpoint in {self.run_dir} was written by a different config "
                f"(hash {ckpt['config_hash']} != {config_hash(self.cfg)}); resume with the same overrides"
            )
        self.run.group.load_state_dict(ckpt["group"])
        self.run.strategy.load_state_dict(ckpt["strategy"])
        self.run.averager.load_state_dict(ckpt["averager"])
        self.counters.load_state_dict(ckpt["counters"])
        log.info("resumed from %s at step %d", self.run_dir / CHECKPOINT_NAME, self.run.group.step)
        return self.run.group.step

    # ------------------------------------------------------------------ one round
    def record(self, report: RoundReport) -> None:
        assert self.run is not None and self.runlog is not None
        cfg, c = self.cfg, self.counters
        step = self.run.group.step
        step0, tokens0 = step - report.steps, c.tokens
        c.rounds += 1
        c.outer_steps += int(report.outer_step)
        c.tokens += report.tokens
        for comm in report.comms:
            c.bytes_sent += comm.bytes_sent
            c.bytes_received += comm.bytes_received
            c.compression_ratio = comm.compression_ratio
            c.since_row["bytes_sent"] += comm.bytes_sent
            c.since_row["bytes_received"] += comm.bytes_received
            for rank, reason in comm.rejected.items():
                c.rejected.append({"rank": rank, "reason": reason, "key": comm.key})
                first = rank not in self._warned  # the first rejection of a rank is a warning; rows keep them all
                self._warned.add(rank)
                (log.warning if first else log.debug)(
                    "round %d (%s): rank %s's contribution rejected: %s%s", c.rounds, comm.key, rank, reason,
                    " (further rejections are in metrics.jsonl)" if first else "",
                )  # fmt: skip
            c.rejections += len(comm.rejected)
        # The strategy priced the round on its timeline (modelled on sim; a real backend's exchanges measured).
        c.comm_seconds += report.cost.comm_seconds
        c.compute_seconds += report.cost.busy_seconds
        c.sim_seconds += report.cost.seconds
        self._pipeline_stats()
        c.since_row["comm_seconds"] += report.cost.comm_seconds

        val_loss = None
        interval = cfg.train.eval_interval
        if step // interval > c.last_eval_step // interval or step >= cfg.train.max_steps:
            val_loss = self._evaluate()
            c.last_eval_step = step
        self._rows(report, step0, tokens0, val_loss)
        if self.on_round is not None:
            self.on_round(report, step)
        self._progress(report, step - step0)
        every = cfg.train.checkpoint_every
        if every > 0 and report.outer_step and c.outer_steps % every == 0:
            self.checkpoint()
        self.run.averager.round_boundary()  # a real swarm: serve state requests, publish progress, resync
        if self.stop_after_step is not None and self.stop_after_step <= step < cfg.train.max_steps:
            raise KeyboardInterrupt(f"stop_after_step={self.stop_after_step}")

    def _pipeline_stats(self) -> None:
        """A pipeline's bytes between stages (per peer), failed calls and moved peers go into the rows like the
        sync fields; its micro-batches per stage slot and its peers per stage into the summary."""
        stats = self.run.group.take_stats()
        if not stats:
            return
        c = self.counters
        for key in ("activation_bytes", "stage_failures", "microbatches", "lost_microbatches"):
            if key in stats:  # the last two: a real swarm's stage peer (pipeline/peer.py)
                c.since_row[key] = c.since_row.get(key, 0.0) + stats[key]
        c.activation_bytes += stats["activation_bytes"]
        c.stage_failures += stats["stage_failures"]
        c.stage_moves += stats["stage_moves"]
        c.rebalance_bytes += stats["rebalance_bytes"]
        c.stage_peers = stats["stage_peers"]
        if stats["stage_moves"]:
            c.since_row["stage_moves"] = c.since_row.get("stage_moves", 0.0) + stats["stage_moves"]
        load = stats["stage_load"]
        total = c.stage_load or [[0] * len(row) for row in load]
        c.stage_load = [[a + b for a, b in zip(x, y, strict=True)] for x, y in zip(total, load, strict=True)]

    def _evaluate(self) -> float:
        assert self.run is not None
        val_loss = self.run.evaluate(self.run.strategy.global_params())
        self.counters.val_loss = val_loss
        return val_loss

    def _rows(self, report: RoundReport, step0: int, tokens0: float, val_loss: float | None) -> None:
        assert self.run is not None and self.runlog is not None
        cfg, c = self.cfg, self.counters
        step, max_steps = self.run.group.step, cfg.train.max_steps
        per_step_tokens = report.tokens / max(1, report.steps)
        comm = report.comm
        for i, losses in enumerate(report.losses):
            s = step0 + i + 1
            last = s == step
            # Rows every log_interval steps, plus the end of every round that is not a one-step synchronous one
            # (each diloco outer step, each streaming fragment's merge), so every sync row reaches the log.
            if not (s % cfg.train.log_interval == 0 or last and (not report.synchronous or step >= max_steps)):
                continue
            row: dict[str, Any] = {
                "step": s,
                "outer_step": c.outer_steps if last else c.outer_steps - int(report.outer_step),
                "tokens": tokens0 + per_step_tokens * (i + 1),
                "loss": mean_active(losses),
            }
            if len(losses) > 1:
                row["worker_loss"] = losses
            if last:
                row.update(c.since_row)
                row.update(lr=self.run.group.lr, bytes_sent_total=c.bytes_sent, sim_seconds=c.sim_seconds,
                           **report.extras)  # fmt: skip
                if comm is not None:
                    row.update(group_size=comm.group_size, compression_ratio=comm.compression_ratio)
                c.since_row = dict.fromkeys(c.since_row, 0.0)
                if c.rejected:
                    row["rejected"], c.rejected = c.rejected, []
                if val_loss is not None:
                    row["val_loss"] = val_loss
            self.runlog.log(row)
        logged_last = step % cfg.train.log_interval == 0 or not report.synchronous or step >= max_steps
        if val_loss is not None and not logged_last:
            self.runlog.log({"step": step, "outer_step": c.outer_steps, "tokens": c.tokens,
                             "loss": mean_active(report.losses[-1]), "val_loss": val_loss})  # fmt: skip

    def _progress(self, report: RoundReport, steps: int) -> None:
        elapsed = time.time() - self._loop_start
        val = self.counters.val_loss
        self.bar.update(
            steps,
            loss=f"{mean_active(report.losses[-1]):.3f}",
            val=f"{val:.3f}" if val is not None else "-",
            tok_s=f"{(self.counters.tokens - self._tokens_at_start) / max(elapsed, 1e-9):.0f}",
        )

    def checkpoint(self) -> None:
        assert self.run is not None
        save_checkpoint(
            self.run_dir,
            {
                "config_hash": config_hash(self.cfg),
                "group": self.run.group.state_dict(),
                "strategy": self.run.strategy.state_dict(),
                "averager": self.run.averager.state_dict(),
                "counters": self.counters.state_dict(),
            },
        )

    # ------------------------------------------------------------------ leaving the run
    def finish(self) -> dict[str, Any]:
        """The loop ended normally: final checkpoint and the summary (``failed`` if the loss is not finite)."""
        self.bar.close()
        assert self.run is not None
        timeline = self.run.strategy.timeline
        before = timeline.now
        timeline.drain()  # exchanges still on the (modelled) network end the run when they are done
        self.counters.sim_seconds += timeline.now - before
        if self.cfg.train.checkpoint_every > 0:
            self.checkpoint()
        val = self.counters.val_loss
        if val is None or math.isfinite(val):
            self.summary = self._summary("ok")
        else:
            self.summary = self._summary("failed", f"the final validation loss is {val}: training diverged")
        self._write_summary()
        return self.summary

    def __exit__(self, kind, error, tb) -> bool:
        try:
            if isinstance(error, KeyboardInterrupt):
                self.summary = self._summary(
                    "failed", "interrupted (Ctrl+C); continue with resume=true from the last checkpoint"
                )
                self._write_summary()
            elif error is not None:
                self.summary = self._summary("failed", f"{type(error).__name__}: {error}")
                self._write_summary()
        finally:
            if self.runlog is not None:
                self.runlog.close()
            averager = self.run.averager if self.run is not None else self._averager
            if averager is not None:
                averager.close()
        return False

    def _summary(self, status: str, error: str | None = None) -> dict[str, Any]:
        cfg, c = self.cfg, self.counters
        wall = time.time() - self._wall_start
        sim_seconds = c.sim_seconds if BackendName(cfg.backend.name) == BackendName.sim else wall
        s = {
            "status": status,
            "final_val_loss": c.val_loss,
            "tokens": c.tokens,
            "steps": self.run.group.step if self.run is not None else 0,
            "outer_steps": c.outer_steps,
            "rounds": c.rounds,
            "rejections": c.rejections,
            "bytes_sent_total": c.bytes_sent,
            "bytes_received_total": c.bytes_received,
            **(
                {
                    "activation_bytes_total": c.activation_bytes,
                    "stage_failures": c.stage_failures,
                    "stage_load": c.stage_load,
                    "stage_moves": c.stage_moves,
                    "rebalance_bytes": c.rebalance_bytes,
                    "stage_peers": c.stage_peers,
                }
                if cfg.pipeline.stages > 1
                else {}
            ),
            "comm_seconds": c.comm_seconds,
            "compression_ratio": c.compression_ratio,
            "wall_seconds": wall,
            "sim_seconds": sim_seconds,
            "compute_utilisation": c.compute_seconds / sim_seconds if sim_seconds > 0 else 0.0,
            "tokens_per_second": c.tokens / wall if wall > 0 else 0.0,
            "workers": cfg.workers,
            "algorithm": to_dict(cfg.algorithm.name),
            "name": cfg.name,
            "git_sha": git_sha(),
            "config_hash": config_hash(cfg),
        }
        if error is not None:
            s["error"] = error
        return s

    def _write_summary(self) -> None:
        if self.runlog is not None:
            self.runlog.write_summary(self.summary)
        else:
            text = json.dumps(self.summary, indent=2, sort_keys=True, default=str) + "\n"
            atomic_write_text(self.run_dir / "summary.json", text)
