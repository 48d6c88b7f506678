"""Pseudo-gradient codecs. ``make_codec(cfg)`` builds one codec instance (they may be stateful)."""

from __future__ import annotations

from locoswarm.compression.base import Codec, NoCompression, Payload

__all__ = ["Codec", "NoCompression", "Payload", "make_codec"]


def make_codec(cfg, seed: int = 0) -> Codec:
    """Build a codec from a ``CompressionConfig``."""
    name = getattr(cfg.name, "value", cfg.name)
    if name == "none":
        return NoCompression()
    raise ValueError(f"compression={name} is not yet available (issue: pseudo-gradient compression)")
