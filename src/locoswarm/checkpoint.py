"""Atomic checkpoints: written to a temporary file, fsynced, then renamed over the old one.

A crash mid-write leaves the previous checkpoint intact; ``resume=true`` continues from it to exactly the
numbers an uninterrupted run produces (every RNG, sampler position and optimiser state is in it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


@contextlib.contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """Hold a Ctrl+C (SIGINT) that arrives inside the block until the block is done, then deliver it. A
    KeyboardInterrupt raised inside torch.save leaves its zip writer half-written, whose cleanup then raises a
    RuntimeError ("unexpected pos") in its place: the run would end in a traceback instead of a clean interrupt
    (CI saw it). Only the main thread receives signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, Any]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            if callable(previous):
                previous(*caught[0])
            elif previous != signal.SIG_IGN:
                raise KeyboardInterrupt


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    path = Path(run_dir) / CHECKPOINT_NAME
    tmp = path.with_name(f".{CHECKPOINT_NAME}.tmp{os.getpid()}")
    for stale in path.parent.glob(f".{CHECKPOINT_NAME}.tmp*"):  # left by a process killed mid-write
        if stale != tmp:
            stale.unlink(missing_ok=True)
    with ctrl_c_deferred():  # a Ctrl+C lands after the new checkpoint is in place
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
