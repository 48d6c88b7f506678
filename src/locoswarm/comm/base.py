"""The averaging contract every backend implements (sim, torch.distributed, hivemind).

A process hosts L local workers (L = K in the ``sim`` backend, 1 on a real network). It hands the averager
one stacked tensor per parameter, shape (L, *param_shape), and a weight per local worker (the tokens that
worker processed). The averager returns the weighted mean over every worker in the round's group. What
crosses the wire is decided by the averager's codec, so bytes are counted where they are produced.
A backend never knows which algorithm runs over it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Round:
    """The outcome of one averaging round, as seen by this process."""

    tensors: list[torch.Tensor]  # weighted mean over the group, one per parameter, shape = param shape
    group_size: int  # workers whose contributions are in the mean
    bytes_sent: float  # per worker (mean over this process's workers), this round
    bytes_received: float
    seconds: float  # real wall-clock spent exchanging (0 for in-process simulation)
    compression_ratio: float = 1.0  # payload bytes / uncompressed fp32 bytes
    payload_bytes: float = 0.0  # encoded payload per worker (before the topology multiplies it)
    total_weight: float = 0.0
    allgather: bool = False  # the payloads were all-gathered (not summable on the wire): priced as such


class Averager(ABC):
    @abstractmethod
    def average(self, tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> Round:
        """tensors: per parameter (L, *shape); weights: (L,) non-negative. Returns the group's weighted mean."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release network resources; safe to call twice."""
