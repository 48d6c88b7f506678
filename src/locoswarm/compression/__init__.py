"""Pseudo-gradient codecs. ``make_codec(cfg, seed)`` builds one codec instance (they may be stateful).

| name | wire per fp32 entry (B = block_size) | error |
| --- | --- | --- |
| none | 4 bytes | lossless |
| fp16 / bf16 | 2 bytes | relative 2^-11 / 2^-8 |
| int8 / int4 | 1 / 0.5 byte + 4/B (fp32 scale per block) | absmax_block / 254 / 14 |
| sign | 1/8 byte + 4/B (fp32 mean-abs scale per block) | <= absmax_block; block L2 contraction |
| topk | 8 bytes per kept entry (value + int32 index) | kept exact, smallest dropped |
| blocktopk | 6 bytes per kept entry (value + int16 offset in its block of B) | per block: kept exact, smallest dropped |
| randomk | 4 bytes per kept entry (indices from the shared seed) | kept exact |
| powersgd | 4 r (n + m) / (n m) bytes | ||x - x̂|| <= ||x||; exact for rank <= r |

Each codec file's docstring states its exact wire format and error bound.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from locoswarm.compression.base import BufferSpec, Codec, NoCompression, Payload, compression_ratio
from locoswarm.compression.cast import CastCodec
from locoswarm.compression.error_feedback import ErrorFeedback
from locoswarm.compression.powersgd import PowerSGDCodec
from locoswarm.compression.quantize import BlockQuantCodec
from locoswarm.compression.sign import SignCodec
from locoswarm.compression.sparse import BlockTopKCodec, RandomKCodec, TopKCodec, keep_count

__all__ = [
    "BlockQuantCodec",
    "BlockTopKCodec",
    "BufferSpec",
    "CastCodec",
    "Codec",
    "ErrorFeedback",
    "NoCompression",
    "Payload",
    "PowerSGDCodec",
    "RandomKCodec",
    "SignCodec",
    "TopKCodec",
    "compression_ratio",
    "keep_count",
    "codec_factory",
    "make_codec",
]

NAMES = ("none", "fp16", "bf16", "int8", "int4", "topk", "blocktopk", "randomk", "powersgd", "sign")


def make_codec(cfg, seed: int = 0) -> Codec:
    """Build one codec from a ``CompressionConfig``.

    ``seed`` must be the same on every worker for the same tensor (e.g. a hash of the run seed and the tensor's
    index): random-k draws its shared indices from it and PowerSGD its first Q. With ``cfg.error_feedback``,
    lossy codecs are wrapped in ``ErrorFeedback`` (``none`` is returned as is).
    """
    name = getattr(cfg.name, "value", cfg.name)
    if name == "none":
        codec: Codec = NoCompression()
    elif name == "fp16":
        codec = CastCodec(torch.float16)
    elif name == "bf16":
        codec = CastCodec(torch.bfloat16)
    elif name in ("int8", "int4"):
        codec = BlockQuantCodec(8 if name == "int8" else 4, cfg.block_size)
    elif name == "sign":
        codec = SignCodec(cfg.block_size)
    elif name == "topk":
        codec = TopKCodec(cfg.ratio)
    elif name == "blocktopk":
        codec = BlockTopKCodec(cfg.ratio, cfg.block_size)
    elif name == "randomk":
        codec = RandomKCodec(cfg.ratio, seed)
    elif name == "powersgd":
        codec = PowerSGDCodec(cfg.rank, cfg.ratio, seed)
    else:
        raise ValueError(f"compression.name={name!r} is invalid: allowed: {', '.join(NAMES)}")
    if cfg.error_feedback and not codec.lossless:
        codec = ErrorFeedback(codec)
    return codec


def codec_factory(cfg, run_seed: int) -> Callable[[str, int], Codec]:
    """``factory(key, tensor_index)`` builds one codec for that tensor of that stream of rounds (``key``: a
    streaming fragment, a pipeline stage), seeded alike on every worker and backend (so random-k's indices and
    PowerSGD's first Q agree between the sim backend and real peers, and differ between streams)."""
    from locoswarm.seeding import derive_seed

    def factory(key: str, index: int) -> Codec:
        return make_codec(cfg, seed=derive_seed(run_seed, "codec", key, index))

    return factory
