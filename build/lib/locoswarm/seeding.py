"""Every seed in a run comes from the one ``seed`` in the config."""

from __future__ import annotations

import hashlib
from typing import Any


def derive_seed(seed: int, *parts: Any) -> int:
    """A stable, independent stream per purpose and worker, e.g. ``derive_seed(cfg.seed, "data", rank)``."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
