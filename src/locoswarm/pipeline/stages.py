"""Cutting a GPT into pipeline stages, and running one stage.

A stage is a contiguous run of transformer blocks; the first stage also holds the embeddings, the last the final
norm and the (untied) head. The cut balances parameter counts (the best contiguous split, by a small dynamic
programme), so a stage's share of the model is also its share of the pseudo-gradient bytes and, as a proxy, of
the compute. A stage peer owns exactly its stage's parameters of its replica; ``StageSpec.params`` are their
indices in ``model.parameters()`` order, which is how every stacked tensor a strategy sees is laid out.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from locoswarm.model import GPT


@dataclass(frozen=True)
class StageSpec:
    index: int
    blocks: tuple[int, int]  # [first, last) transformer blocks
    params: tuple[int, ...]  # indices into model.parameters()
    numel: int

    def is_first(self) -> bool:
        return self.index == 0


def _owner(name: str, n_layer: int) -> tuple[str, int]:
    """Which part of the model a parameter belongs to: ("embed", -1), ("block", b) or ("output", n_layer)."""
    if name.startswith("blocks."):
        return "block", int(name.split(".")[1])
    if name.startswith(("tok_emb.", "pos_emb.")):
        return "embed", -1
    return "output", n_layer  # ln_f, head


def split_stages(model: GPT, stages: int) -> list[StageSpec]:
    """The balanced contiguous cut of ``model`` into ``stages`` stages of at least one block each."""
    n = model.shape.n_layer
    if not 1 <= stages <= n:
        raise ValueError(f"pipeline.stages={stages} is invalid: need 1 <= stages <= model.n_layer={n}")
    if model.shape.tie_embeddings and stages > 1:
        raise ValueError("a pipeline needs an untied head (model.tie_embeddings=false): its first and last stage "
                         "are different peers")  # fmt: skip
    named = list(model.named_parameters())
    owners = [_owner(name, n) for name, _ in named]
    size = [0] * n
    embed = output = 0
    for (kind, b), (_, p) in zip(owners, named, strict=True):
        if kind == "block":
            size[b] += p.numel()
        elif kind == "embed":
            embed += p.numel()
        else:
            output += p.numel()
    prefix = [0]
    for s in size:
        prefix.append(prefix[-1] + s)

    def span(a: int, b: int, first: bool, last: bool) -> int:
        return prefix[b] - prefix[a] + (embed if first else 0) + (output if last else 0)

    @functools.cache
    def best(a: int, k: int) -> tuple[int, tuple[int, ...]]:
        """Blocks [a, n) in k stages: (largest stage, cut points)."""
        if k == 1:
            return span(a, n, a == 0, True), ()
        options = []
        for b in range(a + 1, n - k + 2):
            rest, cuts = best(b, k - 1)
            options.append((max(span(a, b, a == 0, False), rest), (b, *cuts)))
        return min(options)

    cuts = (0, *best(0, stages)[1], n)
    specs = []
    for s in range(stages):
        lo, hi = cuts[s], cuts[s + 1]
        idx = tuple(
            i
            for i, (kind, b) in enumerate(owners)
            if (kind == "block" and lo <= b < hi)
            or (kind == "embed" and s == 0)
            or (kind == "output" and s == stages - 1)
        )
        specs.append(StageSpec(s, (lo, hi), idx, span(lo, hi, s == 0, s == stages - 1)))
    return specs


def stage_forward(model: GPT, spec: StageSpec, last: bool, x: torch.Tensor, targets: torch.Tensor | None = None):
    """Run stage ``spec`` of ``model``: token ids (B, T) in the first stage, else the residual stream (B, T, C).
    Returns the residual stream for the next stage, or the loss in the last."""
    if spec.is_first():
        x = model.embed(x)
    for b in range(*spec.blocks):
        x = model.blocks[b](x)
    if last:
        return model.output(x, targets)[1]
    return x
