"""``backend=torch``: torch.distributed (gloo on CPU, nccl on GPU), one worker per process, launched by torchrun.

  torchrun --nproc_per_node=4 -m locoswarm.cli.train backend=torch workers=4 ...

Rank and world size come from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``); the world size must equal ``workers``. Rank r hosts worker r (its data shard); rank 0 writes
the Hydra run dir, rank r > 0 writes ``<that dir>/rank-<r>/``.

The weighted mean is computed like the ``sim`` backend's: the token weights are summed first (one tiny float64
all-reduce), each rank scales its tensors by its share, and one flat fp32 all-reduce sums them, so the result
matches ``sim`` to float32 rounding. torch.distributed is not fault tolerant: a rank that dies fails the job
(after ``backend.dist_timeout``); use ``backend=hivemind`` for peers that come and go.

Bytes: torch.distributed does not report them; ``Round.bytes_sent`` / ``bytes_received`` are those of a
bandwidth-optimal ring all-reduce, 2(K-1)/K of the fp32 payload each way (what gloo's and nccl's ring
algorithms move). ``Round.seconds`` is measured.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from locoswarm.comm.base import Averager, Round
from locoswarm.config import Config

log = logging.getLogger(__name__)


def ring_bytes(world: int, payload_bytes: float) -> float:
    return 0.0 if world <= 1 else 2.0 * (world - 1) / world * payload_bytes


class TorchDistAverager(Averager):
    def __init__(self, cfg: Config):
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(
                f"backend=torch needs torchrun's environment ({', '.join(missing)} unset): launch with "
                f"torchrun --nproc_per_node={cfg.workers} -m locoswarm.cli.train backend=torch workers={cfg.workers}"
            )
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        if self.world != cfg.workers:
            raise ValueError(
                f"workers={cfg.workers} is invalid: backend=torch runs one worker per rank and torchrun started "
                f"{self.world} (set workers={self.world} or --nproc_per_node={cfg.workers})"
            )
        backend = cfg.backend.dist_backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
        if backend == "nccl":
            # This rank's GPU becomes the current device, so device=auto/cuda resolves to it.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", self.rank % torch.cuda.device_count())))
        self.backend = backend
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.backend.dist_timeout))
        log.info("torch.distributed: rank %d of %d over %s", self.rank, self.world, backend)

    def run_dir_for(self, local_dir: str | Path) -> Path:
        """Rank 0's run dir for rank 0; ``<rank 0's dir>/rank-<r>`` for the others (one dir per run)."""
        obj = [str(local_dir)]
        dist.broadcast_object_list(obj, src=0)
        root = Path(obj[0])
        return root if self.rank == 0 else root / f"rank-{self.rank}"

    @torch.no_grad()
    def average(self, tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> Round:
        if weights.numel() != 1 or any(t.shape[0] != 1 for t in tensors):
            raise ValueError("backend=torch hosts exactly one worker per rank (got a stacked batch > 1)")
        t0 = time.perf_counter()
        total = weights.to(self.device, torch.float64).sum().reshape(1)
        dist.all_reduce(total)
        share = float(weights.sum()) / float(total)
        flat = torch.cat([t[0].reshape(-1).to(self.device, torch.float32) for t in tensors])
        flat.mul_(share)
        dist.all_reduce(flat)
        out, offset = [], 0
        for t in tensors:
            n = t[0].numel()
            out.append(flat[offset : offset + n].view_as(t[0]).to(t.device, t.dtype))
            offset += n
        payload = float(flat.numel() * 4)
        wire = ring_bytes(self.world, payload)
        return Round(
            tensors=out,
            group_size=self.world,
            bytes_sent=wire,
            bytes_received=wire,
            seconds=time.perf_counter() - t0,
            compression_ratio=1.0,
            payload_bytes=payload,
            total_weight=float(total),
        )

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
