"""A SWARM-style pipeline on the ``sim`` backend: replicas of a GPT cut into S stages, stage s of replica (column)
c served by its own peer. Peer s * K + i starts in column i of stage s: S x K peers, K = workers.

To a strategy this is a ``WorkerGroup`` like any other: per parameter a (C, *shape) stack whose row c is the copy
held by the peer serving that parameter's stage from column c. Averaging rows is averaging each stage among its
peers (``comm/staged.py``), so ddp is SWARM (each stage all-reduces its gradients every step) and diloco is
DiLoCo-SWARM (each stage averages its pseudo-gradients every H steps) with no change to either strategy. Without
rebalancing C = K and every slot is served; with it (``pipeline.rebalance_every``) there are free slots a peer
moving to a slow stage can take (C = S*K - S + 1, room for all peers but one per other stage), and the slot it
leaves is free: it takes no part in its old stage's averaging.

What differs is how a step runs. Each worker's batch (the first K columns hold the workers' data) is cut into
``microbatches`` micro-batches; each goes forward through one peer per stage and back (``Router``: fixed, or
stochastic in proportion to throughput), its activations and their gradients crossing every stage boundary
through ``activation_codec`` (byte-counted). A peer that fails a call (``pipeline.failure_prob``, drawn per call by
the fault schedule) sits out the rest of the step and the call is retried on another live peer of its stage; a
backward retry first re-runs that stage's forward on the new peer from the same input. Each stage records each
micro-batch's backward exactly once. The failure is of one call (a timeout, an overload): the peer keeps what it
had accumulated this step.

A peer averages its micro-batches' gradients, and a stage's peers are averaged weighted by the micro-batches each
ran (``stage_work``): under ddp that is the mean gradient over every micro-batch of the step whatever the routing
and the pool sizes (SWARM's exact accumulation); under diloco a peer's pseudo-gradient counts by the work in it. A
local step uses the mean over the peer's own micro-batches; a peer that got none this step does not step. Peers
move (rebalancing) only at round boundaries, when a stage's peers hold its averaged state.

Each step is priced by its schedule (``schedule.simulate_step``): measured call times, or network.step_seconds
split by the stages' parameter shares (forward 1/3, backward 2/3), slowed by a peer's straggler draw and divided
by its compute speed (network.compute_speed over the S x K peers). ``PipelineNetwork`` hands that cost to the
strategy's timeline. A moved peer's download (``rebalance_bytes``) is priced on its link from the peer it copies,
as a pause before the next step.
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
        # links, speeds and faults cover every peer (global ids); ``workers`` stays the run's K data-parallel workers
        self.peers, self.workers, self.stages = workers * stages, workers, stages
        self._booked = [0.0, 0.0]

    def comm_seconds(self, payload_bytes: float, active=None, allgather: bool = False) -> float:
        if active is None:  # ``workers`` is K, but the peers are S x K: "everyone" is not a group that averages
            raise ValueError("a pipeline averages per stage: price a round over the stage's peers (active=...)")
        return super().comm_seconds(payload_bytes, active, allgather)

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
        lanes: int,
        specs: Sequence[StageSpec],
        router: Router,
        network: PipelineNetwork,
        microbatches: int,
        codec: Codec,
        rebalance_every: int = 0,
    ):
        """workers: one replica per column (C >= lanes); the first ``lanes`` hold the workers' data. Peer s*K + i
        starts in column i of stage s (K = lanes); the other columns are free slots a rebalanced peer can take."""
        super().__init__(workers)
        self.lanes, self.specs = lanes, list(specs)
        self.router, self.network, self.microbatches, self.codec = router, network, microbatches, codec
        self.rebalance_every = rebalance_every
        # occupant[s][c]: the peer serving stage s from column c's replica (None: a free slot)
        self.occupant: list[list[int | None]] = [
            [s * lanes + c if c < lanes else None for c in range(self.size)] for s in range(len(self.specs))
        ]
        for w in self.workers:  # a stage peer clips its own stage's gradient: it sees no other
            w.clip_groups = [[w.params[i] for i in s.params] for s in self.specs]
        total = sum(s.numel for s in self.specs)
        self.shares = [s.numel / total for s in self.specs]
        self.processed = [0] * len(self.specs)  # backward calls recorded per stage, over the run
        self.failures = 0  # failed calls over the run
        self.moves = 0  # peers moved between stages over the run
        # micro-batches each slot's peer has run, per [stage][column], over the run: what weighs its contribution
        # to its stage's averages (comm/staged.py)
        self.work = [[0] * self.size for _ in self.specs]
        self._rebalanced_at = 0  # the step of the last rebalancing
        self._last_seconds: dict[tuple[int, bool], float] = {}  # a stage's last measured call, per direction
        self._since = self._fresh_stats()

    def _fresh_stats(self) -> dict:
        return {"activation_bytes": 0.0, "stage_failures": 0, "stage_moves": 0, "rebalance_bytes": 0.0,
                "stage_load": [[0] * self.size for _ in self.specs]}  # fmt: skip

    @property
    def stages(self) -> int:
        return len(self.specs)

    def peer(self, stage: int, column: int) -> int:
        """The global id of the peer serving ``stage`` from ``column``."""
        p = self.occupant[stage][column]
        if p is None:
            raise RuntimeError(f"no peer serves stage {stage} from column {column}")
        return p

    def stage_peers(self, stage: int) -> list[int | None]:
        """Per column, the peer serving ``stage`` there (None: a free slot)."""
        return list(self.occupant[stage])

    def stage_work(self, stage: int) -> list[int]:
        """Per column, the micro-batches run in ``stage`` there over the run (a free slot's stays put)."""
        return list(self.work[stage])

    @property
    def data_workers(self) -> int:
        return self.lanes

    def tokens_per_step(self) -> torch.Tensor:
        """Only the first ``lanes`` columns hold data."""
        return torch.tensor([w.tokens_per_step if c < self.lanes else 0 for c, w in enumerate(self.workers)],
                            dtype=torch.float64)  # fmt: skip

    # ------------------------------------------------------------------ one step of every micro-batch
    def _step(self, active: Sequence[bool]) -> tuple[list[float], list[list[int]], float, int]:
        """Forward and backward of every active worker's micro-batches. Leaves in each stage peer's parameters the
        SUM of its micro-batches' gradients. Returns (loss per column, NaN without data; micro-batches per
        [stage][column]; the step's modelled seconds; the micro-batches in the step)."""
        step = self.step
        # who can take a call this step: a served slot of an active column
        live = [[p if active[c] else None for c, p in enumerate(row)] for row in self.occupant]
        served = [[0] * self.size for _ in self.specs]
        losses = [math.nan] * self.size
        chains = []
        for lane in range(self.lanes):
            if not active[lane]:
                continue
            w = self.workers[lane]
            x, y = w.sampler.next()
            x, y = x.to(w.device, non_blocking=True), y.to(w.device, non_blocking=True)
            mb_losses = []
            for m, (xm, ym) in enumerate(zip(x.chunk(self.microbatches), y.chunk(self.microbatches), strict=True)):
                loss, chain = self._microbatch(step, lane, lane * self.microbatches + m, xm, ym, live, served)
                mb_losses.append(loss)
                chains.append(chain)
                # every message of the chain, retries included, as the schedule prices them
                self._since["activation_bytes"] += sum(call.incoming_bytes for call in chain)
            losses[lane] = sum(mb_losses) / len(mb_losses)
        peers = len(self.router.throughput)
        seconds, busy = simulate_step(chains, self.network, peers)
        self.network.book(seconds, sum(busy) / peers)
        for s in range(self.stages):
            for c in range(self.size):
                self._since["stage_load"][s][c] += served[s][c]
                self.work[s][c] += served[s][c]
        return losses, served, seconds, len(chains)

    def _microbatch(self, step, lane, mb, x, y, live, served) -> tuple[float, list[Call]]:
        last = self.stages - 1
        inputs, outputs, peers = [None] * self.stages, [None] * self.stages, [0] * self.stages
        in_bytes = [0.0] * self.stages  # what each stage's input cost on the wire (a retry sends it again)
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
            inputs[s], outputs[s], peers[s], in_bytes[s] = x_in, out, p, nbytes
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
                chain.append(Call(self.peer(s, p), secs, False, upstream, in_bytes[s]))
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
        self.router.observe(peer, self.shares[s] * self.network.faults.slowdown(peer, step) / self.network.speed(peer))
        return out, secs

    def _fails(self, s: int, p: int, step: int, call: tuple[int, ...], live: list[int | None]) -> bool:
        """Does peer p of stage s fail this call? A failed peer sits out the rest of the step; the last live
        peer of a stage does not fail (the stage would be gone)."""
        if sum(x is not None for x in live) <= 1 or not self.network.faults.call_fails(self.peer(s, p), step, call):
            return False
        live[p] = None
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
        return self.codec.decode(payload).reshape(t.shape).to(t.dtype), float(payload.nbytes)

    # ------------------------------------------------------------------ what a strategy calls
    def compute_grads(self) -> tuple[list[float], list[torch.Tensor], list[float]]:
        """ddp: each peer contributes the mean gradient of its micro-batches (zeros for none), weighted by their
        number in its stage's average (``comm/staged.py``): the mean gradient over every micro-batch of the step,
        whatever the routing and the pool sizes."""
        losses, served, seconds, _ = self._step([True] * self.size)
        with torch.no_grad():
            for spec, row in zip(self.specs, served, strict=True):
                for w, k in zip(self.workers, row, strict=True):
                    for i in spec.params:
                        p = w.params[i]
                        p.grad = torch.zeros_like(p) if k == 0 else p.grad.div_(k)
        grads = [torch.stack([w.params[i].grad for w in self.workers]) for i in range(len(self.workers[0].params))]
        return losses, grads, [seconds] * self.size

    def apply_grads(self, grads: Sequence[torch.Tensor]) -> None:
        super().apply_grads(grads)
        self._round_boundary()  # a ddp step (or a synchronous warm-up step) is a round

    def load_params(self, tensors: Sequence[torch.Tensor], idx: Sequence[int] | None = None) -> None:
        super().load_params(tensors, idx)
        if idx is None:  # diloco's round boundary: every replica holds the new global model
            self._round_boundary()

    def inner_steps(self, n: int, counts: Sequence[int] | None = None) -> tuple[list[list[float]], list[float]]:
        counts = check_counts(n, counts, self.size)
        losses, seconds = [], [0.0] * self.size
        for t in range(n):
            active = [c > t for c in counts]
            step_losses, served, secs, _ = self._step(active)
            with torch.no_grad():
                for spec, row in zip(self.specs, served, strict=True):
                    for w, k in zip(self.workers, row, strict=True):
                        for i in spec.params:  # no micro-batch: no gradient, and the optimiser leaves it alone
                            w.params[i].grad = None if k == 0 else w.params[i].grad.div_(k)
            for c, w in enumerate(self.workers):
                if active[c]:
                    w.apply_grads()
                    seconds[c] += secs
            losses.append(step_losses)
        return losses, seconds

    # ------------------------------------------------------------------ rebalancing
    def _round_boundary(self) -> None:
        """Peers move only between rounds, when every serving peer of a stage holds the stage's averaged state (a
        move mid-phase would copy one peer's unsynchronised progress into two contributions): at the first round
        boundary at or after every rebalance_every steps."""
        n = self.rebalance_every
        if n > 0 and self.step // n > self._rebalanced_at // n:
            self._rebalanced_at = self.step
            self._rebalance()

    @torch.no_grad()
    def _rebalance(self) -> None:
        """Move one peer from the stage with the most throughput to the one with the least, if that raises the
        slowest stage's throughput (SWARM's rebalancing). The peer takes a free slot there and downloads the stage's
        parameters and optimiser state from the fastest peer serving it."""
        rate = {}  # every serving peer's measured rate (an unmeasured one: its stage's mean)
        for row in self.occupant:
            peers = [p for p in row if p is not None]
            rate.update(zip(peers, self.router.rates(peers), strict=True))
        rates = [sum(rate[p] for p in row if p is not None) for row in self.occupant]
        slow = min(range(self.stages), key=lambda s: rates[s])
        donors = [s for s in range(self.stages) if s != slow and sum(p is not None for p in self.occupant[s]) > 1]
        if not donors:
            return
        fast = max(donors, key=lambda s: rates[s])
        best = None
        for c, p in enumerate(self.occupant[fast]):
            if p is None:
                continue
            r = rate[p]
            moved = r * self.shares[fast] / self.shares[slow]  # its calls in the other stage cost by parameter share
            after = list(rates)
            after[fast], after[slow] = rates[fast] - r, rates[slow] + moved
            new = min(after)  # the pipeline's pace: its slowest stage, whichever that is after the move
            if new > min(rates) * (1 + 1e-9) and (best is None or new > best[0]):
                best = (new, c, p, moved)
        if best is None:
            return
        _, c, p, moved = best
        to = self.occupant[slow].index(None)
        serving = [(q, d) for d, q in enumerate(self.occupant[slow]) if q is not None]
        source_peer, source_column = max(serving, key=lambda qd: rate[qd[0]])
        source = self.workers[source_column]
        dest = self.workers[to]
        nbytes = 0.0
        for i in self.specs[slow].params:
            dest.params[i].copy_(source.params[i])
            state = source.optimizer.state.get(source.params[i])
            dest.optimizer.state.pop(dest.params[i], None)
            if state:
                dest.optimizer.state[dest.params[i]] = {
                    k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()
                }
            nbytes += sum(t.numel() * t.element_size() for t in [source.params[i], *(state or {}).values()]
                          if torch.is_tensor(t))  # fmt: skip
        self.occupant[fast][c], self.occupant[slow][to] = None, p
        # The download is priced as a pause of the whole pipeline before its next step (the stage's pool changes
        # under the router only once the newcomer holds the state): pessimistic, and simple.
        self.network.book(self.network.transfer_seconds(source_peer, p, nbytes), 0.0)
        self.router.throughput[p] = moved
        self.moves += 1
        self._since["stage_moves"] += 1
        self._since["rebalance_bytes"] += nbytes

    # ------------------------------------------------------------------ books
    def take_stats(self) -> dict:
        """What the pipeline did since the last call: bytes between stages per peer, failed calls, peers moved and
        the state they downloaded, micro-batches per [stage][column]."""
        since, peers = self._since, len(self.router.throughput)
        self._since = self._fresh_stats()
        return {**since, "activation_bytes": since["activation_bytes"] / peers,
                "stage_peers": [sum(p is not None for p in row) for row in self.occupant]}  # fmt: skip

    def state_dict(self) -> dict:
        return {**super().state_dict(), "router": self.router.state_dict(), "processed": list(self.processed),
                "failures": self.failures, "moves": self.moves, "occupant": [list(r) for r in self.occupant],
                "work": [list(r) for r in self.work], "rebalanced_at": self._rebalanced_at,
                "last_seconds": [[s, b, t] for (s, b), t in self._last_seconds.items()]}  # fmt: skip

    def load_state_dict(self, s: dict) -> None:
        super().load_state_dict(s)
        self.router.load_state_dict(s["router"])
        self.processed, self.failures, self.moves = list(s["processed"]), int(s["failures"]), int(s["moves"])
        self.occupant = [list(r) for r in s["occupant"]]
        self.work, self._rebalanced_at = [list(r) for r in s["work"]], int(s["rebalanced_at"])
        self._last_seconds = {(int(st), bool(b)): float(t) for st, b, t in s["last_seconds"]}
