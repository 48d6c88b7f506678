"""Worker: one model replica, its inner optimiser and schedule, and its data shard.

``WorkerGroup`` is what a strategy talks to: the workers hosted by this process (all K in the ``sim``
backend, one on a real network). Everything crosses the group boundary as stacked tensors with a leading
worker dimension (L, *param_shape), so a batched (vmapped) group can replace the sequential one without the
strategies, codecs or averagers noticing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from locoswarm.config import InnerOptimizerConfig, InnerOptimizerName, Schedule, TrainConfig
from locoswarm.data import BatchSampler
from locoswarm.model import GPT


def lr_lambda(train: TrainConfig):
    """Linear warm-up to the peak, then cosine down to min_lr_ratio (or constant) over train.max_steps."""

    def f(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if Schedule(train.schedule) == Schedule.constant:
            return 1.0
        span = max(1, train.max_steps - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / span)
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def get_device_rng(device: torch.device) -> torch.Tensor:
    """The global RNG state that dropout on ``device`` draws from."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_device_rng(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def build_inner_optimizer(model: torch.nn.Module, cfg: InnerOptimizerConfig) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (1-D tensors), as in GPT-2/nanoGPT.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if InnerOptimizerName(cfg.name) == InnerOptimizerName.adamw:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=True)


class Worker:
    def __init__(
        self,
        rank: int,
        model: GPT,
        sampler: BatchSampler,
        inner: InnerOptimizerConfig,
        train: TrainConfig,
        device: torch.device,
        seed: int,
    ):
        self.rank = rank
        self.model = model.to(device)
        self.sampler = sampler
        self.train_cfg = train
        self.device = device
        self.optimizer = build_inner_optimizer(self.model, inner)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(train))
        self.params = list(self.model.parameters())
        # Gradients are clipped per group: the whole model, or each pipeline stage on its own (its peer sees
        # only its stage's gradient).
        self.clip_groups: list[list[torch.nn.Parameter]] = [self.params]
        self.step = 0
        self.tokens = 0
        # Dropout draws from the global RNG of the model's device; each worker keeps its own stream so workers
        # differ but replay exactly. Without dropout there is nothing to draw, and no RNG juggling per step.
        self._uses_rng = model.shape.dropout > 0
        self._rng_state = self._seeded_rng_state(seed) if self._uses_rng else None
        self._autocast = device.type == "cuda"

    def _seeded_rng_state(self, seed: int) -> torch.Tensor:
        outer = self._get_rng()
        (torch.cuda.manual_seed if self.device.type == "cuda" else torch.manual_seed)(seed)
        state = self._get_rng()
        self._set_rng(outer)
        return state

    def _get_rng(self) -> torch.Tensor:
        return get_device_rng(self.device)

    def _set_rng(self, state: torch.Tensor) -> None:
        set_device_rng(self.device, state)

    @property
    def tokens_per_step(self) -> int:
        return self.train_cfg.batch_size * self.model.shape.seq_len

    def compute_grads(self) -> float:
        """Forward/backward on this worker's next batch; leaves gradients in ``.grad``. Returns the loss."""
        return self._forward_backward().item()

    def _forward_backward(self) -> torch.Tensor:
        """The loss as a device tensor: reading it (a GPU sync) is left to the caller, once per phase."""
        x, y = self.sampler.next()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self._uses_rng:
            outer_rng = self._get_rng()
            self._set_rng(self._rng_state)
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._autocast):
                _, loss = self.model(x, y)
            loss.backward()
        finally:
            if self._uses_rng:
                self._rng_state = self._get_rng()
                self._set_rng(outer_rng)
        return loss.detach()

    def apply_grads(self) -> None:
        """Clip (per worker, or per stage: ``clip_groups``), inner optimiser step, schedule step. A parameter
        without a gradient (a pipeline stage peer that got no micro-batch) is left alone by the optimiser."""
        if self.train_cfg.grad_clip > 0:
            for group in self.clip_groups:
                with_grad = [p for p in group if p.grad is not None]
                if with_grad:
                    torch.nn.utils.clip_grad_norm_(with_grad, self.train_cfg.grad_clip, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.tokens_per_step

    def inner_steps(self, n: int) -> list[float]:
        """Run n local steps; returns their losses."""
        losses = []
        for _ in range(n):
            losses.append(self._forward_backward())
            self.apply_grads()
        return torch.stack(losses).tolist() if losses else []

    @torch.no_grad()
    def load_params(self, tensors: Sequence[torch.Tensor]) -> None:
        for p, t in zip(self.params, tensors, strict=True):
            p.copy_(t)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "step": self.step,
            "tokens": self.tokens,
            "rng": self._rng_state,
        }

    def load_state_dict(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        self.sampler.load_state_dict(s["sampler"])
        self.step, self.tokens, self._rng_state = s["step"], s["tokens"], s["rng"]


def check_counts(n: int, counts: Sequence[int] | None, size: int) -> list[int]:
    """Per-worker step counts for ``inner_steps``: default n for every worker; each must be in [0, n]."""
    if counts is None:
        return [n] * size
    counts = [int(c) for c in counts]
    if len(counts) != size or any(c < 0 or c > n for c in counts):
        raise ValueError(f"counts={counts} is invalid: need one step count in [0, {n}] per local worker ({size})")
    return counts


class WorkerGroup:
    """The workers this process hosts, run one after another (``backend.execution=sequential``)."""

    def __init__(self, workers: Sequence[Worker]):
        self.workers = list(workers)

    @property
    def size(self) -> int:
        return len(self.workers)

    @property
    def ranks(self) -> list[int]:
        return [w.rank for w in self.workers]

    @property
    def data_workers(self) -> int:
        """The run's workers whose data this group trains on (a pipeline's replicas can outnumber them)."""
        return self.size

    @property
    def step(self) -> int:
        """The furthest worker's inner step (all workers agree unless per-worker step counts were used)."""
        return max(w.step for w in self.workers)

    @property
    def steps(self) -> list[int]:
        """Each worker's inner step count."""
        return [w.step for w in self.workers]

    @property
    def lr(self) -> float:
        """The inner learning rate worker 0 uses for its next step."""
        return self.workers[0].scheduler.get_last_lr()[0]

    def tokens_per_step(self) -> torch.Tensor:
        """(L,) tokens each worker processes per inner step."""
        return torch.tensor([w.tokens_per_step for w in self.workers], dtype=torch.float64)

    def compute_grads(self) -> tuple[list[float], list[torch.Tensor], list[float]]:
        """Every worker's gradient on its next batch: (losses (L,), grads [(L, *shape)], seconds (L,))."""
        losses, seconds = [], []
        for w in self.workers:
            t0 = time.perf_counter()
            losses.append(w.compute_grads())
            seconds.append(time.perf_counter() - t0)
        grads = [torch.stack([w.params[i].grad for w in self.workers]) for i in range(len(self.workers[0].params))]
        return losses, grads, seconds

    @torch.no_grad()
    def apply_grads(self, grads: Sequence[torch.Tensor]) -> None:
        """Overwrite each worker's gradient with ``grads[i]`` (shape = param shape, shared by all) and step."""
        for w in self.workers:
            for p, g in zip(w.params, grads, strict=True):
                p.grad = g.clone()
            w.apply_grads()

    def inner_steps(self, n: int, counts: Sequence[int] | None = None) -> tuple[list[list[float]], list[float]]:
        """n local steps on every worker: (losses [n][L], compute seconds (L,)).

        counts: per-worker step counts (each in [0, n]; default n for all). Worker i runs only its first
        counts[i] steps; it is masked for the rest (no batch drawn, params and optimiser state untouched) and
        its losses for those steps are NaN.
        """
        counts = check_counts(n, counts, self.size)
        per_worker, seconds = [], []
        for w, c in zip(self.workers, counts, strict=True):
            t0 = time.perf_counter()
            per_worker.append(w.inner_steps(c) + [math.nan] * (n - c))
            seconds.append(time.perf_counter() - t0)
        losses = [list(step) for step in zip(*per_worker, strict=True)]
        return losses, seconds

    @torch.no_grad()
    def pseudo_gradients(self, anchor: Sequence[torch.Tensor], idx: Sequence[int] | None = None) -> list[torch.Tensor]:
        """(anchor − local params) for every worker, stacked: [(L, *shape)]. idx: the parameter indices that
        ``anchor`` holds (a fragment of the model; default all, in order)."""
        idx = range(len(anchor)) if idx is None else idx
        return [torch.stack([a - w.params[i] for w in self.workers]) for a, i in zip(anchor, idx, strict=True)]

    @torch.no_grad()
    def pseudo_gradients_each(self, anchors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """(anchor_j − worker j's params), stacked, for per-worker anchors ``anchors[i]`` of shape (L, *shape)."""
        return [torch.stack([a[j] - w.params[i] for j, w in enumerate(self.workers)]) for i, a in enumerate(anchors)]

    @torch.no_grad()
    def load_params_each(self, stacked: Sequence[torch.Tensor]) -> None:
        """Worker j's params := ``stacked[i][j]`` (per-worker values, (L, *shape) each)."""
        for j, w in enumerate(self.workers):
            for p, t in zip(w.params, stacked, strict=True):
                p.copy_(t[j])

    def params(self, worker: int = 0) -> list[torch.Tensor]:
        return self.workers[worker].params

    def load_params(self, tensors: Sequence[torch.Tensor], idx: Sequence[int] | None = None) -> None:
        """Every worker's params (those at ``idx``, default all) := ``tensors``."""
        self.mix_params(tensors, range(len(tensors)) if idx is None else idx, 0.0)

    @torch.no_grad()
    def mix_params(self, tensors: Sequence[torch.Tensor], idx: Sequence[int], alpha: float) -> None:
        """Every worker's params at ``idx`` := alpha * own + (1 - alpha) * ``tensors``. alpha 0 is a copy (so a
        replica that diverged to inf/NaN is replaced, not kept: 0 * NaN is NaN)."""
        for w in self.workers:
            for t, i in zip(tensors, idx, strict=True):
                if alpha == 0.0:
                    w.params[i].copy_(t)
                else:
                    w.params[i].mul_(alpha).add_(t, alpha=1.0 - alpha)

    def take_stats(self) -> dict:
        """Diagnostics of how the group ran since the last call, for the round's log row (a pipeline's)."""
        return {}

    def state_dict(self) -> dict:
        return {"workers": [w.state_dict() for w in self.workers]}

    def load_state_dict(self, s: dict) -> None:
        if "workers" not in s:
            raise ValueError(
                f"this group state was written by backend.execution={s.get('execution', '?')}; "
                "resume with that execution mode (the checkpoint formats differ)"
            )
        for w, ws in zip(self.workers, s["workers"], strict=True):
            w.load_state_dict(ws)
