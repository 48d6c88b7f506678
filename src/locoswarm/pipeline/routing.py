"""Which peer of each stage a micro-batch passes through (SWARM's wiring).

fixed: micro-batches of worker i's data go through peer i of every stage (so S stages of K peers train exactly
like K whole-model workers). stochastic: each stage's peer is drawn with probability proportional to its
throughput, measured as calls per modelled second (an exponential average; a peer not measured yet counts as its
stage's mean), so a peer twice as fast gets twice the work. Every draw is seeded by (seed, step, micro-batch,
stage, attempt): a run replays exactly and a resume does not depend on how far the generator had got.
A dead peer (it failed a call this step) is never picked; fixed routing falls back to the next live peer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from locoswarm.config import Routing

SMOOTHING = 0.5  # weight of the newest measurement in a peer's throughput


class Router:
    def __init__(self, routing: Routing, stages: int, peers: int, seed: int):
        self.routing = Routing(routing)
        self.peers = peers
        self.seed = seed
        self.throughput: list[list[float | None]] = [[None] * peers for _ in range(stages)]

    def pick(self, stage: int, lane: int, live: Sequence[bool], key: Sequence[int]) -> int:
        """The peer of ``stage`` for a micro-batch of worker ``lane``'s data; ``key``: (step, micro-batch id,
        attempt), unique per draw."""
        candidates = [i for i in range(self.peers) if live[i]]
        if not candidates:
            raise RuntimeError(f"stage {stage} has no live peer left")
        if self.routing == Routing.fixed:
            return next(i for i in (*range(lane, self.peers), *range(lane)) if live[i])
        rates = self.rates(stage)
        p = np.array([rates[i] for i in candidates], dtype=np.float64)
        rng = np.random.default_rng([self.seed & 0xFFFF_FFFF_FFFF_FFFF, stage, *key])
        return candidates[int(rng.choice(len(candidates), p=p / p.sum()))]

    def rates(self, stage: int) -> list[float]:
        known = [r for r in self.throughput[stage] if r is not None]
        default = sum(known) / len(known) if known else 1.0
        return [default if r is None else r for r in self.throughput[stage]]

    def observe(self, stage: int, peer: int, seconds: float) -> None:
        """A call of ``peer`` took ``seconds`` (modelled)."""
        if seconds <= 0:
            return
        rate, old = 1.0 / seconds, self.throughput[stage][peer]
        self.throughput[stage][peer] = rate if old is None else SMOOTHING * rate + (1 - SMOOTHING) * old

    def state_dict(self) -> dict:
        return {"throughput": [list(r) for r in self.throughput]}

    def load_state_dict(self, s: dict) -> None:
        self.throughput = [list(r) for r in s["throughput"]]
