"""async_diloco on a real swarm: one worker per process; the global model is held by one live peer
(``comm/shared_model.py``), so no worker ever waits for another.

A round is one phase of this worker. At its process's first round it pulls the global model φ as it is then. It
trains H inner steps, pushes Δ = φ_pulled − θ through the run's codec with the version it started from, and the
holder applies it at once with the sim's rule (``strategies/async_diloco.py``):

    φ <- OuterOpt(φ, s·Δ),   s = the phase's tokens ÷ the tokens of one synchronous round (H steps of every worker)

with delayed Nesterov under ``algorithm.momentum_delay=N``. Then it pulls the new φ and starts again. With
``algorithm.dynamic_steps=true`` the holder keeps every worker's measured speed (steps per second of its last
phase) and answers each push with that worker's next H = max(1, round(H · v_k / v_max)). The staleness of the
update (updates applied since this worker pulled) comes back with the answer and is logged, as on sim.

Every peer keeps the rule's state (φ's tensors, the outer optimiser) ready, since any peer may become the holder:
the holder's outer state travels with a clean handoff and restarts after a holder dies (comm/shared_model.py). A
peer's step budget counts its own steps; a peer that (re)joins starts its own budget and pulls the current model.
The model evaluated is the one this peer last pulled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from locoswarm.comm.base import Averager, Round
from locoswarm.comm.shared_model import HolderGone, Refused, SharedModel
from locoswarm.config import OuterOptimizerConfig
from locoswarm.faults import PhasePlanner
from locoswarm.outer import DelayedNesterov, OuterOptimizer
from locoswarm.strategies.async_diloco import async_outer
from locoswarm.strategies.base import RoundReport, Strategy, tensor_norm
from locoswarm.timeline import Timeline
from locoswarm.worker import WorkerGroup

log = logging.getLogger(__name__)


class AsyncDiLoCoPeer(Strategy):
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
        workers: int = 1,
    ):
        if inner_steps < 1:
            raise ValueError(f"algorithm.inner_steps={inner_steps} is invalid: H must be >= 1")
        if group.size != 1:
            raise ValueError(f"a real swarm's async_diloco hosts one worker per process (got {group.size})")
        super().__init__(group, averager, planner, timeline, inner_steps)
        self.inner_steps, self.warmup_sync_steps, self.dynamic_steps = inner_steps, warmup_sync_steps, dynamic_steps
        self.outer_cfg, self.momentum_delay, self.workers = outer, momentum_delay, workers
        self.anchor = [a.detach().clone() for a in anchor]  # φ, while this peer holds it
        self.outer = self._new_outer()
        self.pulled = [a.detach().unsqueeze(0).clone() for a in anchor]  # what this worker last pulled, (1, *shape)
        self.pulled_version = 0
        self.next_steps = inner_steps
        self.speeds: dict[int, float] = {}  # the holder's: rank -> steps per second of its last phase
        self.shared: SharedModel | None = None  # joined at the first round after the warm-up

    def _new_outer(self) -> OuterOptimizer | DelayedNesterov:
        return async_outer(self.anchor, self.outer_cfg, self.momentum_delay)

    # ------------------------------------------------------------------ the holder's rule (comm/shared_model.py)
    def _share(self, tokens: float) -> float:
        """An update's weight: its tokens over one synchronous round's (H steps of every worker), as on sim."""
        return tokens / (float(self.group.tokens_per_step()[0]) * self.inner_steps * self.workers)

    def apply(self, update: list[torch.Tensor], header: dict) -> dict:
        """One pushed update onto φ (runs on the holder, under the shared model's lock)."""
        share = self._share(header["tokens"])
        self.outer.step([u.to(a.device, a.dtype) * share for u, a in zip(update, self.anchor, strict=True)])
        if not self.dynamic_steps:
            return {}
        if header["seconds"] > 0 and header["steps"] > 0:
            self.speeds[header["rank"]] = header["steps"] / header["seconds"]
        fastest = max(self.speeds.values(), default=0.0)
        speed = self.speeds.get(header["rank"], fastest)
        return {"next_steps": max(1, round(self.inner_steps * speed / fastest)) if fastest > 0 else self.inner_steps}

    def _load_outer_state(self, state: dict | None) -> None:
        self.outer = self._new_outer()
        if state is not None:
            self.outer.load_state_dict(state)

    # ------------------------------------------------------------------ a round: one phase of this worker
    def round(self, remaining: int) -> RoundReport:
        if self.group.step < self.warmup_sync_steps:
            return self._sync_round()
        received = 0.0
        if self.shared is None:
            with torch.no_grad():  # after a warm-up every peer holds the same synchronised params
                for a, p in zip(self.anchor, self.group.params(0), strict=True):
                    a.copy_(p)
            self.shared = self.averager.shared_model(self.anchor, self.apply, lambda: self.outer.state_dict(),
                                                     self._load_outer_state)  # fmt: skip
            received += self._pull()
        steps = min(self.next_steps if self.dynamic_steps else self.inner_steps, remaining)
        phase = self._phase(steps)
        tokens = float(self.group.tokens_per_step()[0]) * phase.counts[0]
        pseudo = self.group.pseudo_gradients_each(self.pulled)
        started = time.monotonic()
        header = {"rank": self.group.ranks[0], "version": self.pulled_version, "tokens": tokens,
                  "steps": phase.counts[0], "seconds": float(phase.seconds[0])}  # fmt: skip
        reply, sent = None, 0
        if phase.counts[0] > 0:
            try:
                reply, sent = self.shared.push([p[0] for p in pseudo], header)
            except (Refused, HolderGone) as e:  # our update is lost (as churn loses one); we carry on from φ
                log.warning("our update of version %d was not applied: %s", self.pulled_version, e)
        received += self._pull()
        if reply is not None and "next_steps" in reply:
            self.next_steps = int(reply["next_steps"])
        model_bytes = sum(a.numel() * 4 for a in self.anchor)
        comm = Round(tensors=[], group_size=1 if reply else 0, bytes_sent=float(sent), bytes_received=received,
                     seconds=time.monotonic() - started, compression_ratio=sent / model_bytes if sent else 1.0,
                     payload_bytes=float(sent), total_weight=tokens if reply else 0.0,
                     members=list(self.group.ranks) if reply else [])  # fmt: skip
        self.timeline.wait(self.timeline.exchange(self.timeline.now, comm.seconds))
        extras: dict = {"version": self.pulled_version, "holder": self.shared.holding, "next_steps": self.next_steps}
        if reply is not None:
            extras["arrivals"] = [{"worker": self.group.ranks[0], "staleness": reply["staleness"],
                                   "steps": phase.counts[0], "applied_as": reply["version"]}]  # fmt: skip
            extras["staleness"] = reply["staleness"]
            extras["outer_grad_norm"] = tensor_norm([p[0] for p in pseudo]) * self._share(tokens)
        return self._report(phase.steps, phase.losses, phase.seconds, [comm], reply is not None, tokens, extras)

    def _pull(self) -> float:
        """Take the global model as the holder has it now; returns the bytes received."""
        assert self.shared is not None
        version, tensors, size = self.shared.pull()
        with torch.no_grad():
            for p, t in zip(self.pulled, tensors, strict=True):
                p[0].copy_(t)
        self.pulled_version = version
        self.group.load_params_each(self.pulled)
        return float(size)

    def global_params(self) -> list[torch.Tensor]:
        if self.shared is None:
            return self.group.params(0)
        return [p[0] for p in self.pulled]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "pulled": [p.clone() for p in self.pulled],
                "pulled_version": self.pulled_version, "next_steps": self.next_steps}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            for p, s in zip(self.pulled, state["pulled"], strict=True):
                p.copy_(s)
        self.pulled_version, self.next_steps = int(state["pulled_version"]), int(state["next_steps"])
