"""Strategy: *when* to synchronise, *what* to average and how to merge it.

A strategy drives a ``WorkerGroup`` (the workers of this process) and an ``Averager`` (whatever backend),
one synchronisation round at a time. It never knows which backend runs under it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from locoswarm.comm.base import Averager, Round
from locoswarm.worker import WorkerGroup


@dataclass
class RoundReport:
    steps: int  # inner steps each worker took this round
    losses: list[list[float]]  # [steps][local workers]
    compute_seconds: list[float]  # measured compute per local worker
    comm: Round  # the averaging round
    outer_step: bool  # counts as an outer step (diloco's outer update; each ddp step); false for warm-up syncs
    extras: dict = field(default_factory=dict)  # per-round diagnostics logged with the sync row


def sync_step(group: WorkerGroup, averager: Averager, counts: Sequence[int] | None = None) -> RoundReport:
    """One synchronous data-parallel step: every worker's gradient, averaged (token-weighted), applied by all.

    counts: per-worker 1 (takes part) or 0 (absent under churn: weight 0, its gradient is dropped; it still
    applies the group's step, i.e. rejoins from the current params)."""
    losses, grads, seconds = group.compute_grads()
    weights = group.tokens_per_step()
    if counts is not None:
        weights = weights * torch.tensor(counts, dtype=weights.dtype)
    comm = averager.average(grads, weights)
    group.apply_grads(comm.tensors)
    return RoundReport(steps=1, losses=[losses], compute_seconds=seconds, comm=comm, outer_step=False)


@torch.no_grad()
def pseudo_gradient_stats(pseudo: list[torch.Tensor]) -> dict:
    """Per-worker pseudo-gradient norms and the mean pairwise cosine similarity between workers."""
    flat = torch.cat([p.reshape(p.shape[0], -1).float() for p in pseudo], dim=1)  # (L, P)
    norms = flat.norm(dim=1)
    stats = {"pg_norm": norms.tolist()}
    if flat.shape[0] > 1:
        unit = flat / norms.clamp_min(1e-30)[:, None]
        cos = unit @ unit.T  # (L, L)
        n = cos.shape[0]
        stats["pg_cosine"] = float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))
    return stats


class Strategy(ABC):
    def __init__(self, group: WorkerGroup, averager: Averager):
        self.group = group
        self.averager = averager

    @abstractmethod
    def round(self, remaining: int) -> RoundReport:
        """Advance by one synchronisation round of at most ``remaining`` inner steps."""

    def global_params(self) -> list[torch.Tensor]:
        """The parameters to evaluate: the model every worker agrees on at a round boundary."""
        return self.group.params(0)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 - stateless strategies need nothing
        pass
