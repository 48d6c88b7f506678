"""Atomic checkpoints: written to a temporary file, fsynced, then renamed over the old one.

A crash mid-write leaves the previous checkpoint intact; ``resume=true`` continues from it to exactly the
numbers an uninterrupted run produces (every RNG, sampler position and optimiser state is in it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    path = Path(run_dir) / CHECKPOINT_NAME
    tmp = path.with_name(f".{CHECKPOINT_NAME}.tmp{os.getpid()}")
    for stale in path.parent.glob(f".{CHECKPOINT_NAME}.tmp*"):  # left by a process killed mid-write
        if stale != tmp:
            stale.unlink(missing_ok=True)
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.exists():
        return None
    # Our own file: it holds codec objects and RNG states, so it is not a weights-only load.
    return torch.load(path, map_location="cpu", weights_only=False)
