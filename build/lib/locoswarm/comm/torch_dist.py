"""``backend=torch``: torch.distributed (gloo on CPU, nccl on GPU), one worker per process, launched by torchrun.

  torchrun --nproc_per_node=4 -m locoswarm.cli.train backend=torch workers=4 ...

Rank and world size come from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``); the world size must equal ``workers``. Rank r hosts worker r (its data shard); rank 0 writes
the Hydra run dir, rank r > 0 writes ``<that dir>/rank-<r>/``.

Every codec works here, with the ``sim`` backend's seeds (random-k's indices, PowerSGD's first Q), and the way
``comm/exchange.py`` describes; each rank keeps one codec per tensor (error feedback, PowerSGD's warm start) and
a round counter that keys random-k's shared indices, both in ``state_dict`` so a resume continues them.

- **summable codecs** (``none``, ``fp16``, ``bf16``, ``randomk``): the token weights are summed first (one tiny
  float64 all-reduce); each rank encodes, scales its wire buffer (the fp32 tensor for ``none``, its 2-byte cast
  for ``fp16``/``bf16``, its k shared-index values for ``randomk``) by its share in the wire dtype, and one
  all-reduce (SUM) of that buffer, in that dtype, sums the group's; every rank decodes the sum once. ``none`` and
  ``randomk`` match ``sim`` to float32 rounding. ``fp16``/``bf16`` also round each scaled buffer and every
  partial sum (each ring hop) to 2 bytes, where ``sim`` decodes and sums in fp32: they match ``sim`` to about
  their own precision, not bit for bit. gloo (torch 2.13, CPU) and nccl all-reduce fp16 and bf16 natively.
- **reducible codecs** (``int8``, ``int4``: blockwise quantisers): the ranks' float64 token weights are
  all-gathered first (8 bytes each), which fixes the group (the ranks with a positive weight, in rank order),
  the shares (computed as ``sim`` does) and which blocks each member owns (``exchange.owner_blocks``). Stage 1:
  every member sends each other member its payload's slice of that member's blocks (point-to-point,
  ``batch_isend_irecv``); stage 2: each member decodes the slices it received, sums ``share x decode`` in rank
  order, re-encodes the mean with the codec and sends it to every other rank, which decode and concatenate.
  That is ``sim``'s arithmetic on the same chunks, so the result equals ``sim``'s bit for bit, and each member
  sends 2(n-1)/n of a payload on average, like an all-reduce. With one member, its payload is passed on as is.
- **other codecs** (``sign``, ``topk``, ``powersgd``, ``int4`` with an odd block size; with or without EF): each
  rank packs its whole payload (``packed_size`` bytes, the same on every rank) behind its float64 token weight,
  and one all-gather of those uint8 buffers hands every rank every payload; every rank decodes all of them and
  sums ``share x decode`` in rank order with the shares computed as ``sim`` does, so the result equals ``sim``'s
  bit for bit.

The aggregator (``aggregator=...``, ``aggregator.max_norm_ratio``) joins the codec in choosing the path, exactly
as on ``sim`` (``aggregate.exchange_path``): a robust aggregator (trimmed_mean, median, centered_clip) all-gathers
whatever the codec, and every rank screens and aggregates the same rows (``aggregate.combine``); mean over a
summable codec all-reduces, so only the sum can be screened (a non-finite sum rejects the round: zeros, every
member reported); mean over int8/int4 reduce-scatters, each owner screens the pieces of its chunk and the owners'
reports are all-gathered (a small object all-gather), so every rank's ``Round.rejected`` (rank -> reason) is the
sim's. A rank whose codec refuses its input (a quantiser and NaN) sends zeros with weight 0 and reports itself.

A rank whose weight is 0 takes part in the collectives with a zero contribution but leaves its codecs' state
alone (as ``sim`` skips a masked worker); ``group_size`` counts the ranks with a positive weight and
``Round.members`` lists them (the all-reduce path sums a one-hot flag per rank with the total weight: world x 8
bytes more in the tiny float64 all-reduce it already does). The result
comes back on the caller's device and dtype; the collective runs on ``self.device`` (this rank's GPU for nccl).
torch.distributed is not fault tolerant: a rank that dies fails the job (after ``backend.dist_timeout``); use
``backend=hivemind`` for peers that come and go.

Threads: rounds run on the averager's one background thread (``Averager.start``), in start order, so every rank
issues the same collectives in the same order while its main thread trains (streaming DiLoCo's overlap). The main
thread issues no collective once training has begun (``run_dir_for`` runs before the first round), so the two
threads never interleave collectives on the process group. A round reads only the tensors it was handed
(pseudo-gradients, never the live parameters) and encodes them in the background thread with the codecs of its
key, which only that thread touches; ``state_dict`` first waits for the rounds in flight, so a checkpoint never
sees a codec or the round counter mid-round. The result is therefore the same whatever the timing.

Bytes: torch.distributed does not report them; ``Round.bytes_sent`` / ``bytes_received`` are those of the
algorithm's wire pattern for this rank's payload: a bandwidth-optimal ring all-reduce (2(K-1)/K of it each way)
for summable codecs, what this rank really sent and received in the two stages for reducible ones, an all-gather
((K-1) payloads each way, ``Round.allgather``) for the others; the weights' 8 bytes are not counted. ``Round.seconds`` is measured (encoding and decoding included).
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from locoswarm.comm.aggregate import build_aggregator, exchange_path, reject_nonfinite_sum
from locoswarm.comm.base import Averager, Round
from locoswarm.comm.exchange import LocalCodecs, allgather_bytes, merge_dropped
from locoswarm.config import AggregatorConfig, Config

log = logging.getLogger(__name__)

_WEIGHT_BYTES = 8  # the float64 token weight that leads each rank's all-gathered buffer


def ring_bytes(world: int, payload_bytes: float) -> float:
    return 0.0 if world <= 1 else 2.0 * (world - 1) / world * payload_bytes


class TorchDistAverager(Averager):
    def __init__(self, cfg: Config, aggregator: AggregatorConfig | None = None):
        """cfg: the run's config; aggregator: how contributions are screened and combined (default
        ``cfg.aggregator``; comm/aggregate.py), which with the codec decides the exchange path."""
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
        # The sim backend's codec seeds, so random-k's indices and PowerSGD's first Q agree with it; one set of
        # codecs per stream of rounds (key); the sequence number of rounds started keys random-k's shared indices.
        self.compression, self.seed = cfg.compression, cfg.seed
        self.codecs: dict[str, LocalCodecs] = {}
        self.round = 0
        agg = aggregator if aggregator is not None else cfg.aggregator
        self.aggregator, self.max_norm_ratio = build_aggregator(agg), agg.max_norm_ratio
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.backend.dist_timeout))
        log.info("torch.distributed: rank %d of %d over %s", self.rank, self.world, backend)

    def run_dir_for(self, local_dir: str | Path) -> Path:
        """Rank 0's run dir for rank 0; ``<rank 0's dir>/rank-<r>`` for the others (one dir per run)."""
        obj = [str(local_dir)]
        dist.broadcast_object_list(obj, src=0)
        root = Path(obj[0])
        return root if self.rank == 0 else root / f"rank-{self.rank}"

    asynchronous = True  # rounds run on one background thread, in start order (the same order on every rank)

    def _codecs_for(self, key: str) -> LocalCodecs:
        if key not in self.codecs:
            self.codecs[key] = LocalCodecs(self.compression, self.seed, key)
        return self.codecs[key]

    @torch.no_grad()
    def _round(self, tensors: list[torch.Tensor], weights: torch.Tensor, key: str, ranks) -> Round:
        if weights.numel() != 1 or any(t.shape[0] != 1 for t in tensors):
            raise ValueError("backend=torch hosts exactly one worker per rank (got a stacked batch > 1)")
        weight = float(weights.to(torch.float64).sum())
        if not weight >= 0:
            raise ValueError(f"weights must be non-negative, got {weights.tolist()}")
        t0 = time.perf_counter()
        rows = [t[0].to(self.device) for t in tensors]
        # A rank without weight encodes with a throwaway copy: its residuals and warm starts stay as they were.
        mine = self._codecs_for(key)
        codecs = mine if weight > 0 else copy.deepcopy(mine)
        number = self.round
        self.round += 1
        unsent: dict[int, str] = {}
        try:
            payloads = codecs.encode(rows, round_=number)
        except ValueError as e:  # e.g. a quantiser refuses NaN: this rank sends nothing this round (as on sim)
            log.warning("round %d (%s): could not encode this rank's contribution: %s", number, key, e)
            unsent[self.rank] = f"could not encode: {e}"
            weight, codecs = 0.0, copy.deepcopy(mine)  # a valid payload of zeros keeps the collectives in step
            payloads = codecs.encode([torch.zeros_like(r) for r in rows], round_=number)
        payload_bytes = float(sum(p.nbytes for p in payloads))
        raw_bytes = float(sum(r.numel() * 4 for r in rows))
        path = exchange_path(codecs.summable, codecs.reducible, self.aggregator)
        if path == "allreduce":
            results, total, members = self._all_reduce(codecs, payloads, weight)
            # summed on the wire: only the sum can be screened (comm/aggregate.py)
            results, dropped = reject_nonfinite_sum(results, members)
            sent = received = ring_bytes(self.world, payload_bytes)
        elif path == "reduce_scatter":
            results, total, members, sent, received, dropped = self._reduce_scatter(codecs, payloads, weight)
        else:
            results, total, members, dropped = self._all_gather(codecs, rows, payloads, weight)
            sent = received = allgather_bytes(self.world, payload_bytes)
        return Round(
            tensors=[r.to(t.device, t.dtype) for r, t in zip(results, tensors, strict=True)],
            group_size=len(members),
            bytes_sent=sent,
            bytes_received=received,
            seconds=time.perf_counter() - t0,
            compression_ratio=payload_bytes / raw_bytes if raw_bytes else 1.0,
            payload_bytes=payload_bytes,
            total_weight=total,
            allgather=path == "allgather",
            key=key,
            members=members,
            rejected=dict(sorted({**dropped, **unsent}.items())),
        )

    def _all_reduce(self, codecs: LocalCodecs, payloads, weight: float) -> tuple[list[torch.Tensor], float, list[int]]:
        """Summable payloads: sum share x wire buffer over the ranks (in the wire dtype), decode the sum once.
        Returns (mean per tensor, total weight, the ranks with weight)."""
        stats = torch.zeros(1 + self.world, dtype=torch.float64, device=self.device)
        stats[0], stats[1 + self.rank] = weight, float(weight > 0)  # the total weight, then who has weight
        dist.all_reduce(stats)
        total = float(stats[0])
        members = [r for r, flag in enumerate(stats[1:].tolist()) if flag > 0]
        _check_total(total)
        wire = codecs.wire_values(payloads).to(self.device)  # a copy (torch.cat): scaled in place
        wire.mul_(weight / total)
        dist.all_reduce(wire)
        return codecs.decode_values(wire, payloads), total, members

    def _reduce_scatter(self, codecs: LocalCodecs, payloads, weight: float):
        """Reducible payloads: re-quantising reduce-scatter among the ranks with weight, then gather to all ranks;
        each owner screens the pieces of its chunk, and the owners' reports are all-gathered (a small object
        all-gather, not counted in the bytes) so every rank reports the same rejections as the sim.
        Returns (mean per tensor, total weight, the ranks with weight, bytes sent, bytes received, rejected
        rank -> reason)."""
        mine = torch.tensor([weight], dtype=torch.float64, device=self.device)
        everyone = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(everyone, mine)
        weights = torch.cat(everyone).cpu()
        total = float(weights.sum())
        _check_total(total)
        shares = (weights / weights.sum()).tolist()  # the sim backend's shares, in rank (= worker) order
        members = [r for r in range(self.world) if shares[r] != 0.0]
        n = len(members)
        sizes = codecs.chunk_sizes(payloads, n)
        owned = members.index(self.rank) if self.rank in members else None
        sent = received = 0
        reduced: list[bytes | None] = [None] * n
        report: list[dict[int, str]] = []  # this owner's screening, per tensor: member index -> reason
        if owned is not None:
            pieces = codecs.split(payloads, n)
            if n == 1:
                reduced[0] = pieces[0]  # nothing to average: the payload as is (sim decodes it once too)
            else:  # stage 1: my slice of each member's blocks to that member; theirs of mine to me
                inbox = {r: _empty(sizes[owned], self.device) for r in members if r != self.rank}
                ops = [dist.P2POp(dist.irecv, t, r) for r, t in inbox.items()]
                ops += [
                    dist.P2POp(dist.isend, _tensor(pieces[j], self.device), r)
                    for j, r in enumerate(members)
                    if r != self.rank
                ]
                _run_p2p(ops)
                sent += sum(sizes) - sizes[owned]
                received += (n - 1) * sizes[owned]
                blobs = [pieces[owned] if r == self.rank else _bytes(inbox[r]) for r in members]
                reduced[owned], report = codecs.reduce_owned_screened(
                    owned, n, blobs, [shares[r] for r in members], payloads, self.max_norm_ratio
                )
        # stage 2: every member's reduced chunk to every other rank (members and ranks without weight alike)
        inbox = {j: _empty(sizes[j], self.device) for j, r in enumerate(members) if r != self.rank}
        ops = [dist.P2POp(dist.irecv, t, members[j]) for j, t in inbox.items()]
        if owned is not None:
            chunk = _tensor(reduced[owned], self.device)
            ops += [dist.P2POp(dist.isend, chunk, r) for r in range(self.world) if r != self.rank]
            sent += (self.world - 1) * sizes[owned]
        _run_p2p(ops)
        received += sum(sizes[j] for j in inbox)
        for j, t in inbox.items():
            reduced[j] = _bytes(t)
        dropped: dict[int, str] = {}
        if n > 1:
            reports: list = [None] * self.world
            dist.all_gather_object(reports, report)
            per_owner = [reports[r] for r in members]  # owner order = member order, as the sim's chunks
            dropped = {members[j]: why for j, why in merge_dropped(per_owner).items()}
        return codecs.assemble(reduced, payloads), total, members, float(sent), float(received), dropped

    def _all_gather(
        self, codecs: LocalCodecs, rows, payloads, weight: float
    ) -> tuple[list[torch.Tensor], float, list[int], dict[int, str]]:
        """Other payloads (and any codec under a robust aggregator): all-gather [weight | payload] from every rank,
        decode all, screen and aggregate them in rank order (the sim's ``combine``). Returns (result per tensor,
        total weight, the ranks with weight, rejected rank -> reason)."""
        size = codecs.packed_size(rows)
        blob = codecs.pack(payloads)
        if len(blob) != size:
            raise ValueError(f"this rank's payload has {len(blob)} bytes, expected {size}")
        header = torch.tensor([weight], dtype=torch.float64).view(torch.uint8)
        mine = torch.cat([header, torch.frombuffer(bytearray(blob), dtype=torch.uint8) if size else header[:0]])
        mine = mine.to(self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
        gathered_cpu = torch.stack(gathered).cpu()  # (world, 8 + size), rank order
        weights = gathered_cpu[:, :_WEIGHT_BYTES].contiguous().view(torch.float64).reshape(-1)
        total = float(weights.sum())
        _check_total(total)
        shares = (weights / weights.sum()).tolist()  # exactly the sim backend's shares, in rank (= worker) order
        # share 0 adds nothing, so leaving those payloads out changes no bit (and skips decoding them)
        members = [r for r in range(self.world) if shares[r] != 0.0]
        blobs = [gathered_cpu[r, _WEIGHT_BYTES:].numpy().tobytes() for r in members]
        result, dropped = codecs.decode_combine(
            blobs, [shares[r] for r in members], payloads, self.aggregator, self.max_norm_ratio
        )
        return result, total, members, {members[j]: why for j, why in dropped.items()}

    def state_dict(self) -> dict:
        # Codecs carry state across rounds (error-feedback residuals, PowerSGD's warm start): a resume needs them.
        # Rounds in flight update them in the background thread: wait for those first.
        self._idle()
        return {"codecs": {k: c.state_dict() for k, c in self.codecs.items()}, "round": self.round}

    def _idle(self) -> None:
        """Wait until every round started so far has finished (the background thread runs them in order)."""
        if self._executor is not None:
            self._submit(_nothing).wait()

    def load_state_dict(self, state: dict) -> None:
        for k, c in state["codecs"].items():
            self._codecs_for(k).load_state_dict(c)
        self.round = int(state["round"])

    def close(self) -> None:
        super().close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _empty(size: int, device: torch.device) -> torch.Tensor:
    return torch.empty(size, dtype=torch.uint8, device=device)


def _tensor(blob: bytes, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device) if blob else _empty(0, device)


def _bytes(t: torch.Tensor) -> bytes:
    return t.cpu().numpy().tobytes()


def _run_p2p(ops: list) -> None:
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def _nothing() -> None:
    return None


def _check_total(total: float) -> None:
    # every rank sees the same total, so every rank raises (no rank is left waiting in a collective)
    if not total > 0:
        raise ValueError(f"the group's token weights sum to {total}: at least one rank needs a positive weight")
