"""Batched simulation: the K local workers as one vmapped model over K-stacked parameters.

``BatchedWorkerGroup`` is a drop-in for ``WorkerGroup`` (``backend.execution=batched``). Every parameter and
inner-optimiser state lives as one (K, *shape) tensor, so each inner step is a single
``vmap(grad_and_value(functional_call))`` forward/backward over the K per-worker batches followed by one
elementwise optimiser update on the stacked tensors. Strategies, codecs and averagers already speak the
stacked layout, so they run unchanged; ``params(worker)`` returns row views.

What stays per worker, exactly as in the sequential group:
- data: each worker draws from its own ``BatchSampler`` (identical streams in both modes);
- the learning-rate schedule, AdamW bias corrections and step counters (workers may differ in step count);
- gradient clipping: the norm is computed over each worker's own gradients;
- masking: a worker past its step count draws no batch and its params and optimiser state stay untouched
  (its row still rides through the vmapped forward on a dummy batch: it costs compute, not correctness).

The inner optimisers re-implement torch.optim.AdamW / SGD (foreach, no amsgrad/nesterov) with per-worker
scalars as (K, 1, ...) tensors; a masked worker gets identity coefficients (decay 1, step size 0, moment
weights 0/1), which leave its rows bit-for-bit unchanged. Against the sequential group the results agree to
float32 rounding: the vmapped matmuls reduce in a different order.

Dropout: vmap's ``randomness="different"`` draws every worker's mask from one generator in one call, so the
group keeps one private RNG stream seeded from all workers' seeds (checkpointed, replays exactly, differs per
worker). It cannot reproduce the sequential group's per-worker dropout streams; with dropout > 0 the two
modes are statistically, not numerically, equivalent.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from collections.abc import Sequence

import torch
from torch.func import functional_call, grad_and_value, vmap

from locoswarm.config import Config, Execution, InnerOptimizerConfig, InnerOptimizerName, TrainConfig
from locoswarm.data import BatchSampler
from locoswarm.model import GPT
from locoswarm.worker import check_counts, get_device_rng, lr_lambda, set_device_rng

log = logging.getLogger(__name__)

ADAMW_EPS = 1e-8  # torch.optim.AdamW's default, which build_inner_optimizer uses


class StackedInnerOptimizer:
    """AdamW or SGD over K-stacked params; per-worker step counts and learning rates; masked workers skip.

    Matches ``build_inner_optimizer`` (decay on >= 2-D params only) followed by ``LambdaLR(lr_lambda(train))``.
    """

    def __init__(self, params: Sequence[torch.Tensor], param_ndims: Sequence[int], cfg: InnerOptimizerConfig):
        self.cfg = cfg
        self.adamw = InnerOptimizerName(cfg.name) == InnerOptimizerName.adamw
        self.params = list(params)
        self.weight_decay = [cfg.weight_decay if nd >= 2 else 0.0 for nd in param_ndims]
        self.state: dict[str, list[torch.Tensor]] = {}
        if self.adamw:
            self.state["exp_avg"] = [torch.zeros_like(p) for p in self.params]
            self.state["exp_avg_sq"] = [torch.zeros_like(p) for p in self.params]
        elif cfg.momentum != 0:
            self.state["momentum_buffer"] = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor], lrs: Sequence[float], steps: Sequence[int], active: Sequence[bool]):
        """One update. lrs: each worker's lr for this step; steps: updates each worker has taken before it."""
        k = len(lrs)
        dev = self.params[0].device
        views: dict[int, dict[str, torch.Tensor]] = {}

        def per_worker(values: list[float]) -> torch.Tensor:
            # Python floats -> float32, exactly as torch casts a scalar operand for a float32 tensor.
            return torch.tensor(values, dtype=torch.float32, device=dev)

        def view(vec: torch.Tensor, ndim: int) -> torch.Tensor:
            return vec.view(k, *([1] * ndim))  # (K, 1, ..., 1): broadcasts over one parameter

        if self.adamw:
            b1, b2 = self.cfg.beta1, self.cfg.beta2
            # Same float64 scalar math as torch's _multi_tensor_adam (non-capturable branch).
            bc1 = [1 - b1 ** (s + 1) for s in steps]
            bc2_sqrt = [(1 - b2 ** (s + 1)) ** 0.5 for s in steps]
            scal = {
                "lerp": per_worker([1 - b1 if a else 0.0 for a in active]),
                "mul2": per_worker([b2 if a else 1.0 for a in active]),
                "add2": per_worker([1 - b2 if a else 0.0 for a in active]),
                "bc2": per_worker(bc2_sqrt),
                "step": per_worker([-(lr / bc) if a else 0.0 for lr, bc, a in zip(lrs, bc1, active, strict=True)]),
            }
            decay_cache: dict[float, torch.Tensor] = {}
            for i, (p, g) in enumerate(zip(self.params, grads, strict=True)):
                nd = p.ndim - 1
                if nd not in views:
                    views[nd] = {name: view(t, nd) for name, t in scal.items()}
                v = views[nd]
                wd = self.weight_decay[i]
                if wd != 0:
                    if wd not in decay_cache:
                        decay_cache[wd] = per_worker(
                            [1 - lr * wd if a else 1.0 for lr, a in zip(lrs, active, strict=True)]
                        )
                    p.mul_(view(decay_cache[wd], nd))
                m, sq = self.state["exp_avg"][i], self.state["exp_avg_sq"][i]
                m.lerp_(g, v["lerp"])
                sq.mul_(v["mul2"]).addcmul_(g * v["add2"], g)
                denom = sq.sqrt().div_(v["bc2"]).add_(ADAMW_EPS)
                p.add_((m * v["step"]).div_(denom))  # torch's addcdiv: p + (step_size * m) / denom
            return

        neg_lr = per_worker([-lr if a else 0.0 for lr, a in zip(lrs, active, strict=True)])
        momentum = self.cfg.momentum
        if momentum != 0:
            # A worker's first step seeds the buffer with its gradient (torch: buf = clone(grad)); masked: keep.
            keep = per_worker([(momentum if s > 0 else 0.0) if a else 1.0 for s, a in zip(steps, active, strict=True)])
            take = per_worker([1.0 if a else 0.0 for a in active])
        for i, (p, g) in enumerate(zip(self.params, grads, strict=True)):
            nd = p.ndim - 1
            if self.weight_decay[i] != 0:
                g = torch.add(g, p, alpha=self.weight_decay[i])  # L2, as torch.optim.SGD
            if momentum != 0:
                buf = self.state["momentum_buffer"][i]
                buf.mul_(view(keep, nd)).add_(g * view(take, nd))
                g = buf
            p.add_(g * view(neg_lr, nd))

    def state_dict(self) -> dict:
        return {name: [t.detach().clone() for t in ts] for name, ts in self.state.items()}

    def load_state_dict(self, s: dict) -> None:
        if set(s) != set(self.state):
            raise ValueError(f"inner optimiser state has {sorted(s)}, expected {sorted(self.state)}")
        with torch.no_grad():
            for name, ts in self.state.items():
                for t, src in zip(ts, s[name], strict=True):
                    t.copy_(src)


@torch.no_grad()
def clip_per_worker(grads: Sequence[torch.Tensor], max_norm: float) -> None:
    """clip_grad_norm_ for each worker's own gradients (row k of every stacked tensor), in place."""
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads])  # (n_params, K)
    total = torch.linalg.vector_norm(norms, dim=0)  # (K,)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.ndim - 1))))


def group_seed(seeds: Sequence[int]) -> int:
    """One dropout seed for the batched group, derived from every worker's own seed."""
    digest = hashlib.sha256(repr(("batched-dropout", tuple(seeds))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class BatchedWorkerGroup:
    """The workers this process hosts, as one vmapped model over K-stacked state (``backend.execution=batched``).

    model: the shared initial model (copied; its weights become every worker's start); samplers: one per
    worker, in rank order; seeds: each worker's dropout seed (combined into the group's stream).
    """

    def __init__(
        self,
        ranks: Sequence[int],
        model: GPT,
        samplers: Sequence[BatchSampler],
        inner: InnerOptimizerConfig,
        train: TrainConfig,
        device: torch.device,
        seeds: Sequence[int],
    ):
        if not (len(ranks) == len(samplers) == len(seeds) >= 1):
            raise ValueError(f"need one sampler and seed per rank: {len(ranks)} ranks, {len(samplers)}, {len(seeds)}")
        self._ranks = list(ranks)
        self.samplers = list(samplers)
        self.train_cfg = train
        self.device = device
        k = len(self._ranks)
        # The module only supplies the architecture to functional_call; its own weights are never trained.
        self._model = copy.deepcopy(model).to(device).train()
        named = list(self._model.named_parameters())  # tied weights appear once, as in model.parameters()
        self._names = [n for n, _ in named]
        self._params = [p.detach().unsqueeze(0).repeat(k, *([1] * p.ndim)).contiguous() for _, p in named]
        self.optimizer = StackedInnerOptimizer(self._params, [p.ndim for _, p in named], inner)
        self._base_lr = inner.lr
        self._lr_fn = lr_lambda(train)
        self._steps = [0] * k
        self._tokens = [0] * k
        # Dropout draws from the global RNG of the device; the group keeps its own stream (none without dropout).
        self._rng = torch.Generator(device=device).manual_seed(group_seed(seeds)).get_state()
        self._uses_rng = self._model.shape.dropout > 0
        self._autocast = device.type == "cuda"
        self._seq_len = self._model.shape.seq_len
        self._dummy: tuple[torch.Tensor, torch.Tensor] | None = None
        self._fwd_bwd = vmap(grad_and_value(self._loss), in_dims=(0, 0, 0), randomness="different")

    def _loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, loss = functional_call(self._model, params, (x, y))  # one worker: params unstacked, x, y (B, T)
        return loss

    # --- the WorkerGroup interface -------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self._ranks)

    @property
    def ranks(self) -> list[int]:
        return list(self._ranks)

    @property
    def step(self) -> int:
        """The furthest worker's inner step (all workers agree unless per-worker step counts were used)."""
        return max(self._steps)

    @property
    def lr(self) -> float:
        """The inner learning rate worker 0 uses for its next step."""
        return self._base_lr * self._lr_fn(self._steps[0])

    @property
    def steps(self) -> list[int]:
        """Each worker's inner step count."""
        return list(self._steps)

    def tokens_per_step(self) -> torch.Tensor:
        """(L,) tokens each worker processes per inner step."""
        return torch.full((self.size,), float(self.train_cfg.batch_size * self._seq_len), dtype=torch.float64)

    def _batches(self, active: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, B, T) inputs and targets; a masked worker draws nothing and rides on a dummy batch."""
        xs, ys = [], []
        for sampler, a in zip(self.samplers, active, strict=True):
            if a:
                x, y = sampler.next()
            else:
                if self._dummy is None:
                    shape = (self.train_cfg.batch_size, self._seq_len)
                    self._dummy = (torch.zeros(shape, dtype=torch.int64), torch.zeros(shape, dtype=torch.int64))
                x, y = self._dummy
            xs.append(x)
            ys.append(y)
        return torch.stack(xs).to(self.device, non_blocking=True), torch.stack(ys).to(self.device, non_blocking=True)

    def _forward_backward(self, active: Sequence[bool]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One vmapped forward/backward: losses (K,) and grads [(K, *shape)] (masked rows are meaningless)."""
        x, y = self._batches(active)
        if self._uses_rng:
            outer_rng = self._get_rng()
            self._set_rng(self._rng)
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._autocast):
                grads, losses = self._fwd_bwd(dict(zip(self._names, self._params, strict=True)), x, y)
        finally:
            if self._uses_rng:
                self._rng = self._get_rng()
                self._set_rng(outer_rng)
        return losses.detach(), [grads[n] for n in self._names]

    def _get_rng(self) -> torch.Tensor:
        return get_device_rng(self.device)

    def _set_rng(self, state: torch.Tensor) -> None:
        set_device_rng(self.device, state)

    def _apply(self, grads: list[torch.Tensor], active: Sequence[bool]) -> None:
        """Per-worker clip, inner optimiser step and schedule step for the active workers."""
        if self.train_cfg.grad_clip > 0:
            clip_per_worker(grads, self.train_cfg.grad_clip)
        lrs = [self._base_lr * self._lr_fn(s) for s in self._steps]
        self.optimizer.step(grads, lrs, self._steps, active)
        tokens = self.train_cfg.batch_size * self._seq_len
        for i, a in enumerate(active):
            if a:
                self._steps[i] += 1
                self._tokens[i] += tokens

    def compute_grads(self) -> tuple[list[float], list[torch.Tensor], list[float]]:
        """Every worker's gradient on its next batch: (losses (L,), grads [(L, *shape)], seconds (L,))."""
        t0 = time.perf_counter()
        losses, grads = self._forward_backward([True] * self.size)
        loss_list = losses.float().tolist()  # syncs the device, so the time below is the real compute time
        seconds = (time.perf_counter() - t0) / self.size  # one batched step: each worker's share of it
        return loss_list, grads, [seconds] * self.size

    def apply_grads(self, grads: Sequence[torch.Tensor]) -> None:
        """Give every worker the gradient ``grads[i]`` (shape = param shape, shared by all) and step."""
        stacked = [
            g.to(p.dtype).unsqueeze(0).repeat(self.size, *([1] * g.ndim))
            for g, p in zip(grads, self._params, strict=True)
        ]
        self._apply(stacked, [True] * self.size)

    def inner_steps(self, n: int, counts: Sequence[int] | None = None) -> tuple[list[list[float]], list[float]]:
        """n local steps on every worker: (losses [n][L], compute seconds (L,)).

        counts: per-worker step counts (each in [0, n]; default n for all). Worker i runs only its first
        counts[i] steps and is masked for the rest; its losses for those steps are NaN. Compute seconds are
        the measured time split in proportion to the steps each worker ran.
        """
        counts = check_counts(n, counts, self.size)
        t0 = time.perf_counter()
        step_losses = []
        for s in range(max(counts, default=0)):
            active = [c > s for c in counts]
            losses, grads = self._forward_backward(active)
            self._apply(grads, active)
            step_losses.append(losses)
        table = torch.stack(step_losses).float().tolist() if step_losses else []  # one device sync per phase
        elapsed = time.perf_counter() - t0
        out = [[table[s][i] if s < c else math.nan for i, c in enumerate(counts)] for s in range(n)]
        total = sum(counts)
        seconds = [elapsed * c / total if total else 0.0 for c in counts]
        return out, seconds

    @torch.no_grad()
    def pseudo_gradients(self, anchor: Sequence[torch.Tensor], idx: Sequence[int] | None = None) -> list[torch.Tensor]:
        """(anchor − local params) for every worker, stacked: [(L, *shape)]. idx: the parameter indices that
        ``anchor`` holds (default all, in order)."""
        idx = range(len(anchor)) if idx is None else idx
        return [a.unsqueeze(0) - self._params[i] for a, i in zip(anchor, idx, strict=True)]

    @torch.no_grad()
    def pseudo_gradients_each(self, anchors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """(anchor_j − worker j's params), stacked, for per-worker anchors of shape (L, *shape)."""
        return [a - p for a, p in zip(anchors, self._params, strict=True)]

    @torch.no_grad()
    def load_params_each(self, stacked: Sequence[torch.Tensor]) -> None:
        """Worker j's params := ``stacked[i][j]``."""
        for p, t in zip(self._params, stacked, strict=True):
            p.copy_(t)

    def params(self, worker: int = 0) -> list[torch.Tensor]:
        """Worker ``worker``'s params as views into the stacked tensors."""
        return [p[worker] for p in self._params]

    def load_params(self, tensors: Sequence[torch.Tensor], idx: Sequence[int] | None = None) -> None:
        """Every worker's params (those at ``idx``, default all) := ``tensors`` (param shapes)."""
        self.mix_params(tensors, range(len(tensors)) if idx is None else idx, 0.0)

    @torch.no_grad()
    def mix_params(self, tensors: Sequence[torch.Tensor], idx: Sequence[int], alpha: float) -> None:
        """Every worker's params at ``idx`` := alpha * own + (1 - alpha) * ``tensors`` (alpha 0: a copy, as in
        ``WorkerGroup.mix_params``)."""
        for t, i in zip(tensors, idx, strict=True):
            p = self._params[i]
            if alpha == 0.0:
                p.copy_(t.unsqueeze(0).expand_as(p))
            else:
                p.mul_(alpha).add_(t.unsqueeze(0), alpha=1.0 - alpha)

    @property
    def data_workers(self) -> int:
        """The run's workers whose data this group trains on (see ``WorkerGroup.data_workers``)."""
        return self.size

    def take_stats(self) -> dict:
        """Diagnostics of how the group ran since the last call (none: see ``WorkerGroup.take_stats``)."""
        return {}

    def state_dict(self) -> dict:
        return {
            "execution": Execution.batched.value,
            "names": list(self._names),
            "params": [p.detach().clone() for p in self._params],
            "optimizer": self.optimizer.state_dict(),
            "samplers": [s.state_dict() for s in self.samplers],
            "steps": list(self._steps),
            "tokens": list(self._tokens),
            "rng": self._rng.clone(),
        }

    def load_state_dict(self, s: dict) -> None:
        if s.get("execution") != Execution.batched.value:
            raise ValueError(
                "this group state was written by backend.execution=sequential; resume with that execution mode "
                "(the checkpoint formats differ)"
            )
        if s["names"] != self._names or len(s["steps"]) != self.size:
            raise ValueError(f"checkpoint holds {len(s['steps'])} workers of another model; this group has {self.size}")
        with torch.no_grad():
            for p, src in zip(self._params, s["params"], strict=True):
                p.copy_(src)
        self.optimizer.load_state_dict(s["optimizer"])
        for sampler, ss in zip(self.samplers, s["samplers"], strict=True):
            sampler.load_state_dict(ss)
        self._steps, self._tokens = list(s["steps"]), list(s["tokens"])
        self._rng = s["rng"].clone()


# --- choosing the execution mode ---------------------------------------------------------------------------


def estimate_batched_bytes(cfg: Config, num_params: int, local_workers: int, vocab_size: int) -> int:
    """A generous estimate of the device memory the batched group needs (bytes).

    State: params, grads, optimiser moments and ~2 update temporaries, fp32, per worker. Activations per
    worker: Korthikanti et al. (2022) for a transformer layer with 16-bit activations, B T d (34 + 5 H T / d)
    bytes, plus the logits (16-bit, their fp32 copy and its gradient).
    """
    moments = 2 if InnerOptimizerName(cfg.inner_optimizer.name) == InnerOptimizerName.adamw else 1
    state = num_params * 4 * (2 + moments + 2)
    m, b = cfg.model, cfg.train.batch_size
    layer = b * m.seq_len * m.d_model * (34 + 5 * m.n_head * m.seq_len / m.d_model)
    logits = b * m.seq_len * vocab_size * (2 + 4 + 4)
    return int(local_workers * (state + m.n_layer * layer + logits))


def resolve_execution(
    cfg: Config, device: torch.device, num_params: int, local_workers: int, vocab_size: int
) -> tuple[Execution, str]:
    """``backend.execution`` made concrete: (mode, why). ``auto`` is batched only on CUDA when it fits."""
    requested = Execution(cfg.backend.execution)
    if requested != Execution.auto:
        return requested, f"backend.execution={requested.value}"
    if local_workers < 2:
        return Execution.sequential, "auto: one local worker, nothing to batch"
    if device.type != "cuda":
        return Execution.sequential, f"auto: device={device.type}; batched pays off on CUDA only"
    need = estimate_batched_bytes(cfg, num_params, local_workers, vocab_size)
    free, _ = torch.cuda.mem_get_info(device)
    budget = int(0.8 * free)  # headroom for the allocator's fragmentation and the eval model
    if need > budget:
        return Execution.sequential, f"auto: batched needs ~{need / 2**30:.2f} GiB > 80% of free {free / 2**30:.2f} GiB"
    return Execution.batched, f"auto: CUDA, batched needs ~{need / 2**30:.2f} GiB of {free / 2**30:.2f} GiB free"
