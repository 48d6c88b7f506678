"""Strategy: *when* to synchronise, *what* to average and how to merge it.

A strategy drives a ``WorkerGroup`` (the workers of this process) and an ``Averager`` (whatever backend), one
round at a time, and it alone knows the round's structure: which steps ran, which exchanges were started and
awaited, what overlapped. So it books them on its ``Timeline`` (the modelled clock) and returns a
``RoundReport`` with the round's cost; the trainer only records reports. It never knows which backend runs
under it.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from locoswarm.comm.base import DEFAULT_KEY, Averager, Finished, Handle, Round
from locoswarm.config import NetworkConfig, OuterOptimizerConfig
from locoswarm.faults import PhasePlan, PhasePlanner
from locoswarm.netsim import NetworkModel
from locoswarm.outer import OuterOptimizer
from locoswarm.timeline import Cost, Timeline
from locoswarm.worker import WorkerGroup


@dataclass
class RoundReport:
    steps: int  # inner steps each worker took this round
    losses: list[list[float]]  # [steps][local workers]
    compute_seconds: list[float]  # measured compute per local worker
    comms: list[Round]  # the averaging rounds that completed in this round, in completion order
    outer_step: bool  # an outer update was applied (diloco's; each ddp step); false for warm-up syncs
    tokens: float  # tokens trained on in this round, over every worker of the run
    cost: Cost  # the round's modelled wall-clock, busy compute and network time (the strategy's timeline)
    extras: dict = field(default_factory=dict)  # per-round diagnostics logged with the sync row
    synchronous: bool = False  # a one-step synchronous round (ddp, a warm-up step): rows follow log_interval

    @property
    def comm(self) -> Round | None:
        """The last completed averaging round (None if none completed in this round)."""
        return self.comms[-1] if self.comms else None


@dataclass
class Phase:
    """An inner phase as it ran: the plan, the steps (the longest worker's), losses and measured compute."""

    plan: PhasePlan
    steps: int
    losses: list[list[float]]
    seconds: list[float]

    @property
    def counts(self) -> list[int]:
        return self.plan.counts


@torch.no_grad()
def pseudo_gradient_stats(pseudo: list[torch.Tensor]) -> dict:
    """Per-worker pseudo-gradient norms and the mean pairwise cosine similarity between workers."""
    flat = torch.cat([p.reshape(p.shape[0], -1).float() for p in pseudo], dim=1)  # (L, P)
    norms = flat.norm(dim=1)
    stats = {"pg_norm": norms.tolist()}
    if flat.shape[0] > 1:
        unit = flat / norms.clamp_min(1e-30)[:, None]
        cos = unit @ unit.T  # (L, L)
        n = cos.shape[0]
        stats["pg_cosine"] = float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))
    return stats


def tensor_norm(tensors: Sequence[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.float() ** 2).sum() for t in tensors)))


class Strategy(ABC):
    """Holds what every strategy needs: the group, the averager, the planner (who trains how many steps in a
    round: churn, stragglers, time budgets) and the timeline the rounds are priced on."""

    def __init__(
        self,
        group: WorkerGroup,
        averager: Averager,
        planner: PhasePlanner | None = None,
        timeline: Timeline | None = None,
        inner_steps: int = 1,
    ):
        self.group = group
        self.averager = averager
        if planner is None:  # no faults, no budget: every worker runs the steps asked for
            network = NetworkModel(NetworkConfig(), max(group.ranks) + 1)
            planner = PhasePlanner(network, group.ranks, inner_steps)
        self.planner = planner
        self.timeline = timeline if timeline is not None else Timeline(planner.network)

    @abstractmethod
    def round(self, remaining: int) -> RoundReport:
        """Advance by one round of at most ``remaining`` inner steps."""

    def global_params(self) -> list[torch.Tensor]:
        """The parameters to evaluate: the model every worker agrees on at a round boundary."""
        return self.group.params(0)

    # ------------------------------------------------------------------ building blocks for subclasses
    def _phase(self, steps: int) -> Phase:
        """Up to ``steps`` inner steps per worker, as the planner allots them; booked on the timeline."""
        plan = self.planner.plan(steps)
        losses, seconds = self.group.inner_steps(plan.steps, plan.counts)
        self.planner.observe(plan.counts, seconds)
        self.timeline.compute(plan, seconds)
        return Phase(plan, plan.steps, losses, seconds)

    def _start(self, tensors: list[torch.Tensor], weights: torch.Tensor, key: str = DEFAULT_KEY) -> InFlight:
        """Start an averaging round now (on the timeline too)."""
        handle = self.averager.start(tensors, weights, key=key, ranks=self.group.ranks)
        return InFlight(handle, self.timeline.now)

    def _wait(self, flight: InFlight) -> Round:
        """The workers need the round's result now: block until it is done (on the timeline too)."""
        result = flight.handle.wait()
        self.timeline.wait(self.timeline.exchange(flight.started_at, result.seconds))
        return result

    def _sync_round(self) -> RoundReport:
        """One synchronous data-parallel step: every worker's gradient, averaged (token-weighted), applied by all.
        An absent worker (churn) has weight 0 and its gradient is dropped; it still applies the group's step,
        i.e. rejoins from the current params."""
        plan = self.planner.plan(1, sync=True)
        losses, grads, seconds = self.group.compute_grads()
        self.timeline.compute(plan, seconds)
        weights = self.group.tokens_per_step() * torch.tensor(plan.counts, dtype=torch.float64)
        comm = self._wait(self._start(grads, weights))
        self.group.apply_grads(comm.tensors)
        report = self._report(1, [losses], seconds, [comm], outer_step=False, tokens=comm.total_weight)
        report.synchronous = True
        return report

    def _report(
        self,
        steps: int,
        losses: list[list[float]],
        seconds: list[float],
        comms: list[Round],
        outer_step: bool,
        tokens: float,
        extras: dict | None = None,
    ) -> RoundReport:
        return RoundReport(steps, losses, seconds, comms, outer_step, tokens, self.timeline.since_mark(), extras or {})

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"planner": self.planner.state_dict(), "timeline": self.timeline.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.planner.load_state_dict(state["planner"])
        self.timeline.load_state_dict(state["timeline"])


class ReplicaStrategy(Strategy):
    """A strategy whose workers each keep their own anchor (replica of the outer model) and outer-optimiser state:
    eager updates, NoLoCo. Stacked, (L, *shape): the outer optimisers are elementwise, so one over (L, *shape)
    tensors is L of them. A synchronous warm-up round resets every anchor to its worker's params; the model
    evaluated is the first local worker's anchor."""

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
        if inner_steps < 1:
            raise ValueError(f"algorithm.inner_steps={inner_steps} is invalid: H must be >= 1")
        super().__init__(group, averager, planner, timeline, inner_steps)
        self.inner_steps, self.warmup_sync_steps = inner_steps, warmup_sync_steps
        self.anchors = [a.detach().unsqueeze(0).repeat(group.size, *([1] * a.dim())) for a in anchor]
        self.outer = OuterOptimizer(self.anchors, outer)

    def _warmup_round(self) -> RoundReport:
        report = self._sync_round()
        with torch.no_grad():  # the local phase starts from the warmed-up params
            for i, a in enumerate(self.anchors):
                a.copy_(torch.stack([self.group.params(j)[i] for j in range(self.group.size)]))
        return report

    def global_params(self) -> list[torch.Tensor]:
        if self.group.step <= self.warmup_sync_steps:
            return self.group.params(0)
        return [a[0] for a in self.anchors]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "anchors": [a.detach().clone() for a in self.anchors],
                "outer": self.outer.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            for a, s in zip(self.anchors, state["anchors"], strict=True):
                a.copy_(s)
        self.outer.load_state_dict(state["outer"])


@dataclass
class InFlight:
    """An averaging round a strategy started and has not yet used."""

    handle: Handle
    started_at: float  # on the strategy's timeline

    def state_dict(self) -> dict:
        """Waits for the round (a checkpoint holds its result, not a connection) and returns plain data."""
        result = self.handle.wait()
        self.handle = Finished(result)
        return {"started_at": self.started_at, "round": dataclasses.asdict(result)}

    @classmethod
    def from_state(cls, state: dict) -> InFlight:
        """A saved round, finished: a resume uses it at the step it was due, exactly as the run would have."""
        return cls(Finished(Round(**state["round"])), state["started_at"])
