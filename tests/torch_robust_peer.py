"""One rank of ``test_torch_screens_and_aggregates_like_sim``: a TorchDistAverager with an aggregator averages
fixed inputs for two rounds, the last rank sending a bad contribution (NaN, or x100), and saves what it got. Run
by torchrun, not by pytest."""

from __future__ import annotations

import os
import sys

import torch

from locoswarm.comm.torch_dist import TorchDistAverager
from locoswarm.config import AggregatorConfig, Config

SHAPES = [(40, 24), (24,), (301,)]
ROUNDS = 2


def inputs(rank: int, round_: int, world: int, attack: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 * round_ + rank)
    tensors = [torch.randn(s, generator=g) for s in SHAPES]
    if rank == world - 1 and attack == "nan":
        return [torch.full_like(t, float("nan")) for t in tensors]
    if rank == world - 1 and attack == "scale":
        return [100 * t for t in tensors]
    return tensors


def main(out_dir: str, codec: str, aggregator: str, ratio: str, attack: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = Config()
    cfg.workers, cfg.device, cfg.seed = world, "cpu", 5
    cfg.compression.name = codec
    agg = AggregatorConfig(name=aggregator, max_norm_ratio=float(ratio) if ratio != "none" else None)
    averager = TorchDistAverager(cfg, aggregator=agg)
    try:
        results = []
        for r in range(ROUNDS):
            out = averager.average([t.unsqueeze(0) for t in inputs(rank, r, world, attack)], torch.tensor([1.0 + rank]))
            results.append({"tensors": out.tensors, "members": out.members, "rejected": out.rejected,
                            "allgather": out.allgather})  # fmt: skip
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        averager.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
