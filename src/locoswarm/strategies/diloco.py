"""diloco: H local steps per worker, then one outer step on the token-weighted mean pseudo-gradient.

DiLoCo (Douillard et al., 2023): every worker starts a phase from the shared anchor, runs H inner steps,
sends (anchor − local params), and all apply the same outer optimiser step to the anchor. Inner optimiser
state stays local across phases. ``warmup_sync_steps`` inner steps are first trained synchronously.

The planner decides each phase: per-worker step counts (a time budget: as many steps as fit each worker's
modelled speed) and churn (an absent worker runs 0 steps and has weight 0); the average weights every worker by
the tokens it processed, and every worker, absent ones included, restarts from the new anchor.

``outer_delay=1`` (Kale et al. 2025, "Eager Updates For Overlapped Communication and Computation in DiLoCo",
their naive one-step-delayed variant): a phase's averaging is started and the next phase begins at once, from the
anchor as it is; the average is applied by the outer optimiser one phase later, so the exchange overlaps a whole
phase of compute. The first phase applies nothing; the last applies both outstanding averages, so every
pseudo-gradient is applied exactly once. ``outer_delay=0`` is DiLoCo.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from locoswarm.comm.base import Averager
from locoswarm.faults import PhasePlan, PhasePlanner
from locoswarm.outer import OuterOptimizer
from locoswarm.strategies.base import InFlight, RoundReport, Strategy, pseudo_gradient_stats, tensor_norm
from locoswarm.timeline import Timeline
from locoswarm.verify import Verifier
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
        timeline: Timeline | None = None,
        outer_delay: int = 0,
        verifier: Verifier | None = None,
    ):
        if inner_steps < 1:
            raise ValueError(f"algorithm.inner_steps={inner_steps} is invalid: H must be >= 1")
        if outer_delay not in (0, 1):
            raise ValueError(f"algorithm.outer_delay={outer_delay} is invalid: 0 (DiLoCo) or 1 (one phase late)")
        super().__init__(group, averager, planner, timeline, inner_steps)
        self.outer_delay = outer_delay
        self.pending: InFlight | None = None  # outer_delay=1: the previous phase's averaging
        self.verifier = verifier  # verify.fraction > 0: spot-checks by replay (verify.py)
        self.anchor = list(anchor)
        self.outer = outer
        self.inner_steps = inner_steps
        self.warmup_sync_steps = warmup_sync_steps

    def round(self, remaining: int) -> RoundReport:
        if self.group.step < self.warmup_sync_steps:
            return self._sync_round()
        # A phase starts from the params every worker shares; after a warm-up this is where the anchor moves.
        with torch.no_grad():
            for a, p in zip(self.anchor, self.group.params(0), strict=True):
                a.copy_(p)
        number = self.planner.round
        v = self.verifier
        if v is not None:
            v.phase_starts(self.group, number)
        # No Averager.prepare here yet: a group formed during the phase fails its round when a member dies in the
        # phase (the 4-peer churn soak failed with it); it wants a way to leave the dead member out first.
        phase = self._phase(remaining)
        pseudo = self.group.pseudo_gradients(self.anchor)  # [(L, *shape)]
        extras = pseudo_gradient_stats(pseudo)
        if len(set(phase.counts)) > 1:
            extras["worker_steps"] = phase.counts
        failed: dict[int, str] = {}
        if v is not None:
            checks = v.checks
            failed = v.before_round(self.group, self.anchor, phase.plan.claims, pseudo, number)
        # after the phase (a later pipeline stage counts the tokens it served) and the checks (a worker banned just
        # now is left out of this round too)
        weights = self._weights(phase.plan)
        due = [self._start(pseudo, weights)]
        if self.outer_delay:  # apply the previous phase's average now, this one's next phase (or now, at the end)
            due, self.pending = ([self.pending] if self.pending else []), due[0]
            if phase.steps >= remaining:  # the last phase: nothing follows to overlap with
                due, self.pending = [*due, self.pending], None
        comms = [self._wait(flight) for flight in due]
        if v is not None:  # from the anchor the phase started at: before the outer step moves it
            failed.update(v.after_round(self.anchor, number))
            extras["verified"] = v.checks - checks
            if failed:  # the evidence, in this phase's sync row
                extras["verification_failed"] = dict(sorted(failed.items()))
        for comm in comms:
            self.outer.step(comm.tensors)
        self.group.load_params(self.anchor)
        if comms:
            extras["outer_grad_norm"] = tensor_norm(comms[-1].tensors)
            extras.update(OuterOptimizer.norms([self.outer]))
        tokens = sum(c.total_weight for c in comms)  # the group's, counted when its average is applied
        return self._report(phase.steps, phase.losses, phase.seconds, comms, bool(comms), tokens, extras)

    def _weights(self, plan: PhasePlan) -> torch.Tensor:
        """Every worker is weighted by the tokens it claims (a lazy one claims more than it ran: verification); a
        banned worker by 0, in this and every later round."""
        weights = self.group.tokens_per_step() * torch.tensor(plan.claims, dtype=torch.float64)
        if self.verifier is not None:
            for j, r in enumerate(self.group.ranks):
                if r in self.verifier.banned:
                    weights[j] = 0.0
        return weights

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "anchor": [a.detach().clone() for a in self.anchor],
            "outer": self.outer.state_dict(),
            "pending": self.pending.state_dict() if self.pending is not None else None,
            "verifier": self.verifier.state_dict() if self.verifier is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            for a, s in zip(self.anchor, state["anchor"], strict=True):
                a.copy_(s)
        self.outer.load_state_dict(state["outer"])
        self.pending = InFlight.from_state(state["pending"]) if state["pending"] is not None else None
        if self.verifier is not None:
            self.verifier.load_state_dict(state["verifier"])
