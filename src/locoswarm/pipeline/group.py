"""A SWARM-style pipeline on the ``sim`` backend: K replicas of a GPT cut into S stages, stage s of replica i
served by its own peer (s, i) (global id s * K + i), S x K peers in all.

To a strategy this is a ``WorkerGroup`` of K workers like any other: per parameter a (K, *shape) stack whose row
i is the copy held by peer i of the stage that owns it. Averaging rows is averaging each stage among its peers
(``comm/staged.py``), so ddp is SWARM (each stage all-reduces its gradients every step) and diloco is
DiLoCo-SWARM (each stage averages its pseudo-gradients every H steps) with no change to either strategy.

What differs is how a step runs. Each worker's batch is cut into ``microbatches`` micro-batches; each goes
forward through one peer per stage and back (``Router``: fixed, or stochastic in proportion to throughput), its
activations and their gradients crossing every stage boundary through ``activation_codec`` (byte-counted). A
peer that fails a call (``pipeline.failure_prob``, drawn per call by the fault schedule) sits out the rest of the
step and the call is retried on another live peer of its stage; a backward retry first re-runs that stage's
forward on the new peer from the same input. Each stage records each micro-batch's backward exactly once.

A peer sums its micro-batches' gradients. ddp's contribution of peer i is that sum / microbatches, so the mean
over a stage's K peers is the mean gradient over all K x microbatches micro-batches whatever the routing (SWARM's
exact accumulation). A local step (diloco) uses the mean over the peer's own micro-batches; a peer that got none
this step does not step its parameters.

Each step is priced by its schedule (``schedule.simulate_step``): measured call times, or network.step_seconds
split by the stages' parameter shares (forward 1/3, backward 2/3), slowed by a peer's straggler draw and divided
by its compute speed (network.compute_speed over the S x K peers). ``PipelineNetwork`` hands that cost to the
strategy's timeline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from locoswarm.compression import Codec
from locoswarm.faults import PhasePlan
from locoswarm.netsim import NetworkModel
from locoswarm.pipeline.routing import Router
from locoswarm.pipeline.schedule import Call, simulate_step
from locoswarm.pipeline.stages import StageSpec, stage_forward
from locoswarm.worker import Worker, WorkerGroup, check_counts

FORWARD_SHARE = 1 / 3  # of a step's compute, with network.step_seconds (backward: the other 2/3)


class PipelineNetwork(NetworkModel):
    """The S x K peers' links, speeds and faults. An inner phase costs what the pipeline's schedule says: the group
    books each step's (makespan, mean busy) here as it runs it, and the timeline takes them."""

    def __init__(self, cfg, workers: int, stages: int, seed: int = 0, call_failure_prob: float = 0.0):
        super().__init__(cfg, workers * stages, seed, call_failure_prob)
        self.lanes, self.stages = workers, stages
        self._booked = [0.0, 0.0]

    def book(self, seconds: float, busy: float) -> None:
        self._booked[0] += seconds
        self._booked[1] += busy

    def phase_cost(self, plan: PhasePlan, measured: Sequence[float]) -> tuple[float, float]:
        seconds, busy = self._booked
        self._booked = [0.0, 0.0]
        return seconds, busy


class PipelineGroup(WorkerGroup):
    def __init__(
        self,
        workers: Sequence[Worker],
        specs: Sequence[StageSpec],
        router: Router,
        network: PipelineNetwork,
        microbatches: int,
        codec: Codec,
    ):
        super().__init__(workers)
        self.specs = list(specs)
        self.router, self.network, self.microbatches, self.codec = router, network, microbatches, codec
        for w in self.workers:  # a stage peer clips its own stage's gradient: it sees no other
            w.clip_groups = [[w.params[i] for i in s.params] for s in self.specs]
        total = sum(s.numel for s in self.specs)
        self.shares = [s.numel / total for s in self.specs]
        self.processed = [0] * len(self.specs)  # backward calls recorded per stage, over the run
        self.failures = 0  # failed calls over the run
        self._last_seconds: dict[tuple[int, bool], float] = {}  # a stage's last measured call, per direction
        self._since = {"activation_bytes": 0.0, "stage_failures": 0, "stage_load": self._zeros()}

    def _zeros(self) -> list[list[int]]:
        return [[0] * self.size for _ in self.specs]

    @property
    def stages(self) -> int:
        return len(self.specs)

    def peer(self, stage: int, index: int) -> int:
        """The global id of peer ``index`` of ``stage``."""
        return stage * self.size + index

    # ------------------------------------------------------------------ one step of every micro-batch
    def _step(self, active: Sequence[bool]) -> tuple[list[float], list[list[int]], float]:
        """Forward and backward of every active worker's micro-batches. Leaves in each stage peer's parameters the
        SUM of its micro-batches' gradients. Returns (loss per worker, NaN if inactive; micro-batches per
        [stage][peer]; the step's modelled seconds)."""
        step = self.step
        live = [list(active) for _ in self.specs]  # an inactive worker's peers are not there this step
        served = self._zeros()
        losses = [math.nan] * self.size
        chains = []
        for lane, w in enumerate(self.workers):
            if not active[lane]:
                continue
            x, y = w.sampler.next()
            x, y = x.to(w.device, non_blocking=True), y.to(w.device, non_blocking=True)
            mb_losses = []
            for m, (xm, ym) in enumerate(zip(x.chunk(self.microbatches), y.chunk(self.microbatches), strict=True)):
                loss, chain = self._microbatch(step, lane, lane * self.microbatches + m, xm, ym, live, served)
                mb_losses.append(loss)
                chains.append(chain)
            losses[lane] = sum(mb_losses) / len(mb_losses)
        seconds, busy = simulate_step(chains, self.network, self.stages * self.size)
        self.network.book(seconds, sum(busy) / len(busy))
        for s in range(self.stages):
            for i in range(self.size):
                self._since["stage_load"][s][i] += served[s][i]
        return losses, served, seconds

    def _microbatch(self, step, lane, mb, x, y, live, served) -> tuple[float, list[Call]]:
        last = self.stages - 1
        inputs, outputs, peers = [None] * self.stages, [None] * self.stages, [0] * self.stages
        chain: list[Call] = []
        h, source, nbytes = x, None, 0.0
        for s in range(self.stages):  # forward
            attempt = 0
            while True:
                p = self.router.pick(s, lane, live[s], (step, mb, 0, attempt))
                if not self._fails(s, p, step, (mb, s, 0, attempt), live[s]):
                    break
                chain.append(Call(self.peer(s, p), self._seconds(s, p, step, False), False, source, nbytes))
                attempt += 1
            x_in = h if s == 0 else h.detach().requires_grad_()
            out, secs = self._forward(s, p, x_in, y, step)
            chain.append(Call(self.peer(s, p), secs, False, source, nbytes))
            inputs[s], outputs[s], peers[s] = x_in, out, p
            if s < last:
                h, nbytes = self._cross(out.detach())
                source = self.peer(s, p)
        loss = float(outputs[last].detach())
        grad, source, nbytes = None, None, 0.0
        for s in reversed(range(self.stages)):  # backward
            p, attempt = peers[s], 0
            while self._fails(s, p, step, (mb, s, 1, attempt), live[s]):  # p is gone before it accumulates
                chain.append(Call(self.peer(s, p), self._seconds(s, p, step, True), True, source, nbytes))
                attempt += 1
                p = self.router.pick(s, lane, live[s], (step, mb, 1, attempt))
                x_in = inputs[s] if s == 0 else inputs[s].detach().requires_grad_()
                outputs[s], secs = self._forward(s, p, x_in, y, step)
                inputs[s], peers[s] = x_in, p
                upstream = None if s == 0 else self.peer(s - 1, peers[s - 1])
                chain.append(Call(self.peer(s, p), secs, False, upstream, self._activation_bytes(x_in) if s else 0.0))
            t0 = time.perf_counter()
            outputs[s].backward(None if s == last else grad)
            secs = self._seconds(s, p, step, True, time.perf_counter() - t0)
            chain.append(Call(self.peer(s, p), secs, True, source, nbytes))
            served[s][p] += 1
            self.processed[s] += 1
            if s > 0:
                grad, nbytes = self._cross(inputs[s].grad)
                source = self.peer(s, p)
        return loss, chain

    def _forward(self, s: int, p: int, x_in, y, step: int):
        w = self.workers[p]
        t0 = time.perf_counter()
        with torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=w.device.type == "cuda"):
            out = stage_forward(w.model, self.specs[s], s == self.stages - 1, x_in, y)
        secs = self._seconds(s, p, step, False, time.perf_counter() - t0)
        # The router measures throughput on the modelled clock from the stage's parameter share, not from the
        # wall-clock: peers of a stage differ only by speed and straggler draw, and a wall-clock measurement would
        # make the routing, and so the numbers, differ between two runs of one seed.
        peer = self.peer(s, p)
        self.router.observe(s, p, self.shares[s] * self.network.faults.slowdown(peer, step) / self.network.speed(peer))
        return out, secs

    def _fails(self, s: int, p: int, step: int, call: tuple[int, ...], live: list[bool]) -> bool:
        """Does peer p of stage s fail this call? A failed peer sits out the rest of the step; the last live
        peer of a stage does not fail (the stage would be gone)."""
        if sum(live) <= 1 or not self.network.faults.call_fails(self.peer(s, p), step, call):
            return False
        live[p] = False
        self.failures += 1
        self._since["stage_failures"] += 1
        return True

    def _seconds(self, s: int, p: int, step: int, backward: bool, measured: float | None = None) -> float:
        """A call's modelled seconds: network.step_seconds' share, or the measured time (a failed call: the stage's
        last measured one), x the peer's straggler slowdown / compute speed."""
        cfg = self.network.cfg
        if cfg.step_seconds is not None:
            share = (1 - FORWARD_SHARE) if backward else FORWARD_SHARE
            base = cfg.step_seconds * self.shares[s] * share / self.microbatches
        elif measured is not None:
            base = self._last_seconds[(s, backward)] = measured
        else:
            base = self._last_seconds.get((s, backward), 0.0)
        peer = self.peer(s, p)
        return base * self.network.faults.slowdown(peer, step) / self.network.speed(peer)

    def _cross(self, t: torch.Tensor) -> tuple[torch.Tensor, float]:
        """A tensor crossing a stage boundary, as the receiver gets it, and its bytes on the wire."""
        payload = self.codec.encode(t.detach())
        self._since["activation_bytes"] += payload.nbytes
        return self.codec.decode(payload).reshape(t.shape).to(t.dtype), float(payload.nbytes)

    def _activation_bytes(self, t: torch.Tensor) -> float:
        """A retried call's input, sent again."""
        nbytes = float(self.codec.encode(t.detach()).nbytes)
        self._since["activation_bytes"] += nbytes
        return nbytes

    # ------------------------------------------------------------------ what a strategy calls
    def compute_grads(self) -> tuple[list[float], list[torch.Tensor], list[float]]:
        losses, _, seconds = self._step([True] * self.size)
        with torch.no_grad():
            for w in self.workers:
                for p in w.params:  # a peer that got no micro-batch contributes zeros
                    p.grad = torch.zeros_like(p) if p.grad is None else p.grad.div_(self.microbatches)
        grads = [torch.stack([w.params[i].grad for w in self.workers]) for i in range(len(self.workers[0].params))]
        return losses, grads, [seconds] * self.size

    def inner_steps(self, n: int, counts: Sequence[int] | None = None) -> tuple[list[list[float]], list[float]]:
        counts = check_counts(n, counts, self.size)
        losses, seconds = [], [0.0] * self.size
        for t in range(n):
            active = [c > t for c in counts]
            step_losses, served, secs = self._step(active)
            with torch.no_grad():
                for spec, row in zip(self.specs, served, strict=True):
                    for w, k in zip(self.workers, row, strict=True):
                        for i in spec.params:  # no micro-batch: no gradient, and the optimiser leaves it alone
                            w.params[i].grad = None if k == 0 else w.params[i].grad.div_(k)
            for lane, w in enumerate(self.workers):
                if active[lane]:
                    w.apply_grads()
                    seconds[lane] += secs
            losses.append(step_losses)
        return losses, seconds

    def take_stats(self) -> dict:
        """What the pipeline did since the last call: bytes between stages per peer, failed calls, micro-batches
        per [stage][peer]."""
        since = self._since
        self._since = {"activation_bytes": 0.0, "stage_failures": 0, "stage_load": self._zeros()}
        return {**since, "activation_bytes": since["activation_bytes"] / (self.stages * self.size)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "router": self.router.state_dict(), "processed": list(self.processed),
                "failures": self.failures}  # fmt: skip

    def load_state_dict(self, s: dict) -> None:
        super().load_state_dict(s)
        self.router.load_state_dict(s["router"])
        self.processed, self.failures = list(s["processed"]), int(s["failures"])
