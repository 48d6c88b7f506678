"""Half-precision casts: ``fp16`` and ``bf16``.

Wire: ``values``, the n entries rounded (round-to-nearest-even) to fp16 / bf16: 2 bytes per entry, ratio 0.5
against fp32. Nothing else is sent.

Error bound, for fp32 inputs:
- fp16: |x - x̂| <= 2^-11 * |x| + 2^-25 (relative half-ulp for normals, absolute half-ulp of fp16's subnormal
  spacing 2^-24 below 2^-14). Entries beyond fp16's range saturate to ±65504 instead of becoming inf, so the
  bound holds for |x| <= 65504; NaN stays NaN.
- bf16: |x - x̂| <= 2^-8 * |x| + 2^-134 (bf16 keeps fp32's exponent range; values beyond the largest bf16
  saturate to ±3.3895e38 instead of becoming inf).
An input that already has the wire dtype is sent unchanged (lossless; the buffer may alias the input).
"""

from __future__ import annotations

import torch

from locoswarm.compression.base import BufferSpec, Codec, Payload, numel


class CastCodec(Codec):
    """Send every entry in a 2-byte float format."""

    summable = True

    def __init__(self, wire_dtype: torch.dtype) -> None:
        if wire_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"CastCodec: wire dtype must be float16 or bfloat16, got {wire_dtype}")
        self.wire_dtype = wire_dtype
        self.name = "fp16" if wire_dtype == torch.float16 else "bf16"
        self._max = torch.finfo(wire_dtype).max

    def encode(self, tensor: torch.Tensor) -> Payload:
        x = tensor.detach().reshape(-1)
        if x.dtype != self.wire_dtype:
            if x.dtype not in (torch.float32, torch.float64):
                x = x.to(torch.float32)  # exact for fp16/bf16 inputs; clamp needs a type that holds the limit
            x = x.clamp(-self._max, self._max).to(self.wire_dtype)
        return Payload({"values": x}, tuple(tensor.shape), tensor.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        self.check_payload(payload)
        return payload.buffers["values"].reshape(payload.shape).to(payload.dtype)

    def layout(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[BufferSpec]:
        return [("values", self.wire_dtype, numel(shape))]
