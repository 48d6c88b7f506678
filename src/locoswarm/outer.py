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


class DelayedNesterov:
    """Delayed Nesterov (Liu et al. 2024, "Asynchronous Local-SGD Training for Language Modeling"), for updates
    that arrive one worker at a time. Every update g is applied at once without momentum (anchor -= lr·g); the
    momentum takes the last ``delay`` updates together, once per ``delay`` updates:

        m <- β·m + sum(g over the last N updates);  anchor -= lr·β·m

    so stale single-worker updates do not each get the momentum's acceleration. The updates are already weighted
    by their share of a round (async_diloco: 1/K each at equal speeds), so with N = K the momentum sees one
    round's average, as DiLoCo's does (Liu et al. write it with unweighted updates: their mean over N). With N = 1
    the two steps are anchor -= lr·(g + β·m) with m = β·m + g: torch's Nesterov SGD (tests/test_async_diloco.py
    pins it). Same interface as ``OuterOptimizer`` (step, norms, state)."""

    def __init__(self, anchor: Sequence[torch.Tensor], cfg: OuterOptimizerConfig, delay: int):
        if delay < 1:
            raise ValueError(f"algorithm.momentum_delay={delay} is invalid: must be >= 1")
        self.anchor = list(anchor)
        self.lr, self.beta, self.delay = cfg.lr, cfg.momentum, delay
        self.momentum = [torch.zeros_like(a) for a in self.anchor]
        self.pending = [torch.zeros_like(a) for a in self.anchor]  # the sum of the updates since the momentum's last
        self.count = 0
        self.update_sq = 0.0
        self.momentum_sq: float | None = None

    @torch.no_grad()
    def step(self, pseudo_gradient: Sequence[torch.Tensor]) -> None:
        if len(pseudo_gradient) != len(self.anchor):
            raise ValueError(f"got {len(pseudo_gradient)} pseudo-gradients for {len(self.anchor)} anchor tensors")
        before = [p.detach().clone() for p in self.anchor]
        for p, g, acc in zip(self.anchor, pseudo_gradient, self.pending, strict=True):
            p.add_(g.to(p.dtype), alpha=-self.lr)
            acc.add_(g.to(acc.dtype))
        self.count += 1
        if self.count == self.delay:
            for p, m, acc in zip(self.anchor, self.momentum, self.pending, strict=True):
                m.mul_(self.beta).add_(acc)
                p.add_(m, alpha=-self.lr * self.beta)
                acc.zero_()
            self.count = 0
        self.update_sq = sum(float((p - b).double().pow(2).sum()) for p, b in zip(self.anchor, before, strict=True))
        self.momentum_sq = sum(float(m.double().pow(2).sum()) for m in self.momentum)

    def state_dict(self) -> dict:
        return {"momentum": [m.clone() for m in self.momentum], "pending": [a.clone() for a in self.pending],
                "count": self.count}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        for m, s in zip(self.momentum, state["momentum"], strict=True):
            m.copy_(s)
        for a, s in zip(self.pending, state["pending"], strict=True):
            a.copy_(s)
        self.count = int(state["count"])
