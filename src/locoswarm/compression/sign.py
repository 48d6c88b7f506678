"""1-bit sign compression with a per-block scale: ``sign``.

The flattened tensor is cut into blocks of ``block_size`` entries (the last one may be shorter, with c < B
entries). Each block sends m = mean |x| over its c real entries, and each entry one bit, 1 for x >= 0 (zero
counts as positive), 0 for x < 0; x̂ = m * (+1 | -1).

Wire (n entries, nb = ceil(n / B)): ``bits`` ceil(n/8) x uint8, entry i in bit (i % 8) of byte i // 8 (LSB
first; unused trailing bits are 0) + ``scales`` nb x fp32 -> 1/8 + 4/B bytes/entry (ratio 0.047 at B = 64).

Reducible (``Codec.reducible``) when ``block_size`` is a multiple of 8: blocks are encoded independently and
start on a byte, so the payload of a run of whole blocks is the slice of the whole payload (their scales, the
bytes of their bits; the last block's unused trailing bits are 0 either way). A group then averages sign
payloads by the re-sparsifying reduce-scatter of ``comm/exchange.py``: each chunk's owner takes the mean of the
members' decoded slices and sends everyone the sign code of that mean, so a worker sends 2(n-1)/n payloads
instead of the all-gather's n-1.

Error bound: per entry |x - x̂| = | |x| - m | <= max(m, absmax_block - m) <= absmax_block; per block x̂ is the
L2 projection of x onto its sign pattern, so ||x - x̂||² = ||x||² - c * m² <= (1 - 1/c) * ||x||² (a contraction,
which is what error feedback needs), up to the fp32 rounding of m (relative <= c * 2^-24). Inputs with
inf/NaN raise ``ValueError``; computation is in fp32 for every input dtype.
"""

from __future__ import annotations

import torch

from locoswarm.compression.base import (
    BlockwiseCodec,
    BufferSpec,
    Payload,
    blocks,
    check_block_size,
    flat_float,
    numel,
    require,
)


class SignCodec(BlockwiseCodec):
    name = "sign"

    def __init__(self, block_size: int = 64) -> None:
        self.block_size = check_block_size(block_size)

    def encode(self, tensor: torch.Tensor) -> Payload:
        x = flat_float(tensor)
        n = x.numel()
        b = blocks(x, self.block_size)  # (nb, B), zero-padded
        counts = self._counts(n, b.shape[0], x.device)
        # scale before summing: the mean of |x| never overflows, even near fp32's max
        scales = (b.abs() * counts.reciprocal()[:, None]).sum(dim=1)
        if not bool(torch.isfinite(scales).all()):
            raise ValueError("sign: cannot encode a tensor with inf or NaN entries")
        bits = (x >= 0).to(torch.uint8)
        pad = -n % 8
        if pad:
            bits = torch.cat([bits, bits.new_zeros(pad)])
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=x.device)
        packed = (bits.reshape(-1, 8) * weights).sum(dim=1).to(torch.uint8)
        return Payload({"bits": packed, "scales": scales}, tuple(tensor.shape), tensor.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        self.check_payload(payload)
        n = numel(payload.shape)
        scales, packed = payload.buffers["scales"], payload.buffers["bits"]
        require(torch.isfinite(scales).all(), self.name, "a scale is NaN or inf")
        require((scales >= 0).all(), self.name, "a scale is negative")
        shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
        bits = ((packed[:, None] >> shifts) & 1).reshape(-1)
        require((bits[n:] == 0).all(), self.name, "unused trailing bits must be 0")
        signs = bits[:n].to(torch.float32) * 2 - 1
        x = (blocks(signs, self.block_size) * scales[:, None]).reshape(-1)[:n]
        return x.reshape(payload.shape).to(payload.dtype)

    def layout(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[BufferSpec]:
        n = numel(shape)
        return [("bits", torch.uint8, -(-n // 8)), ("scales", torch.float32, -(-n // self.block_size))]

    @property
    def reducible(self) -> bool:
        return self.block_size % 8 == 0

    def slice_blocks(self, payload: Payload, lo: int, hi: int) -> Payload:
        if not self.reducible:
            raise ValueError(f"sign: block_size={self.block_size} splits bytes; chunks need a multiple of 8")
        start, stop = self.chunk_entries(payload, lo, hi)
        bits = payload.buffers["bits"][start // 8 : -(-stop // 8)]
        return Payload({"bits": bits, "scales": payload.buffers["scales"][lo:hi]}, (stop - start,), payload.dtype)

    def _counts(self, n: int, nb: int, device: torch.device) -> torch.Tensor:
        counts = torch.full((nb,), float(self.block_size), device=device)
        if nb:
            counts[-1] = n - (nb - 1) * self.block_size
        return counts
