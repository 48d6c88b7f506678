"""The codec contract: what a pseudo-gradient looks like on the wire.

A ``Codec`` turns one tensor into a ``Payload`` (``encode``) and back (``decode``). ``payload.nbytes`` is
exactly the number of bytes that would cross the network: ``len(payload.to_bytes())``. Shape and dtype are
agreed by both ends from the parameter they belong to, so they are not part of the wire format.

Codecs may keep state between rounds (error feedback residuals, PowerSGD's warm-started factor), so an
averager holds one codec instance per (local worker, tensor); build them with ``make_codec``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass
class Payload:
    """An encoded tensor: named raw buffers plus the (shape, dtype) of the tensor it decodes to."""

    buffers: dict[str, torch.Tensor]
    shape: tuple[int, ...]
    dtype: torch.dtype
    meta: dict = field(default_factory=dict)  # small, agreed-by-both-ends facts (e.g. a shared seed); not sent

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def to_bytes(self) -> bytes:
        """The wire format: the buffers' raw bytes, concatenated in key order."""
        return b"".join(
            self.buffers[k].detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
            for k in sorted(self.buffers)
        )


class Codec(ABC):
    """Encode/decode one tensor. ``lossless`` codecs promise decode(encode(t)) == t exactly."""

    name: str = "codec"
    lossless: bool = False

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> Payload: ...

    @abstractmethod
    def decode(self, payload: Payload) -> torch.Tensor: ...


class NoCompression(Codec):
    """fp32 (or the tensor's own dtype) as is: the baseline every compression ratio is measured against."""

    name = "none"
    lossless = True

    def encode(self, tensor: torch.Tensor) -> Payload:
        return Payload({"values": tensor.detach().reshape(-1)}, tuple(tensor.shape), tensor.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        values = payload.buffers["values"]
        if values.numel() != _numel(payload.shape):
            raise ValueError(
                f"payload has {values.numel()} values, expected {_numel(payload.shape)} for {payload.shape}"
            )
        return values.reshape(payload.shape).to(payload.dtype)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
