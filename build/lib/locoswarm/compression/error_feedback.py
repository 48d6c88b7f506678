"""Error feedback (Seide et al., 2014; Karimireddy et al., 2019): a wrapper that remembers what its codec lost.

Each round the wrapper encodes v = x + e (e: the previous residual, zero at first) and keeps
e' = v - decode(encode(v)) for the next round. Summed over rounds, sum(inputs) - sum(decoded) = e (the current
residual), so whatever the codec drops is sent later instead of lost. For a codec that contracts,
||v - decode(encode(v))|| <= q ||v|| with q < 1 (topk: q² = 1 - k/n; sign: q² = 1 - 1/B; int8/int4: q = sqrt(B)/254,
sqrt(B)/14), the residual stays bounded, ||e|| <= q / (1 - q) * max ||x||, so the mean error over R rounds is
O(1/R).

Wire: exactly the wrapped codec's payload (nothing extra). The residual is held in fp32 (fp64 for fp64
tensors) on the tensor's device; it changes only in ``encode``, never in ``decode``.
"""

from __future__ import annotations

import torch

from locoswarm.compression.base import BufferSpec, Codec, Payload


class ErrorFeedback(Codec):
    lossless = False

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.name = codec.name
        self.residual: torch.Tensor | None = None

    def encode(self, tensor: torch.Tensor) -> Payload:
        x = tensor.detach()
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        v = x.to(work)
        if self.residual is not None:
            if self.residual.shape != x.shape:
                raise ValueError(
                    f"error feedback: residual has shape {tuple(self.residual.shape)}, got {tuple(x.shape)}; "
                    "use one codec per tensor"
                )
            v = v + self.residual.to(x.device)
        # the codec sees the tensor's own dtype (its wire layout depends on it); that rounding is fed back too,
        # and so is what a half-precision tensor cannot hold (saturated, not inf)
        if x.dtype in (torch.float16, torch.bfloat16):
            limit = torch.finfo(x.dtype).max
            payload = self.codec.encode(v.clamp(-limit, limit).to(x.dtype))
        else:
            payload = self.codec.encode(v.to(x.dtype))
        self.residual = v - self.codec.decode(payload).to(work)
        return payload

    def decode(self, payload: Payload) -> torch.Tensor:
        return self.codec.decode(payload)

    @property
    def summable(self) -> bool:  # the residual is local: the wire is the wrapped codec's
        return self.codec.summable

    @property
    def reducible(self) -> bool:
        return self.codec.reducible

    def block_count(self, shape: tuple[int, ...]) -> int:
        return self.codec.block_count(shape)

    def block_entries(self, shape: tuple[int, ...], lo: int, hi: int) -> tuple[int, int]:
        return self.codec.block_entries(shape, lo, hi)

    def slice_blocks(self, payload: Payload, lo: int, hi: int) -> Payload:
        return self.codec.slice_blocks(payload, lo, hi)

    def requantizer(self) -> Codec:
        # the owner's re-encode of the group mean has no residual to feed back: only each peer's own encode does
        return self.codec.requantizer()

    def align_round(self, round_: int) -> None:
        self.codec.align_round(round_)

    def layout(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[BufferSpec]:
        return self.codec.layout(shape, dtype)

    def wire_meta(self) -> dict:
        return self.codec.wire_meta()
