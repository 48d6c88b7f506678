"""Simulated malicious workers, for attack studies: ``faults.byzantine=n faults.attack=<kind>``.

The last n ranks are malicious from averaging round ``faults.start_round`` on (rounds counted over every stream
of rounds, as the averager counts them). What they hand to the averager is replaced before it is encoded, so
the attack goes through the codec and the exchange exactly as a real peer's bad payload would, and the honest
workers' screening and aggregator (comm/aggregate.py) are what stands between it and the model:

- ``nan``: every value NaN.
- ``scale``: the honest contribution times ``faults.scale`` (default -100: large and reversed).
- ``signflip``: the honest contribution negated.
- ``random``: Gaussian noise with the honest contribution's norm (seeded per round and rank).
- ``alie``: "A Little Is Enough" (Baruch, Baruch and Goldberg 2019): mean - z std of the honest contributions of
  the round, coordinatewise, with z from the number of workers K and attackers n:
  s = floor(K/2 + 1) - n, z = Phi^-1((K - s) / K). It reads the honest rows, so it needs every worker in one
  process (``backend=sim``); with no honest row in sight it sends its own.

``AttackedAverager`` wraps any averager; the strategy and the backend do not know it is there. ``build_run`` wraps
every process's averager: on ``backend=sim`` one process hosts every worker; on ``backend=hivemind`` each peer
hosts one rank, so only the peers of the last n ranks corrupt what they send (a test-only peer mode for robust
aggregation against real peers; ``alie`` stays sim-only). Rounds are counted as the wrapped averager counts them
(rounds started, every key together: the swarm-wide sequence on hivemind, so a joiner attacks from the same round).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import torch

from locoswarm.comm.base import DEFAULT_KEY, Averager, Evidence, Handle, Round
from locoswarm.config import AttackName, FaultsConfig
from locoswarm.seeding import derive_seed


class Adversary:
    def __init__(self, cfg: FaultsConfig, workers: int, seed: int = 0):
        self.attack = AttackName(cfg.attack)
        self.scale = cfg.scale
        self.start_round = cfg.start_round
        self.workers = workers
        self.malicious = set(range(workers - cfg.byzantine, workers))
        self.seed = seed

    def alie_z(self) -> float:
        n = len(self.malicious)
        s = math.floor(self.workers / 2 + 1) - n
        return NormalDist().inv_cdf(min(max((self.workers - s) / self.workers, 1e-6), 1 - 1e-6))

    @torch.no_grad()
    def corrupt(
        self, tensors: Sequence[torch.Tensor], weights: torch.Tensor, ranks: Sequence[int], round_: int
    ) -> list[torch.Tensor]:
        """tensors: per parameter (L, *shape), rows in ``ranks`` order. Returns copies with the malicious rows
        replaced (the inputs are left alone: they are the workers' own state)."""
        bad = [j for j, r in enumerate(ranks) if r in self.malicious and weights[j] > 0]
        if round_ < self.start_round or not bad:
            return list(tensors)
        honest = [j for j in range(len(ranks)) if j not in bad and weights[j] > 0]
        out = [t.clone() for t in tensors]
        for j in bad:
            for i, t in enumerate(out):
                t[j] = self._row(tensors, i, j, honest, ranks[j], round_)
        return out

    def _row(self, tensors, i: int, j: int, honest: list[int], rank: int, round_: int) -> torch.Tensor:
        own = tensors[i][j]
        if self.attack == AttackName.nan:
            return torch.full_like(own, math.nan)
        if self.attack == AttackName.scale:
            return own * self.scale
        if self.attack == AttackName.signflip:
            return -own
        if self.attack == AttackName.random:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "attack", rank, round_, i))
            noise = torch.randn(own.shape, generator=g, dtype=torch.float32).to(own.device, own.dtype)
            return noise * (own.norm() / noise.norm().clamp_min(1e-30))
        # alie
        if not honest:
            return own.clone()
        rows = tensors[i][honest].float()
        std = rows.std(dim=0, unbiased=False) if len(honest) > 1 else torch.zeros_like(rows[0])
        return (rows.mean(dim=0) - self.alie_z() * std).to(own.dtype)


class AttackedAverager(Averager):
    """Any averager, with the malicious workers' rows replaced before each round (``Adversary``)."""

    def __init__(self, inner: Averager, adversary: Adversary):
        self.inner = inner
        self.adversary = adversary
        self.round = 0
        self.shares_run_state = inner.shares_run_state

    def start(
        self, tensors: Sequence[torch.Tensor], weights: torch.Tensor, *, key: str = DEFAULT_KEY, ranks=None, group=None
    ) -> Handle:
        ranks = list(range(weights.numel())) if ranks is None else list(ranks)
        number = getattr(self.inner, "round", self.round)  # the backend's count of rounds started, if it keeps one
        corrupted = self.adversary.corrupt(tensors, weights, ranks, number if isinstance(number, int) else self.round)
        self.round += 1
        return self.inner.start(corrupted, weights, key=key, ranks=ranks, group=group)

    def _round(self, tensors, weights, key, ranks) -> Round:
        return self.start(tensors, weights, key=key, ranks=ranks).wait()

    def attach_run_state(self, get_state, set_state, rounds: int = 0) -> None:
        self.inner.attach_run_state(get_state, set_state, rounds)

    def round_boundary(self) -> None:
        self.inner.round_boundary()

    def commit(self, start_state: bytes) -> None:
        self.inner.commit(start_state)

    def evidence(self) -> list[Evidence]:
        return self.inner.evidence()

    def exclude(self, rank: int, why: str) -> None:
        self.inner.exclude(rank, why)

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "round": self.round}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self.round = int(state["round"])

    def close(self) -> None:
        self.inner.close()
