"""The validation loss: fixed, evenly spaced windows of the validation split (deterministic: no sampling), so every
run, backend and peer evaluates the same tokens."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from locoswarm.model import GPT


def val_windows(val: np.ndarray, seq_len: int, batch_size: int, batches: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """``batches`` batches of ``batch_size`` (inputs, targets) windows, evenly spaced over ``val``."""
    starts = np.linspace(0, len(val) - seq_len - 1, num=batch_size * batches).astype(np.int64)
    for b in range(batches):
        idx = starts[b * batch_size : (b + 1) * batch_size]
        x = torch.from_numpy(np.stack([val[s : s + seq_len] for s in idx]).astype(np.int64))
        y = torch.from_numpy(np.stack([val[s + 1 : s + 1 + seq_len] for s in idx]).astype(np.int64))
        yield x, y


@torch.no_grad()
def evaluate(model: GPT, params: Sequence[torch.Tensor], val: np.ndarray, batch_size: int, batches: int) -> float:
    """Mean loss of ``model`` with ``params`` over the validation windows."""
    for p, src in zip(model.parameters(), params, strict=True):
        p.copy_(src)
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for x, y in val_windows(val, model.shape.seq_len, batch_size, batches):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            _, loss = model(x.to(device), y.to(device))
        total += loss.item()
    return total / batches
