"""Random contiguous training windows from one token array, with a resumable private random stream."""

from __future__ import annotations

import numpy as np
import torch


class BatchSampler:
    """Draws ``batch_size`` random windows of ``seq_len + 1`` tokens: x is the first ``seq_len``, y the last.

    Uses its own ``torch.Generator`` (never the global RNG), so the stream depends only on ``seed`` and how many
    batches were drawn; ``state_dict``/``load_state_dict`` resume it exactly.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int) -> None:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        if batch_size < 1:
            raise ValueError(f"train.batch_size={batch_size} must be >= 1")
        if seq_len < 1:
            raise ValueError(f"model.seq_len={seq_len} must be >= 1")
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"model.seq_len={seq_len}: needs at least seq_len+1={seq_len + 1} tokens, this array has {len(tokens)}"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.batches_drawn = 0
        self._window = np.arange(seq_len + 1)
        self._gen = torch.Generator(device="cpu")
        self._gen.manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 (B, T), with y[:, t] == x[:, t + 1] inside the window (next-token targets)."""
        starts = torch.randint(0, len(self.tokens) - self.seq_len, (self.batch_size,), generator=self._gen)
        windows = self.tokens[starts.numpy()[:, None] + self._window]  # (B, T + 1)
        w = torch.from_numpy(windows.astype(np.int64))
        self.batches_drawn += 1
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def __iter__(self):
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        return {
            "generator": self._gen.get_state().clone(),
            "batches_drawn": self.batches_drawn,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "num_tokens": len(self.tokens),
        }

    def load_state_dict(self, d: dict) -> None:
        # Resuming over a different shard or shape would silently produce a different stream: refuse it.
        for key, mine in (("batch_size", self.batch_size), ("seq_len", self.seq_len), ("num_tokens", len(self.tokens))):
            if d[key] != mine:
                raise ValueError(f"BatchSampler state was saved with {key}={d[key]}, this sampler has {key}={mine}")
        self._gen.set_state(d["generator"].clone())
        self.batches_drawn = int(d["batches_drawn"])
        self.seed = int(d["seed"])
