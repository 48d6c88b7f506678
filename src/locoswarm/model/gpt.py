"""A small GPT (decoder-only transformer) in the nanoGPT mould.

einops does the head reshapes, attention is torch's SDPA (flash / memory-efficient kernels where
available), and the token embedding is tied to the output head. Shapes are commented as
B = batch, T = time, C = channels, H = heads, D = head dim, V = vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass(frozen=True)
class GPTShape:
    """Architecture of one GPT; presets live in ``locoswarm.model.PRESETS``."""

    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    vocab_size: int = 256
    dropout: float = 0.0
    tie_embeddings: bool = True  # one (V, C) matrix for the token embedding and the head


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        if shape.d_model % shape.n_head != 0:
            raise ValueError(f"model.d_model={shape.d_model} must be divisible by model.n_head={shape.n_head}")
        self.n_head = shape.n_head
        self.dropout = shape.dropout
        self.qkv = nn.Linear(shape.d_model, 3 * shape.d_model, bias=False)
        self.proj = nn.Linear(shape.d_model, shape.d_model, bias=False)
        self.resid_drop = nn.Dropout(shape.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, C)
        qkv = self.qkv(x)  # (B, T, 3C)
        q, k, v = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=self.n_head)  # (B, H, T, D) each
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, D)
        y = rearrange(y, "b h t d -> b t (h d)")  # (B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.fc = nn.Linear(shape.d_model, 4 * shape.d_model, bias=False)
        self.proj = nn.Linear(4 * shape.d_model, shape.d_model, bias=False)
        self.drop = nn.Dropout(shape.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.ln1 = nn.LayerNorm(shape.d_model)
        self.attn = CausalSelfAttention(shape)
        self.ln2 = nn.LayerNorm(shape.d_model)
        self.mlp = MLP(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.shape = shape
        self.tok_emb = nn.Embedding(shape.vocab_size, shape.d_model)
        self.pos_emb = nn.Embedding(shape.seq_len, shape.d_model)
        self.drop = nn.Dropout(shape.dropout)
        self.blocks = nn.ModuleList([Block(shape) for _ in range(shape.n_layer)])
        self.ln_f = nn.LayerNorm(shape.d_model)
        self.head = nn.Linear(shape.d_model, shape.vocab_size, bias=False)
        if shape.tie_embeddings:
            self.head.weight = self.tok_emb.weight  # weight tying: one (V, C) matrix for input and output
        self.apply(self._init_weights)
        if not shape.tie_embeddings:  # untied (a pipeline's first and last stage): both start from one matrix
            with torch.no_grad():
                self.head.weight.copy_(self.tok_emb.weight)
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance flat in depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * shape.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Parameters counted once (the tied embedding is not counted twice)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx, targets: (B, T) int64. Returns (logits (B, T, V), mean cross-entropy or None)."""
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.output(x, targets)

    # The pieces a pipeline stage runs (pipeline/stages.py): embed, then blocks, then output.
    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) int64 -> the residual stream (B, T, C)."""
        _, t = idx.shape
        if t > self.shape.seq_len:
            raise ValueError(f"sequence of length {t} exceeds model.seq_len={self.shape.seq_len}")
        pos = torch.arange(t, device=idx.device)  # (T,)
        return self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)

    def output(self, x: torch.Tensor, targets: torch.Tensor | None = None):
        """The residual stream (B, T, C) -> (logits (B, T, V), mean cross-entropy or None)."""
        logits = self.head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(rearrange(logits, "b t v -> (b t) v").float(), rearrange(targets, "b t -> (b t)"))
        return logits, loss
