"""diloco with ``algorithm.outer_delay=1 algorithm.eager=true``: eager outer updates (Kale, Douillard and Donchev
2025, "Eager Updates For Overlapped Communication and Computation in DiLoCo").

With a one-phase delay (``diloco.py``) every worker waits a whole phase before any of its progress reaches the
anchor. Eager updates apply a worker's *own* pseudo-gradient at once, as the stand-in for its part of the average
that is still on the network, and the *others'* parts one phase late, when their average arrives:

    g_m(t) = s_m Δ_m(t) + [ Δ̄(t-1) − s_m(t-1) Δ_m(t-1) ]          anchor_m ← OuterOpt_m(anchor_m, g_m(t))

where Δ̄(t-1) is the group's average of the previous phase (share-weighted, s_m = worker m's share). Every
contribution is applied exactly once: a worker's own at the end of its phase, everyone else's one phase later. The
last phase waits for its average and applies it whole, with nothing left outstanding. Workers therefore hold
slightly different anchors (each has its own fresh part), so each has its own anchor and outer-optimiser state
(stacked: the outer optimisers are elementwise, so one optimiser over (L, *shape) tensors is L of them), and the
model evaluated is the first local worker's anchor.

Shares: on sim every worker's share is known from the local weights; a real peer (one worker) takes its share
of the last completed round (1/K before the first), since this round's total is still on the network.

Identity (tests/test_outer_delay.py): with one worker, g(t) = Δ(t) + (Δ(t-1) − Δ(t-1)) = Δ(t) exactly, so eager
with K=1 is DiLoCo with K=1, with no special case here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from locoswarm.comm.base import Averager, Round
from locoswarm.config import OuterOptimizerConfig
from locoswarm.faults import PhasePlanner
from locoswarm.outer import OuterOptimizer
from locoswarm.strategies.base import InFlight, ReplicaStrategy, RoundReport, pseudo_gradient_stats, tensor_norm
from locoswarm.timeline import Timeline
from locoswarm.worker import WorkerGroup


class EagerDiLoCo(ReplicaStrategy):
    def __init__(
        self,
        group: WorkerGroup,
        averager: Averager,
        anchor: Sequence[torch.Tensor],
        outer: OuterOptimizerConfig,
        inner_steps: int,
        warmup_sync_steps: int = 0,
        planner: PhasePlanner | None = None,
        timeline: Timeline | None = None,
    ):
        super().__init__(group, averager, anchor, outer, inner_steps, warmup_sync_steps, planner, timeline)
        self.pending: InFlight | None = None  # the previous phase's averaging
        self.own: list[torch.Tensor] | None = None  # s_m Δ_m of the previous phase, stacked, as applied

    def round(self, remaining: int) -> RoundReport:
        if self.group.step < self.warmup_sync_steps:
            return self._warmup_round()
        phase = self._phase(remaining)
        pseudo = self.group.pseudo_gradients_each(self.anchors)  # [(L, *shape)]
        extras = pseudo_gradient_stats(pseudo)
        weights = self.group.tokens_per_step() * torch.tensor(phase.plan.claims, dtype=torch.float64)
        flight = self._start(pseudo, weights)
        comms: list[Round] = []
        previous = self._wait(self.pending) if self.pending is not None else None
        comms += [previous] if previous is not None else []
        if phase.steps >= remaining:  # the last phase: wait for this average and apply it whole
            current = self._wait(flight)
            comms.append(current)
            own = [torch.zeros_like(p) for p in pseudo]
            update = [m.unsqueeze(0).expand_as(p).clone() for m, p in zip(current.tensors, pseudo, strict=True)]
            self.pending = None
        else:
            shares = self._shares(weights, previous)
            own = [p * shares.view(-1, *([1] * (p.dim() - 1))).to(p.dtype) for p in pseudo]
            update = [o.clone() for o in own]
            self.pending = flight
        if previous is not None:  # the others' part of the previous phase: its average minus our own part of it
            assert self.own is not None
            for u, avg, mine in zip(update, previous.tensors, self.own, strict=True):
                u.add_(avg.unsqueeze(0) - mine)
        self.own = own
        self.outer.step(update)
        self.group.load_params_each(self.anchors)
        extras["outer_grad_norm"] = tensor_norm([u[0] for u in update])
        extras.update(OuterOptimizer.norms([self.outer]))  # over the L stacked local optimisers
        tokens = sum(c.total_weight for c in comms)
        return self._report(phase.steps, phase.losses, phase.seconds, comms, True, tokens, extras)

    def _shares(self, weights: torch.Tensor, previous: Round | None) -> torch.Tensor:
        """Each local worker's share of this round's average (see the module docstring)."""
        workers = self.planner.network.workers
        if self.group.size == workers:  # every worker is here: the exact shares
            return weights / weights.sum()
        total = previous.total_weight if previous is not None else float(weights.sum()) * workers / self.group.size
        return weights / total

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "pending": self.pending.state_dict() if self.pending is not None else None,
            "own": [o.clone() for o in self.own] if self.own is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.pending = InFlight.from_state(state["pending"]) if state["pending"] is not None else None
        self.own = [o.clone() for o in state["own"]] if state["own"] is not None else None
