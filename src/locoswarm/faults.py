"""Stragglers, churn and per-round phase plans for the ``sim`` backend.

``FaultSchedule`` answers two random-access questions, deterministic per seed and independent of the
algorithm, the order of calls and resumes: how much slower is worker w in sync round r (``slowdown``), and is
it there at all (``present``)? Every draw comes from a generator seeded with (seed, purpose, worker, round),
so two algorithms run with the same seeds meet exactly the same failures at the same round numbers.

``PhasePlanner`` turns that, the per-worker compute speeds and the algorithm's H or time budget into the
per-worker inner-step counts of each round (``PhasePlan.counts``; 0 = masked: the worker neither trains nor
contributes, weight 0). A strategy asks for one plan per round; the trainer prices the same plan.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from locoswarm.config import NetworkConfig, StragglerKind

if TYPE_CHECKING:
    from locoswarm.netsim import NetworkModel

_STRAGGLER, _CHURN, _CALL = 1, 2, 3  # purposes: independent streams from one seed
MEASURED_KEEP = 256  # recent per-step times kept for the median when network.step_seconds is null


def _draw(seed: int, purpose: int, worker: int, round_: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFF_FFFF_FFFF_FFFF, purpose, worker, round_])


class FaultSchedule:
    """Seeded stragglers and churn of ``workers`` workers (see ``StragglerConfig`` / ``ChurnConfig``)."""

    def __init__(self, cfg: NetworkConfig, workers: int, seed: int = 0, call_failure_prob: float = 0.0):
        """call_failure_prob: a pipeline stage peer's chance of failing one forward or backward call."""
        self.workers = workers
        self.call_failure_prob = call_failure_prob
        self.seed = seed
        self.stragglers = cfg.stragglers
        self.kind = StragglerKind(cfg.stragglers.kind)
        self.churn = cfg.churn
        self.straggler_seed = seed if cfg.stragglers.seed is None else cfg.stragglers.seed
        self.churn_seed = seed if cfg.churn.seed is None else cfg.churn.seed
        self.absent_windows = [(int(w), int(a), int(b)) for w, a, b in (list(e) for e in cfg.churn.absent)]

    def slowdown(self, worker: int, round_: int) -> float:
        """Multiplier on worker's step time in this round (1.0 = no slowdown)."""
        if self.kind == StragglerKind.lognormal:
            z = _draw(self.straggler_seed, _STRAGGLER, worker, round_).standard_normal()
            return float(math.exp(self.stragglers.sigma * z))
        if self.kind == StragglerKind.fixed and worker in self.stragglers.workers:
            return float(self.stragglers.factor)
        return 1.0

    def _drops_at(self, worker: int, round_: int) -> bool:
        return bool(_draw(self.churn_seed, _CHURN, worker, round_).random() < self.churn.drop_prob)

    def _scheduled_present(self, worker: int, round_: int) -> bool:
        if any(w == worker and a <= round_ < b for w, a, b in self.absent_windows):
            return False
        if self.churn.drop_prob > 0:
            first = max(0, round_ - self.churn.rejoin_after + 1)
            if any(self._drops_at(worker, r) for r in range(first, round_ + 1)):
                return False
        return True

    def present(self, worker: int, round_: int) -> bool:
        """Is the worker there in this round? If a schedule would remove every worker, the lowest rank stays."""
        if self._scheduled_present(worker, round_):
            return True
        return worker == 0 and not any(self._scheduled_present(w, round_) for w in range(1, self.workers))

    def call_fails(self, peer: int, step: int, call: Sequence[int]) -> bool:
        """Does ``peer`` fail this forward or backward call of a pipeline step? ``call`` names the call uniquely
        within the step (micro-batch, stage, direction, attempt), so the draw does not depend on call order."""
        if self.call_failure_prob <= 0:
            return False
        rng = np.random.default_rng([self.seed & 0xFFFF_FFFF_FFFF_FFFF, _CALL, peer, step, *call])
        return bool(rng.random() < self.call_failure_prob)

    @property
    def active(self) -> bool:
        return self.kind != StragglerKind.none or bool(self.absent_windows) or self.churn.drop_prob > 0


@dataclass
class PhasePlan:
    """What the workers of this process do in one sync round."""

    round: int  # sync round index (0-based; every averaging counts, warm-up steps included)
    ranks: list[int]  # global rank of each local worker
    counts: list[int]  # inner steps each local worker runs (0 = masked: absent, or no step fits its budget)
    slowdown: list[float]  # straggler multiplier on each local worker's step time
    present: list[bool]  # not dropped out by churn
    claimed: list[int] | None = None  # steps each worker claims to have run (a lazy worker claims more); None = counts

    @property
    def steps(self) -> int:
        return max(self.counts, default=0)

    @property
    def claims(self) -> list[int]:
        return self.counts if self.claimed is None else self.claimed


class PhasePlanner:
    """Per-round step counts: a fixed H, or as many steps as fit ``time_budget`` seconds of modelled compute."""

    def __init__(
        self,
        network: NetworkModel,
        ranks: Sequence[int],
        inner_steps: int,
        time_budget: float | None = None,
        lazy: Sequence[int] = (),
        lazy_fraction: float = 1.0,
    ):
        """lazy: ranks that run only ceil(lazy_fraction x) of the x steps they are given and claim all x (a fault
        for verification studies: ``faults.lazy``)."""
        self.network = network
        self.lazy, self.lazy_fraction = set(lazy), lazy_fraction
        self.ranks = list(ranks)
        self.inner_steps = inner_steps
        self.time_budget = time_budget
        self.round = 0
        self.measured: list[float] = []  # recent measured seconds per inner step (speed 1.0, this machine)
        self.last: PhasePlan | None = None

    def base_step_seconds(self) -> float | None:
        """Seconds per inner step at speed 1.0: network.step_seconds, else the measured median (None: unmeasured)."""
        if self.network.cfg.step_seconds is not None:
            return float(self.network.cfg.step_seconds)
        return statistics.median(self.measured) if self.measured else None

    def plan(self, remaining: int, sync: bool = False) -> PhasePlan:
        """The next round's plan. sync: a one-step synchronous round (ddp, diloco warm-up)."""
        r = self.round
        faults = self.network.faults
        present = [faults.present(w, r) for w in self.ranks]
        slowdown = [faults.slowdown(w, r) for w in self.ranks]
        base = self.base_step_seconds()
        if sync:
            counts = [1 if p else 0 for p in present]
        elif self.time_budget is None or base is None:  # fixed H (or the calibration phase of a time budget)
            n = min(self.inner_steps, remaining)
            counts = [n if p else 0 for p in present]
        else:
            counts = []
            for w, p, s in zip(self.ranks, present, slowdown, strict=True):
                t = base * s / self.network.speed(w)  # this worker's modelled step time this round
                counts.append(min(remaining, math.floor(self.time_budget / t + 1e-9)) if p else 0)
            if not any(counts) and any(present):
                fastest = min(base * s / self.network.speed(w) for w, s in zip(self.ranks, slowdown, strict=True))
                raise ValueError(
                    f"algorithm.time_budget={self.time_budget} is shorter than one inner step of the fastest worker "
                    f"this round ({fastest:.4g}s); raise it or lower network.step_seconds"
                )
        self.round += 1
        claimed = None
        if not sync and self.lazy & set(self.ranks):
            claimed = list(counts)
            lazy = [w in self.lazy for w in self.ranks]
            counts = [math.ceil(c * self.lazy_fraction) if z else c for z, c in zip(lazy, counts, strict=True)]
        self.last = PhasePlan(round=r, ranks=list(self.ranks), counts=counts, slowdown=slowdown, present=present,
                              claimed=claimed)  # fmt: skip
        return self.last

    def observe(self, counts: Sequence[int], seconds: Sequence[float]) -> None:
        """Record measured compute (used for time budgets when network.step_seconds is null)."""
        for c, s in zip(counts, seconds, strict=True):
            if c > 0 and s > 0:
                self.measured.append(s / c)
        del self.measured[:-MEASURED_KEEP]

    def state_dict(self) -> dict:
        return {"round": self.round, "measured": list(self.measured)}

    def load_state_dict(self, s: dict) -> None:
        self.round = int(s["round"])
        self.measured = list(s["measured"])
