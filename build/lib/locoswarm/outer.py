"""The outer optimiser: a plain torch optimiser over the anchor (global) parameters.

It is fed the averaged pseudo-gradient (anchor − local params) as the anchor's gradient. With ``sgd`` at
lr 1 and no momentum the anchor becomes the average of the workers' params (FedAvg / Local SGD); ``nesterov``
is DiLoCo's choice; ``adam`` is FedOpt's adaptive server optimiser.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from locoswarm.config import OuterOptimizerConfig, OuterOptimizerName


class OuterOptimizer:
    def __init__(self, anchor: Sequence[torch.Tensor], cfg: OuterOptimizerConfig):
        self.anchor = list(anchor)
        self.update_sq = 0.0  # squared norms of the last step (``norms``)
        self.momentum_sq: float | None = None
        name = OuterOptimizerName(cfg.name)
        if name == OuterOptimizerName.adam:
            self.opt: torch.optim.Optimizer = torch.optim.Adam(
                self.anchor, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
            )
        else:
            nesterov = name == OuterOptimizerName.nesterov
            if nesterov and cfg.momentum <= 0:
                raise ValueError("outer_optimizer=nesterov needs outer_optimizer.momentum > 0")
            self.opt = torch.optim.SGD(self.anchor, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov)

    @torch.no_grad()
    def step(self, pseudo_gradient: Sequence[torch.Tensor]) -> None:
        """Apply one outer step. ``pseudo_gradient[i]`` has the shape of ``anchor[i]``. Afterwards
        ``update_sq`` and ``momentum_sq`` hold this step's squared norms (see ``norms``)."""
        if len(pseudo_gradient) != len(self.anchor):
            raise ValueError(f"got {len(pseudo_gradient)} pseudo-gradients for {len(self.anchor)} anchor tensors")
        before = [p.detach().clone() for p in self.anchor]  # one copy per outer step: the step it took, measured
        for p, g in zip(self.anchor, pseudo_gradient, strict=True):
            p.grad = g.to(p.dtype)
        self.opt.step()
        for p in self.anchor:
            p.grad = None
        self.update_sq = sum(float((p - b).double().pow(2).sum()) for p, b in zip(self.anchor, before, strict=True))
        # SGD's momentum buffer, Adam's first moment; plain SGD has none
        buffers = [self.opt.state[p].get("momentum_buffer", self.opt.state[p].get("exp_avg")) for p in self.anchor]
        self.momentum_sq = sum(float(m.double().pow(2).sum()) for m in buffers if m is not None) if any(
            m is not None for m in buffers) else None  # fmt: skip

    @staticmethod
    def norms(steps: Sequence[OuterOptimizer]) -> dict[str, float]:
        """The sync row's ``outer_update_norm`` (how far the anchor moved) and ``outer_momentum_norm`` over the outer
        optimisers that just stepped (streaming: one per fragment merged; their squares add up)."""
        if not steps:
            return {}
        out = {"outer_update_norm": sum(o.update_sq for o in steps) ** 0.5}
        momentum = [o.momentum_sq for o in steps if o.momentum_sq is not None]
        if momentum:
            out["outer_momentum_norm"] = sum(momentum) ** 0.5
        return out

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)
