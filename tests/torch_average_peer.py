"""One rank of ``test_ranks_without_weight_get_the_groups_mean``: a TorchDistAverager averages fixed inputs over
a few rounds with the given per-rank weights and saves what it got. Run by torchrun, not by pytest."""

from __future__ import annotations

import os
import sys

import torch

from locoswarm.comm.torch_dist import TorchDistAverager
from locoswarm.config import Config

SHAPES = [(40, 24), (24,), (301,)]


def inputs(rank: int, round_: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 * round_ + rank)
    return [torch.randn(s, generator=g) for s in SHAPES]


def main(out_dir: str, codec: str, weights: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    rounds = [[float(w) for w in row.split(",")] for row in weights.split(";")]  # per round, per rank
    cfg = Config()
    cfg.workers, cfg.device, cfg.seed = world, "cpu", 5
    cfg.compression.name, cfg.compression.ratio, cfg.compression.error_feedback = codec, 0.25, True
    averager = TorchDistAverager(cfg)
    try:
        results = []
        for r, row in enumerate(rounds):
            out = averager.average([t.unsqueeze(0) for t in inputs(rank, r)], torch.tensor([row[rank]]))
            results.append({"tensors": out.tensors, "group": out.group_size, "members": out.members,
                            "sent": out.bytes_sent, "received": out.bytes_received})  # fmt: skip
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        averager.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
