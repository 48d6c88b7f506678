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
        """Apply one outer step. ``pseudo_gradient[i]`` has the shape of ``anchor[i]``."""
        if len(pseudo_gradient) != len(self.anchor):
            raise ValueError(f"got {len(pseudo_gradient)} pseudo-gradients for {len(self.anchor)} anchor tensors")
        for p, g in zip(self.anchor, pseudo_gradient, strict=True):
            p.grad = g.to(p.dtype)
        self.opt.step()
        for p in self.anchor:
            p.grad = None

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)
