"""Sparsification: ``topk`` (largest magnitudes, indices sent), ``blocktopk`` (the largest in every block) and
``randomk`` (shared random indices, not sent).

Both keep k = min(n, ceil(ratio * n)) of the n entries (ratio * n rounded to 6 decimals first, so that 0.07 * 100
keeps 7, not 8) and decode the rest to 0. Kept entries are sent in the tensor's own dtype, so they decode
exactly. Neither rescales (random-k is the biased variant): use error feedback to recover the dropped mass.

- topk wire: ``values`` k x tensor dtype + ``indices`` k x int32, strictly increasing (which also rules out
  duplicates) -> 8k bytes for fp32, ratio 2 * k / n. Error: kept entries exact; every dropped entry has
  |x| <= every kept |x|, so ||x - x̂||² <= (1 - k/n) * ||x||² (a contraction). Ties are broken by ``torch.topk``,
  which may differ between CPU and CUDA.
- blocktopk wire: the flattened tensor is cut into blocks of B = ``block_size`` entries (the last may be
  shorter, c < B) and each block keeps its own kb = keep_count(ratio, B) largest magnitudes (keep_count(ratio, c)
  for the short one): ``values`` k x tensor dtype + ``offsets`` k x int16, each kept entry's position within its
  block, strictly increasing per block -> 6k bytes for fp32 (B <= 32768). Same error bound as topk, per block.
  Reducible (``Codec.reducible``): a block's entries sit at a fixed place in the payload, so the payload of a run
  of whole blocks is a slice of the whole one, and a group averages blocktopk payloads by the re-sparsifying
  reduce-scatter of ``comm/exchange.py`` (each chunk's owner sends everyone the block top-k of the members' mean):
  2(n-1)/n payloads per worker where topk's all-gather moves n-1. The price: the group's mean is sparsified again
  (the members' kept entries need not coincide), and a dense region keeps no more than kb entries per block.
- randomk wire: ``values`` k x tensor dtype only -> 4k bytes for fp32, ratio k / n. The indices of round r are
  stratified: [0, n) is cut into k strata [floor(j n / k), floor((j + 1) n / k)) and one index is drawn
  uniformly in each, from a CPU generator seeded with hash(seed, r). So they are distinct, sorted, every entry
  is kept with probability ~k/n (1 / its stratum's size), and drawing them costs O(k), not the O(n) of a
  ``randperm`` (0.17 s for 4M entries on a CPU core). Every encode advances r, so workers that share the seed
  (and torch version) pick the same indices each round without sending them. Error: kept entries exact,
  dropped ones lost, so |x - x̂| <= |x| and ||x - x̂|| <= ||x||. The round is in ``payload.meta`` (agreed by
  both ends, not sent).
"""

from __future__ import annotations

import hashlib
import math

import torch

from locoswarm.compression.base import BlockwiseCodec, BufferSpec, Codec, Payload, check_block_size, numel, require

_MAX_INT32 = 2**31 - 1


def keep_count(ratio: float, n: int) -> int:
    """k = min(n, ceil(ratio * n)), with ratio * n rounded to 6 decimals to absorb float noise."""
    return min(n, math.ceil(round(ratio * n, 6)))


def _check_ratio(ratio: float) -> float:
    if not 0 < float(ratio) <= 1:
        raise ValueError(f"compression.ratio={ratio!r} is invalid: must be in (0, 1]")
    return float(ratio)


def _scatter(values: torch.Tensor, indices: torch.Tensor, payload: Payload) -> torch.Tensor:
    out = values.new_zeros(numel(payload.shape))
    out[indices.long()] = values
    return out.reshape(payload.shape).to(payload.dtype)


class TopKCodec(Codec):
    name = "topk"

    def __init__(self, ratio: float) -> None:
        self.ratio = _check_ratio(ratio)

    def encode(self, tensor: torch.Tensor) -> Payload:
        x = tensor.detach().reshape(-1)
        n = x.numel()
        if n > _MAX_INT32:
            raise ValueError(f"topk: {n} entries do not fit int32 indices")
        k = keep_count(self.ratio, n)
        idx = torch.topk(x.abs(), k, sorted=False).indices.sort().values
        return Payload({"values": x[idx], "indices": idx.to(torch.int32)}, tuple(tensor.shape), tensor.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        self.check_payload(payload)
        n = numel(payload.shape)
        idx = payload.buffers["indices"]
        require((idx >= 0).all() & (idx < n).all(), self.name, f"an index is outside [0, {n})")
        require((idx[1:] > idx[:-1]).all(), self.name, "indices must be strictly increasing (no duplicates)")
        return _scatter(payload.buffers["values"], idx, payload)

    def layout(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[BufferSpec]:
        k = keep_count(self.ratio, numel(shape))
        return [("indices", torch.int32, k), ("values", dtype, k)]


class BlockTopKCodec(BlockwiseCodec):
    name = "blocktopk"
    reducible = True

    def __init__(self, ratio: float, block_size: int = 1024) -> None:
        self.ratio = _check_ratio(ratio)
        self.block_size = check_block_size(block_size)
        if self.block_size > 2**15:
            raise ValueError(f"compression.block_size={block_size} is too large for blocktopk: at most 32768 "
                             "(offsets within a block are int16)")  # fmt: skip
        self.per_block = keep_count(self.ratio, self.block_size)

    def _blocks(self, n: int) -> tuple[int, int, int]:
        """(full blocks, entries of the short last block or 0, entries kept there)."""
        full, rest = divmod(n, self.block_size)
        return full, rest, keep_count(self.ratio, rest) if rest else 0

    def kept(self, n: int) -> int:
        full, _, last = self._blocks(n)
        return full * self.per_block + last

    def encode(self, tensor: torch.Tensor) -> Payload:
        x = tensor.detach().reshape(-1)
        full, rest, last = self._blocks(x.numel())
        values, offsets = [], []
        if full:
            b = x[: full * self.block_size].reshape(full, self.block_size)
            o = torch.topk(b.abs(), self.per_block, dim=1, sorted=False).indices.sort(dim=1).values
            values.append(b.gather(1, o).reshape(-1))
            offsets.append(o.reshape(-1))
        if rest:
            tail = x[full * self.block_size :]
            o = torch.topk(tail.abs(), last, sorted=False).indices.sort().values
            values.append(tail[o])
            offsets.append(o)
        v = torch.cat(values) if values else x.new_empty(0)
        o = torch.cat(offsets).to(torch.int16) if offsets else torch.empty(0, dtype=torch.int16, device=x.device)
        return Payload({"values": v, "offsets": o}, tuple(tensor.shape), tensor.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        self.check_payload(payload)
        full, rest, last = self._blocks(numel(payload.shape))
        values, offsets = payload.buffers["values"], payload.buffers["offsets"].long()
        out = values.new_zeros(numel(payload.shape))
        cut = full * self.per_block
        for o, v, size, start in ((offsets[:cut].reshape(full, self.per_block), values[:cut], self.block_size, 0),
                                  (offsets[cut:].reshape(1 if rest else 0, last), values[cut:], rest,
                                   full * self.block_size)):  # fmt: skip
            require(((o >= 0) & (o < size)).all(), self.name, f"an offset is outside its block [0, {size})")
            require((o[:, 1:] > o[:, :-1]).all(), self.name, "offsets must be strictly increasing within a block")
            base = start + torch.arange(o.shape[0], device=o.device)[:, None] * self.block_size
            out[(o + base).reshape(-1)] = v
        return out.reshape(payload.shape).to(payload.dtype)

    def layout(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[BufferSpec]:
        k = self.kept(numel(shape))
        return [("offsets", torch.int16, k), ("values", dtype, k)]

    def slice_blocks(self, payload: Payload, lo: int, hi: int) -> Payload:
        start, stop = self.chunk_entries(payload, lo, hi)
        first, count = lo * self.per_block, self.kept(stop - start)  # every block before lo is a full one
        buffers = {key: b[first : first + count] for key, b in payload.buffers.items()}
        return Payload(buffers, (stop - start,), payload.dtype)


class RandomKCodec(Codec):
    name = "randomk"
    summable = True  # peers of one round share the indices, so their value vectors add up entry by entry

    def __init__(self, ratio: float, seed: int = 0) -> None:
        self.ratio = _check_ratio(ratio)
        self.seed = int(seed)
        self.round = 0  # the round the next encode uses
        self._cache: tuple[int, int, torch.device, torch.Tensor] | None = None  # (round, n, device, indices)

    def indices(self, round_: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The sorted int64 indices of round ``round_`` for a tensor of n entries (a pure function of seed, round)."""
        device = torch.device(device)
        if self._cache is not None and self._cache[:3] == (round_, n, device):
            return self._cache[3]
        digest = hashlib.blake2b(f"{self.seed}:{round_}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        k = keep_count(self.ratio, n)
        starts = torch.arange(k + 1, dtype=torch.int64) * n // k if k else torch.zeros(1, dtype=torch.int64)
        sizes = starts[1:] - starts[:-1]  # >= 1 since k <= n
        # drawn on the CPU whatever the tensor's device, so CPU and CUDA workers agree
        offsets = (torch.rand(k, generator=gen, dtype=torch.float64) * sizes).long().clamp_(max=sizes - 1)
        return (starts[:-1] + offsets).to(device)

    def align_round(self, round_: int) -> None:
        self.round = int(round_)

    def encode(self, tensor: torch.Tensor) -> Payload:
        x = tensor.detach().reshape(-1)
        r = self.round
        idx = self.indices(r, x.numel(), x.device)
        self._cache = (r, x.numel(), x.device, idx)
        self.round += 1
        return Payload({"values": x[idx]}, tuple(tensor.shape), tensor.dtype, {"round": r})

    def decode(self, payload: Payload) -> torch.Tensor:
        self.check_payload(payload)
        r = payload.meta.get("round")
        require(isinstance(r, int) and r >= 0, self.name, f"payload.meta['round'] must be an int >= 0, got {r!r}")
        values = payload.buffers["values"]
        return _scatter(values, self.indices(r, numel(payload.shape), values.device), payload)

    def wire_meta(self) -> dict:
        return {"round": self.round - 1} if self.round > 0 else {}

    def layout(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[BufferSpec]:
        return [("values", dtype, keep_count(self.ratio, numel(shape)))]
