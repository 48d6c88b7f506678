"""Averaging in a pipeline (pipeline.stages > 1): each stage's peers average that stage's tensors among
themselves, all stages at once.

A strategy hands over what it would for whole-model workers: per parameter a (K, *shape) stack whose row i is
replica i, i.e. of each parameter the copy held by peer i of the stage that owns it. So one logical round is S
rounds, one per stage, each over that stage's peers (global ids stage * K + i, so the network model prices it on
their links) and its own key (``<key>/stage<s>``: its own codecs and residuals). They run side by side: the round
lasts as long as the slowest stage's, and its bytes are per stage peer (``parallel_round``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from locoswarm.comm.base import Averager, Round, parallel_round


class StagedAverager(Averager):
    def __init__(self, inner: Averager, stage_params: Sequence[Sequence[int]], workers: int):
        """inner: averages one stage's tensors (over stage peers' global ids); stage_params: each stage's parameter
        indices; workers: K, peers per stage."""
        self.inner = inner
        self.stage_params = [list(p) for p in stage_params]
        self.workers = workers
        self.params = sum(len(p) for p in self.stage_params)

    def _round(self, tensors: list[torch.Tensor], weights: torch.Tensor, key: str, ranks) -> Round:
        if len(tensors) != self.params:
            raise ValueError(f"a pipeline averages whole replicas: got {len(tensors)} tensors, expected one per "
                             f"parameter ({self.params})")  # fmt: skip
        lanes = list(range(weights.numel())) if ranks is None else list(ranks)
        k = self.workers
        handles = [
            self.inner.start(
                [tensors[i] for i in idx], weights, key=f"{key}/stage{s}", ranks=[s * k + r for r in lanes]
            )
            for s, idx in enumerate(self.stage_params)
        ]
        rounds = [h.wait() for h in handles]
        out: list[torch.Tensor | None] = [None] * self.params
        for idx, rnd in zip(self.stage_params, rounds, strict=True):
            for i, t in zip(idx, rnd.tensors, strict=True):
                out[i] = t
        merged = parallel_round(rounds)
        merged.tensors = out
        merged.key = key
        merged.group_size = max(r.group_size for r in rounds)
        merged.total_weight = float(weights.to(torch.float64).sum())
        merged.members = sorted({r % k for rnd in rounds for r in rnd.members})
        merged.rejected = {r % k: f"stage {r // k}: {why}" for rnd in rounds for r, why in rnd.rejected.items()}
        return merged

    def round_boundary(self) -> None:
        self.inner.round_boundary()

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def close(self) -> None:
        self.inner.close()
        super().close()
