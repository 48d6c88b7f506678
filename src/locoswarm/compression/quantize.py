"""Blockwise absmax quantisation: ``int8`` and ``int4``.

The flattened tensor is cut into blocks of ``block_size`` entries (the last one may be shorter). Each block
sends one fp32 scale s = absmax_block / L (L = 127 for int8, 7 for int4) and, per entry, the integer
q = round_half_even(x / s) in [-L, L]; x̂ = q * s. Scales are fp32, not fp16: pseudo-gradient blocks are often
smaller than fp16's normal range (absmax < 127 * 6e-5), where an fp16 scale would flush to zero.

Wire (n entries, B = block_size, nb = ceil(n / B)):
- int8: ``codes`` n x int8 (two's complement, -128 never used) + ``scales`` nb x fp32 -> 1 + 4/B bytes/entry.
- int4: ``codes`` ceil(n/2) x uint8, two 4-bit codes q + 8 in [1, 15] per byte, entry 2i in the low nibble,
  2i + 1 in the high nibble (a trailing pad nibble is 8) + ``scales`` nb x fp32 -> 0.5 + 4/B bytes/entry.

Error bound (fp32 arithmetic, q computed as x * fl(1/s)): |x - x̂| <= s/2 + 2^-22 * absmax_block, i.e. <= absmax_block / 254 (int8) or
absmax_block / 14 (int4) plus fp32 rounding, whenever s is a normal fp32 number (absmax_block >= L * 2^-126);
for blocks closer to zero than that, the block is sent as zeros (|x - x̂| = |x| <= absmax_block). A block of zeros decodes to zeros.
Inputs with inf/NaN cannot be scaled and raise ``ValueError``; computation is in fp32 for every input dtype.

Reducible (``Codec.reducible``): blocks are encoded independently, so the payload of a run of whole blocks is the
slice of the whole payload (scales [lo, hi), codes of their entries), and encoding a chunk gives exactly that
slice. For int4 the chunk's codes must start on a byte, so int4 is reducible only with an even block size.
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


class BlockQuantCodec(BlockwiseCodec):
    """Blockwise absmax integer quantisation with ``bits`` = 8 or 4."""

    def __init__(self, bits: int, block_size: int = 64) -> None:
        if bits not in (8, 4):
            raise ValueError(f"BlockQuantCodec: bits must be 8 or 4, got {bits!r}")
        self.bits = bits
        self.block_size = check_block_size(block_size)
        self.levels = 127 if bits == 8 else 7
        self.name = f"int{bits}"

    def scales_and_codes(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales (nb,) fp32, q (n,) fp32 integers in [-L, L]) for a tensor."""
        x = flat_float(tensor)
        n = x.numel()
        b = blocks(x, self.block_size)  # (nb, B)
        absmax = b.abs().amax(dim=1) if b.numel() else b.new_zeros(b.shape[0])
        if not bool(torch.isfinite(absmax).all()):
            raise ValueError(f"{self.name}: cannot encode a tensor with inf or NaN entries")
        scales = absmax / self.levels
        # multiply by 1/s (a broadcast multiply is several times faster than a divide on CPU); a block whose
        # scale is subnormal (absmax < L * 2^-126, where 1/s could overflow) quantises to zeros
        inv = torch.where(scales >= torch.finfo(torch.float32).tiny, scales.reciprocal(), 0.0)
        q = (b * inv[:, None]).round_().clamp_(-self.levels, self.levels)
        return scales, q.reshape(-1)[:n]

    @property
    def reducible(self) -> bool:
        return self.bits == 8 or self.block_size % 2 == 0

    def slice_blocks(self, payload: Payload, lo: int, hi: int) -> Payload:
        if not self.reducible:
            raise ValueError(f"{self.name}: block_size={self.block_size} splits bytes; chunks need an even block size")
        start, stop = self.chunk_entries(payload, lo, hi)
        codes = payload.buffers["codes"]
        if self.bits == 4:  # whole bytes: start is even (an even block size); the last chunk keeps the pad nibble
            codes = codes[start // 2 : -(-stop // 2)]
        else:
            codes = codes[start:stop]
        return Payload({"codes": codes, "scales": payload.buffers["scales"][lo:hi]}, (stop - start,), payload.dtype)

    def encode(self, tensor: torch.Tensor) -> Payload:
        scales, q = self.scales_and_codes(tensor)
        if self.bits == 8:
            codes = q.to(torch.int8)
        else:
            nibbles = (q + 8).to(torch.uint8)
            if nibbles.numel() % 2:
                nibbles = torch.cat([nibbles, nibbles.new_full((1,), 8)])
            pairs = nibbles.reshape(-1, 2)
            codes = pairs[:, 0] | (pairs[:, 1] << 4)
        return Payload({"codes": codes, "scales": scales}, tuple(tensor.shape), tensor.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        self.check_payload(payload)
        n = numel(payload.shape)
        scales, codes = payload.buffers["scales"], payload.buffers["codes"]
        require(torch.isfinite(scales).all(), self.name, "a scale is NaN or inf")
        require((scales >= 0).all(), self.name, "a scale is negative")
        if self.bits == 8:
            require((codes != -128).all(), self.name, "code -128 is outside [-127, 127]")
            q = codes.to(torch.float32)
        else:
            nibbles = torch.stack([codes & 15, codes >> 4], dim=1).reshape(-1)
            require((nibbles[:n] != 0).all(), self.name, "4-bit code 0 is outside [1, 15] (q = -8)")
            require((nibbles[n:] == 8).all(), self.name, "the pad nibble must be 8 (q = 0)")
            q = nibbles[:n].to(torch.float32) - 8
        x = (blocks(q, self.block_size) * scales[:, None]).reshape(-1)[:n]
        return x.reshape(payload.shape).to(payload.dtype)

    def layout(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[BufferSpec]:
        n = numel(shape)
        nb = -(-n // self.block_size)
        if self.bits == 8:
            return [("codes", torch.int8, n), ("scales", torch.float32, nb)]
        return [("codes", torch.uint8, -(-n // 2)), ("scales", torch.float32, nb)]
