"""How the contributions received in a round become one result: the one place every backend combines them.

A contribution (a *row*) is one member's decoded tensors of the round, ``[tensor_0, tensor_1, ...]``; the rows come
in rank order with their shares (token weights normalised to sum 1). ``combine`` first screens the rows, then
hands the survivors to an ``Aggregator``. The sim backend and the real backends' all-gather and re-quantising
reduce-scatter (``comm/exchange.py``) all call it, so the backends agree bit for bit by construction.

Screening (``screen``) drops a row that is not finite, or whose norm is above ``max_norm_ratio`` x the median
norm of the round's rows, and says why; the kept rows' shares are renormalised. A dropped row is reported by the
averager in ``Round.rejected`` (rank -> reason) and lands in the sync row of metrics.jsonl.

Aggregators:

- ``WeightedMean``: sum_j share_j row_j in rank order (the order is part of the contract: float addition is not
  associative). ``linear``: it can be summed on the wire.
- ``TrimmedMean(trim)``: per coordinate, drop the floor(trim n) smallest and largest values, average the rest.
- ``Median``: per coordinate, the median (the mean of the two middle values for even n).
- ``CenteredClip(tau, iterations)`` (Karimireddy, He and Jaggi 2021): start at the coordinatewise median v and
  repeat v <- v + mean_j (row_j - v) min(1, tau / ||row_j - v||); tau defaults to the median of ||row_j - v||.
  A norm over the whole row, so it is neither linear nor coordinatewise.
The robust ones are unweighted (a share only decides membership): a weight is what a peer claims, and a robust
rule must not let one peer's claim decide the result.

Where each can run (``exchange_path``): a linear aggregator over a summable codec is an all-reduce, in which
nobody sees a single row: screening then sees only the sum, and a non-finite sum rejects the round (a zero update,
every member reported). WeightedMean over blockwise codecs (int8, int4, sign, blocktopk) is the re-quantising
reduce-scatter: each owner
sees every member's piece of its chunk and screens those pieces. Every other combination all-gathers the payloads,
so every peer screens and aggregates the same full rows: exact, at (n - 1) payloads per peer instead of
2 (n - 1) / n. A robust rule per chunk (BTARD's per-part centered clipping, Gorbunov et al. 2022) would keep the
all-reduce's bytes, but then each chunk is clipped by its owner alone and a malicious owner decides its chunk;
BTARD needs its verification protocol for that, which locoswarm does not implement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch

Row = Sequence[torch.Tensor]


class Aggregator(Protocol):
    linear: bool  # a weighted sum: can be summed on the wire
    coordinatewise: bool  # each coordinate depends only on that coordinate of the rows

    def __call__(self, rows: Sequence[Row], shares: Sequence[float]) -> list[torch.Tensor]: ...


class WeightedMean:
    linear = True
    coordinatewise = True

    def __call__(self, rows: Sequence[Row], shares: Sequence[float]) -> list[torch.Tensor]:
        out = [torch.zeros_like(t) for t in rows[0]]
        for row, share in zip(rows, shares, strict=True):
            if share != 0.0:  # a zero share adds nothing (a masked worker's row may be anything)
                for acc, t in zip(out, row, strict=True):
                    acc.add_(t, alpha=share)
        return out


def _stacked(rows: Sequence[Row], i: int) -> torch.Tensor:
    return torch.stack([row[i] for row in rows])  # (n, *shape)


class TrimmedMean:
    linear = False
    coordinatewise = True

    def __init__(self, trim: float = 0.1):
        self.trim = trim

    def __call__(self, rows: Sequence[Row], shares: Sequence[float]) -> list[torch.Tensor]:
        n = len(rows)
        k = min(math.floor(self.trim * n), (n - 1) // 2)  # always keep at least one value
        out = []
        for i in range(len(rows[0])):
            ordered = _stacked(rows, i).sort(dim=0).values
            out.append(ordered[k : n - k].mean(dim=0))
        return out


class Median:
    linear = False
    coordinatewise = True

    def __call__(self, rows: Sequence[Row], shares: Sequence[float]) -> list[torch.Tensor]:
        return [_median(_stacked(rows, i)) for i in range(len(rows[0]))]


def _median(stacked: torch.Tensor) -> torch.Tensor:
    n = stacked.shape[0]
    ordered = stacked.sort(dim=0).values
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


class CenteredClip:
    linear = False
    coordinatewise = False

    def __init__(self, tau: float | None = None, iterations: int = 3):
        self.tau, self.iterations = tau, iterations

    def __call__(self, rows: Sequence[Row], shares: Sequence[float]) -> list[torch.Tensor]:
        v = Median()(rows, shares)
        for _ in range(self.iterations):
            diffs = [[t - c for t, c in zip(row, v, strict=True)] for row in rows]
            norms = [_norm(d) for d in diffs]
            tau = self.tau if self.tau is not None else float(torch.tensor(norms).median())
            step = [torch.zeros_like(c) for c in v]
            for d, norm in zip(diffs, norms, strict=True):
                scale = min(1.0, tau / norm) if norm > 0 else 1.0
                for s, x in zip(step, d, strict=True):
                    s.add_(x, alpha=scale / len(rows))
            v = [c + s for c, s in zip(v, step, strict=True)]
        return v


def _norm(row: Row) -> float:
    """The row's L2 norm (inf/NaN if any value is): per-tensor norms in the row's dtype, combined in float64."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(t)) ** 2 for t in row))


def build_aggregator(cfg) -> Aggregator:
    """From an ``AggregatorConfig`` (or its name)."""
    name = getattr(cfg, "name", cfg)
    name = getattr(name, "value", name)
    if name == "mean":
        return WeightedMean()
    if name == "trimmed_mean":
        return TrimmedMean(cfg.trim)
    if name == "median":
        return Median()
    if name == "centered_clip":
        return CenteredClip(cfg.clip_tau, cfg.iterations)
    raise ValueError(f"aggregator={name!r} is invalid: allowed mean, trimmed_mean, median, centered_clip")


def screen(rows: Sequence[Row], shares: Sequence[float], max_norm_ratio: float | None = None) -> dict[int, str]:
    """Rows to drop (index -> reason): not finite, or a norm above max_norm_ratio x the median norm of the rows
    with a share. Rows without a share are not members and are never reported."""
    out: dict[int, str] = {}
    norms: dict[int, float] = {}
    for j, (row, share) in enumerate(zip(rows, shares, strict=True)):
        if share == 0.0:
            continue
        if not all(bool(torch.isfinite(t).all()) for t in row):
            out[j] = "non-finite values"
        else:
            norms[j] = _norm(row)
    if max_norm_ratio is not None and len(norms) >= 3:  # a median of one or two rows is no reference
        median = float(torch.tensor(list(norms.values()), dtype=torch.float64).median())
        for j, norm in norms.items():
            if norm > max_norm_ratio * median:
                out[j] = f"norm {norm:.4g} > {max_norm_ratio:g} x the median {median:.4g}"
    return out


def combine(
    aggregator: Aggregator, rows: Sequence[Row], shares: Sequence[float], max_norm_ratio: float | None = None
) -> tuple[list[torch.Tensor], dict[int, str]]:
    """Screen, renormalise the kept rows' shares, aggregate. Returns (result, dropped index -> reason); if every
    row is dropped the result is zeros (no update)."""
    if len(rows) != len(shares) or not rows:
        raise ValueError(f"{len(rows)} rows and {len(shares)} shares: need one share per row, at least one row")
    dropped = screen(rows, shares, max_norm_ratio)
    kept = [j for j, s in enumerate(shares) if s != 0.0 and j not in dropped]
    if not kept:
        return [torch.zeros_like(t) for t in rows[0]], dropped
    if not dropped:  # the common case: exactly today's arithmetic, no renormalisation
        return aggregator([rows[j] for j in kept], [shares[j] for j in kept]), dropped
    total = sum(shares[j] for j in kept)
    return aggregator([rows[j] for j in kept], [shares[j] / total for j in kept]), dropped


def reject_nonfinite_sum(result: Sequence[torch.Tensor], members: Sequence[int]) -> tuple[list[torch.Tensor], dict]:
    """An all-reduced sum: nobody saw a single row, so a non-finite sum rejects the whole round (zeros)."""
    if all(bool(torch.isfinite(t).all()) for t in result):
        return list(result), {}
    why = "non-finite sum of an all-reduce (the culprit is not visible; use a robust aggregator to exclude it)"
    return [torch.zeros_like(t) for t in result], dict.fromkeys(members, why)


def exchange_path(summable: bool, reducible: bool, aggregator: Aggregator) -> str:
    """allreduce | reduce_scatter | allgather (see the module docstring)."""
    if aggregator.linear and summable:
        return "allreduce"
    if isinstance(aggregator, WeightedMean) and reducible:
        return "reduce_scatter"
    return "allgather"


def normalised_shares(weights: torch.Tensor) -> list[float]:
    """Token weights -> shares summing to 1 (float64; with one worker the share is exactly 1.0). Raises on
    negative weights or a zero total, naming them."""
    weights = weights.to(torch.float64)
    if weights.ndim != 1 or (weights < 0).any() or not weights.sum() > 0:
        raise ValueError(f"weights must be a non-negative (L,) vector with a positive sum, got {weights.tolist()}")
    return (weights / weights.sum()).tolist()


__all__ = [
    "Aggregator", "CenteredClip", "Median", "TrimmedMean", "WeightedMean", "build_aggregator", "combine",
    "exchange_path", "normalised_shares", "reject_nonfinite_sum", "screen",
]  # fmt: skip
