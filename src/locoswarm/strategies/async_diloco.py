"""async_diloco: no barrier. Each worker's pseudo-gradient reaches the global model when that worker is done, and the
worker carries on from the model as it is then (Liu et al. 2024, "Asynchronous Local-SGD Training for Language
Modeling").

Event-driven on the modelled clock. A worker's phase: it pulls the global model φ (version v), trains H inner steps
(its own modelled speed: ``network.compute_speed``, straggler slowdowns and churn from the fault schedule, per
worker phase), pushes Δ = φ_v − θ through its codec over its own uplink, and the update is applied when it
arrives:

    φ <- OuterOpt(φ, s·Δ),   s = the worker's tokens ÷ the tokens of one synchronous round (H steps of every worker)

so at equal speeds K arrivals move φ as far as one DiLoCo step of their average would. The worker then pulls the
new φ over its downlink and starts again. Arrivals at the same instant are applied in rank order, each worker
pulling right after its own update. Staleness (updates applied since the worker pulled) is logged per arrival.

- ``algorithm.momentum_delay=N`` (with outer nesterov): delayed Nesterov (``outer.DelayedNesterov``); N = 1 is
  plain Nesterov on every arrival.
- ``algorithm.dynamic_steps=true``: dynamic local updates, H_k = max(1, round(H · v_k / v_max)) with v_k the
  worker's speed in that phase (speed ÷ straggler slowdown), so phases of unequal workers end together.

A worker's phase is computed when it starts (its result depends only on the model it pulled and its data), kept
with its arrival time, and applied at that time. A round of this strategy runs events until the furthest worker
has trained further (so every round moves ``group.step``); when the step budget is reached no new phase starts and
every phase in flight is applied, in arrival order. The model evaluated is the global φ.

On sim the pull is the fp32 model (4 bytes per parameter); the push is the codec's payload. The schedule is
deterministic for a seed when ``network.step_seconds`` is set (conf/experiment/heterogeneous.yaml sets it); with
it null a phase lasts what this machine measured, so the order of arrivals, and the numbers, vary run to run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from locoswarm.comm.base import DEFAULT_KEY, Averager, Round
from locoswarm.config import OuterOptimizerConfig, OuterOptimizerName
from locoswarm.faults import PhasePlan, PhasePlanner
from locoswarm.outer import DelayedNesterov, OuterOptimizer
from locoswarm.strategies.base import RoundReport, Strategy, tensor_norm
from locoswarm.timeline import Timeline
from locoswarm.worker import WorkerGroup

log = logging.getLogger(__name__)


@dataclass
class _Flight:
    """A worker's phase between its start and the moment its update reaches the global model."""

    worker: int  # local index
    version: int  # the global model's version it started from
    arrives_at: float  # on the modelled clock
    pull_seconds: float  # then it fetches the global model: its next phase starts this much later
    steps: int
    tokens: float
    update: list[torch.Tensor]  # its decoded pseudo-gradient (what the global model receives)
    comm: Round  # its push and pull, as the books count them

    def state_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "comm"},
                "comm": dataclasses.asdict(self.comm)}  # fmt: skip

    @classmethod
    def from_state(cls, s: dict) -> _Flight:
        return cls(**{**s, "comm": Round(**s["comm"])})


def async_outer(
    anchor: Sequence[torch.Tensor], outer: OuterOptimizerConfig, momentum_delay: int
) -> OuterOptimizer | DelayedNesterov:
    """The global model's outer optimiser, on sim and on a real swarm's holder alike: delayed Nesterov for
    ``outer_optimizer=nesterov`` (N = 1: Nesterov on every update), else the configured one."""
    if OuterOptimizerName(outer.name) == OuterOptimizerName.nesterov:
        return DelayedNesterov(anchor, outer, momentum_delay)
    if momentum_delay != 1:
        raise ValueError(f"algorithm.momentum_delay={momentum_delay} needs outer_optimizer=nesterov")
    return OuterOptimizer(anchor, outer)


class AsyncDiLoCo(Strategy):
    def __init__(
        self,
        group: WorkerGroup,
        averager: Averager,
        anchor: Sequence[torch.Tensor],
        outer: OuterOptimizerConfig,
        inner_steps: int,
        momentum_delay: int = 1,
        dynamic_steps: bool = False,
        warmup_sync_steps: int = 0,
        planner: PhasePlanner | None = None,
        timeline: Timeline | None = None,
    ):
        if inner_steps < 1:
            raise ValueError(f"algorithm.inner_steps={inner_steps} is invalid: H must be >= 1")
        super().__init__(group, averager, planner, timeline, inner_steps)
        self.inner_steps, self.warmup_sync_steps, self.dynamic_steps = inner_steps, warmup_sync_steps, dynamic_steps
        self.anchor = list(anchor)  # the global model φ
        self.outer = async_outer(self.anchor, outer, momentum_delay)
        self.version = 0  # updates applied to φ so far
        # what each worker pulled: (L, *shape); its pseudo-gradient is pulled − params at the end of its phase
        self.pulled = [a.detach().unsqueeze(0).repeat(group.size, *([1] * a.dim())) for a in anchor]
        self.phase_of = [0] * group.size  # each worker's phase number (its fault-schedule round): set at the start
        self.pulled_version = [0] * group.size  # the version of φ each worker last pulled
        self.flights: list[_Flight] = []
        self.started = False
        if self.planner.network.cfg.step_seconds is None:
            log.warning("async_diloco with network.step_seconds=null: arrivals are ordered by this machine's measured "
                        "step times, so a run is not reproducible bit for bit; set network.step_seconds")  # fmt: skip

    # ------------------------------------------------------------------ a round: events until group.step moves
    def round(self, remaining: int) -> RoundReport:
        if self.group.step < self.warmup_sync_steps:
            return self._sync_round()
        budget = self.group.step + remaining
        before = self.group.step
        losses: dict[int, list[float]] = {}  # worker -> the losses of the phases it started in this round
        seconds = [0.0] * self.group.size
        arrivals, comms = [], []
        if not self.started:  # the first phase of every worker starts from the (warmed-up) global model
            self.started = True
            # the fault schedule's rounds go on from the warm-up's, as every strategy's do (same seed, same faults)
            self.phase_of = [self.planner.round] * self.group.size
            with torch.no_grad():
                for a, p in zip(self.anchor, self.group.params(0), strict=True):
                    a.copy_(p)
            self._pull(range(self.group.size))
            self._begin({j: self.timeline.now for j in range(self.group.size)}, budget, losses, seconds)
        while self.flights and self.group.step <= before:
            self._arrive(budget, losses, seconds, arrivals, comms)
        if self.group.step >= budget:  # the budget is spent: nothing new starts, everything in flight lands
            while self.flights:
                self._arrive(budget, losses, seconds, arrivals, comms, drain=True)
        steps = self.group.step - before
        # row i: the i-th step of every phase started in this round (a lagging worker's steps are not the leader's)
        rows = [[losses[j][i] if i < len(losses.get(j, ())) else math.nan for j in range(self.group.size)]
                for i in range(steps)]  # fmt: skip
        extras: dict = {"arrivals": arrivals}
        if arrivals:
            extras["staleness"] = sum(a["staleness"] for a in arrivals) / len(arrivals)
            extras["outer_grad_norm"] = self._last_update_norm
            extras.update(OuterOptimizer.norms([self.outer]))
        tokens = sum(c.total_weight for c in comms)
        return self._report(steps, rows, seconds, comms, bool(arrivals), tokens, extras)

    def _arrive(self, budget, losses, seconds, arrivals, comms, drain: bool = False) -> None:
        """Apply every update that arrives at the earliest arrival time (rank order), then restart those workers."""
        at = min(f.arrives_at for f in self.flights)
        landing = sorted((f for f in self.flights if f.arrives_at == at), key=lambda f: self.group.ranks[f.worker])
        self.flights = [f for f in self.flights if f.arrives_at != at]
        restart = {}
        share_of_round = float(self.group.tokens_per_step().sum()) * self.inner_steps
        for f in landing:
            if f.steps > 0:
                update = [u * (f.tokens / share_of_round) for u in f.update]
                self.outer.step(update)
                self._last_update_norm = tensor_norm(update)
                arrivals.append({"worker": self.group.ranks[f.worker], "staleness": self.version - f.version,
                                 "steps": f.steps})  # fmt: skip
                self.version += 1
            comms.append(f.comm)  # an absent worker's phase: only its pull (of the model it rejoins with)
            self._pull([f.worker])
            if not drain and self.group.steps[f.worker] < budget:
                restart[f.worker] = at + f.pull_seconds
        self.timeline.event(at)
        if restart:
            self._begin(restart, budget, losses, seconds)

    _last_update_norm = 0.0
    _ratio = 1.0  # the codec's payload ratio of the last push

    def _pull(self, workers) -> None:
        """These workers take the global model as it is now."""
        with torch.no_grad():
            for j in workers:
                for p, a in zip(self.pulled, self.anchor, strict=True):
                    p[j].copy_(a)
                self.pulled_version[j] = self.version
        self.group.load_params_each(self.pulled)  # only the pulled rows changed; the others reload their own

    def _begin(self, starts: dict[int, float], budget: int, losses, seconds) -> None:
        """Start a phase for each worker in ``starts`` (local index -> start time): run it now, price it, and put
        its update in flight."""
        network, ranks = self.planner.network, self.group.ranks
        faults = network.faults
        present = [faults.present(ranks[j], self.phase_of[j]) if j in starts else False for j in range(len(ranks))]
        slowdown = [faults.slowdown(ranks[j], self.phase_of[j]) if j in starts else 1.0 for j in range(len(ranks))]
        fastest = max(network.speed(r) for r in ranks)
        counts = []
        for j, r in enumerate(ranks):
            if not present[j]:
                counts.append(0)
                continue
            h = self.inner_steps
            if self.dynamic_steps:
                h = max(1, round(self.inner_steps * network.speed(r) / slowdown[j] / fastest))
            counts.append(min(h, budget - self.group.steps[j]))
        step_losses, measured = self.group.inner_steps(max(counts, default=0), counts)
        self.planner.observe(counts, measured)
        for j, c in enumerate(counts):
            losses.setdefault(j, []).extend(step_losses[i][j] for i in range(c))
            seconds[j] += measured[j]
        plan = PhasePlan(round=0, ranks=list(ranks), counts=counts, slowdown=slowdown, present=present)
        modelled = network.worker_compute_seconds(plan, measured)
        pseudo = self.group.pseudo_gradients_each(self.pulled)
        weights = self.group.tokens_per_step() * torch.tensor(counts, dtype=torch.float64)
        model_bytes = sum(a.numel() * 4 for a in self.anchor)
        base = self.planner.base_step_seconds() or 0.0
        for j, start in starts.items():
            self.phase_of[j] += 1
            r = ranks[j]
            if counts[j] == 0:  # absent this phase (churn) or out of budget: back after one nominal phase
                idle = self.inner_steps * base * slowdown[j] / network.speed(r)
                _, pull = network.push_pull_seconds(r, 0.0, model_bytes)
                # its pull, as a round of one (the row's group size and codec ratio stay meaningful)
                rejoin = Round(tensors=[], group_size=1, bytes_sent=0.0, bytes_received=model_bytes / self.group.size,
                               seconds=pull, compression_ratio=self._ratio, key=DEFAULT_KEY)  # fmt: skip
                self.flights.append(_Flight(j, self.pulled_version[j], start + idle, pull, 0, 0.0, [], rejoin))
                self.timeline.event(self.timeline.now, comm=pull / self.group.size)
                continue
            mask = torch.zeros_like(weights)
            mask[j] = 1.0
            result = self.averager.start(pseudo, weights * mask, key=DEFAULT_KEY, ranks=ranks).wait()
            push, pull = network.push_pull_seconds(r, result.payload_bytes, model_bytes)
            self._ratio = result.compression_ratio
            L = self.group.size
            comm = dataclasses.replace(result, tensors=[], bytes_sent=result.payload_bytes / L,
                                       bytes_received=model_bytes / L, seconds=push + pull)  # fmt: skip
            self.flights.append(_Flight(j, self.pulled_version[j], start + modelled[j] + push, pull, counts[j],
                                        float(weights[j]), [t.clone() for t in result.tensors], comm))  # fmt: skip
            self.timeline.event(self.timeline.now, busy=modelled[j] / L, comm=(push + pull) / L)  # per-worker means

    def global_params(self) -> list[torch.Tensor]:
        if not self.started:
            return self.group.params(0)
        return self.anchor

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "anchor": [a.detach().clone() for a in self.anchor],
            "outer": self.outer.state_dict(),
            "version": self.version,
            "pulled": [p.clone() for p in self.pulled],
            "phase_of": list(self.phase_of),
            "pulled_version": list(self.pulled_version),
            "last_update_norm": self._last_update_norm,
            "flights": [f.state_dict() for f in self.flights],
            "started": self.started,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            for a, s in zip(self.anchor, state["anchor"], strict=True):
                a.copy_(s)
            for p, s in zip(self.pulled, state["pulled"], strict=True):
                p.copy_(s)
        self.outer.load_state_dict(state["outer"])
        self.version, self.phase_of, self.started = int(state["version"]), list(state["phase_of"]), state["started"]
        self.pulled_version = list(state.get("pulled_version", [self.version] * self.group.size))
        self._last_update_norm = float(state.get("last_update_norm", 0.0))
        self.flights = [_Flight.from_state(s) for s in state["flights"]]
