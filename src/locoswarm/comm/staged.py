"""Averaging in a pipeline (pipeline.stages > 1): each stage's peers average that stage's tensors among
themselves, all stages at once.

A strategy hands over what it would for whole-model workers: per parameter a (C, *shape) stack whose row c is
replica (column) c, i.e. of each parameter the copy held by the peer serving its stage from column c. So one logical
round is S rounds, one per stage, each over the peers serving that stage (their global ids, so the network model
prices it on their links; a free slot takes no part) and its own key (``<key>/stage<s>``: its own codecs and
residuals). A stage's peers count equally: the tokens are the workers', and a ddp peer's contribution is already
scaled to its share (``pipeline/group.py``). The stage rounds run side by side: the round lasts as long as the
slowest stage's, and its bytes are per stage peer (``parallel_round``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from locoswarm.comm.base import Averager, Round, parallel_round


class StagedAverager(Averager):
    def __init__(
        self, inner: Averager, stage_params: Sequence[Sequence[int]], stage_peers: Callable[[int], list[int | None]]
    ):
        """inner: averages one stage's tensors (rows ranked by peer id); stage_params: each stage's parameter
        indices; stage_peers(s): per column, the peer serving stage s there (None: a free slot)."""
        self.inner = inner
        self.stage_params = [list(p) for p in stage_params]
        self.stage_peers = stage_peers
        self.params = sum(len(p) for p in self.stage_params)

    def _round(self, tensors: list[torch.Tensor], weights: torch.Tensor, key: str, ranks) -> Round:
        if len(tensors) != self.params:
            raise ValueError(f"a pipeline averages whole replicas: got {len(tensors)} tensors, expected one per "
                             f"parameter ({self.params})")  # fmt: skip
        handles, column_of = [], {}
        for s, idx in enumerate(self.stage_params):
            peers = self.stage_peers(s)
            if len(peers) != weights.numel():
                raise ValueError(f"stage {s} has {len(peers)} slots, the round {weights.numel()} rows")
            column_of.update({p: c for c, p in enumerate(peers) if p is not None})
            serving = torch.tensor([p is not None for p in peers], dtype=torch.float64)
            ranks_s = [p if p is not None else -1 - c for c, p in enumerate(peers)]  # a free slot sends nothing
            handles.append(self.inner.start([tensors[i] for i in idx], serving, key=f"{key}/stage{s}", ranks=ranks_s))
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
        merged.members = sorted({column_of[r] for rnd in rounds for r in rnd.members})
        merged.rejected = {
            column_of[r]: f"stage {s}: {why}" for s, rnd in enumerate(rounds) for r, why in rnd.rejected.items()
        }
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
