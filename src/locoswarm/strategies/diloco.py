"""diloco: H local steps per worker, then one outer step on the token-weighted mean pseudo-gradient.

DiLoCo (Douillard et al., 2023): every worker starts a phase from the shared anchor, runs H inner steps,
sends (anchor − local params), and all apply the same outer optimiser step to the anchor. Inner optimiser
state stays local across phases. ``warmup_sync_steps`` inner steps are first trained synchronously.

With a ``PhasePlanner`` each phase follows its plan: per-worker step counts (a time budget: as many steps as fit
each worker's modelled speed) and churn (an absent worker runs 0 steps and has weight 0); the average weights
every worker by the tokens it processed, and every worker, absent ones included, restarts from the new anchor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from locoswarm.comm.base import Averager
from locoswarm.faults import PhasePlanner
from locoswarm.outer import OuterOptimizer
from locoswarm.strategies.base import RoundReport, Strategy, pseudo_gradient_stats, sync_step
from locoswarm.worker import WorkerGroup


class DiLoCo(Strategy):
    def __init__(
        self,
        group: WorkerGroup,
        averager: Averager,
        anchor: Sequence[torch.Tensor],
        outer: OuterOptimizer,
        inner_steps: int,
        warmup_sync_steps: int = 0,
        planner: PhasePlanner | None = None,
    ):
        super().__init__(group, averager)
        if inner_steps < 1:
            raise ValueError(f"algorithm.inner_steps={inner_steps} is invalid: H must be >= 1")
        self.anchor = list(anchor)
        self.outer = outer
        self.inner_steps = inner_steps
        self.warmup_sync_steps = warmup_sync_steps
        self.planner = planner

    def round(self, remaining: int) -> RoundReport:
        if self.group.step < self.warmup_sync_steps:
            counts = self.planner.plan(1, sync=True).counts if self.planner is not None else None
            return sync_step(self.group, self.averager, counts)
        # A phase starts from the params every worker shares; after a warm-up this is where the anchor moves.
        with torch.no_grad():
            for a, p in zip(self.anchor, self.group.params(0), strict=True):
                a.copy_(p)
        if self.planner is None:
            n = min(self.inner_steps, remaining)
            counts = [n] * self.group.size
        else:
            counts = self.planner.plan(remaining).counts
            n = max(counts)
        losses, seconds = self.group.inner_steps(n, counts)
        if self.planner is not None:
            self.planner.observe(counts, seconds)
        pseudo = self.group.pseudo_gradients(self.anchor)  # [(L, *shape)]
        extras = pseudo_gradient_stats(pseudo)
        if len(set(counts)) > 1:
            extras["worker_steps"] = counts
        steps = torch.tensor(counts, dtype=torch.float64)
        comm = self.averager.average(pseudo, self.group.tokens_per_step() * steps)
        self.outer.step(comm.tensors)
        self.group.load_params(self.anchor)
        extras["outer_grad_norm"] = float(torch.sqrt(sum((t.float() ** 2).sum() for t in comm.tensors)))
        return RoundReport(steps=n, losses=losses, compute_seconds=seconds, comm=comm, outer_step=True, extras=extras)

    def state_dict(self) -> dict:
        state = {"anchor": [a.detach().clone() for a in self.anchor], "outer": self.outer.state_dict()}
        if self.planner is not None:
            state["planner"] = self.planner.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for a, s in zip(self.anchor, state["anchor"], strict=True):
                a.copy_(s)
        self.outer.load_state_dict(state["outer"])
        if self.planner is not None and "planner" in state:
            self.planner.load_state_dict(state["planner"])
