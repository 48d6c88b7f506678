"""Which peer of each stage a micro-batch passes through (SWARM's wiring).

fixed: micro-batches of worker i's data go through the peer in column i of every stage (so S stages of K peers
train exactly like K whole-model workers). stochastic: each stage's peer is drawn with probability proportional to
its throughput, measured as calls per modelled second (an exponential average; a peer not measured yet counts as
its stage's mean), so a peer twice as fast gets twice the work. Every draw is seeded by (seed, stage, step,
micro-batch, direction, attempt): a run replays exactly and a resume does not depend on how far a generator had got.
A dead peer (it failed a call this step) and an empty slot are never picked; fixed routing falls back to the next
live column.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from locoswarm.config import Routing

SMOOTHING = 0.5  # weight of the newest measurement in a peer's throughput


class Router:
    def __init__(self, routing: Routing, peers: int, seed: int):
        """peers: every stage peer of the run (global ids 0 .. peers-1)."""
        self.routing = Routing(routing)
        self.seed = seed
        self.throughput: list[float | None] = [None] * peers

    def pick(self, stage: int, lane: int, live: Sequence[int | None], key: Sequence[int]) -> int:
        """The column of ``stage`` that serves a micro-batch of worker ``lane``'s data. live: per column, the peer
        there if it can take the call, else None; key: (step, micro-batch id, direction, attempt)."""
        columns = [c for c, p in enumerate(live) if p is not None]
        if not columns:
            raise RuntimeError(f"stage {stage} has no live peer left")
        if self.routing == Routing.fixed:
            return next(c for c in (*range(lane, len(live)), *range(lane)) if live[c] is not None)
        rates = self.rates([live[c] for c in columns])
        p = np.array(rates, dtype=np.float64)
        rng = np.random.default_rng([self.seed & 0xFFFF_FFFF_FFFF_FFFF, stage, *key])
        return columns[int(rng.choice(len(columns), p=p / p.sum()))]

    def rates(self, peers: Sequence[int]) -> list[float]:
        """Measured calls per second of ``peers`` (one stage's); an unmeasured one counts as their mean."""
        known = [self.throughput[p] for p in peers if self.throughput[p] is not None]
        default = sum(known) / len(known) if known else 1.0
        return [default if self.throughput[p] is None else self.throughput[p] for p in peers]

    def observe(self, peer: int, seconds: float) -> None:
        """A call of ``peer`` took ``seconds`` (modelled)."""
        if seconds <= 0:
            return
        rate, old = 1.0 / seconds, self.throughput[peer]
        self.throughput[peer] = rate if old is None else SMOOTHING * rate + (1 - SMOOTHING) * old

    def state_dict(self) -> dict:
        return {"throughput": list(self.throughput)}

    def load_state_dict(self, s: dict) -> None:
        self.throughput = list(s["throughput"])
