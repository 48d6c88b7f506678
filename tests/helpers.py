"""Shared builders for tests: small, fast configs built from the dataclasses (no Hydra needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from locoswarm.checkpoint import load_checkpoint
from locoswarm.config import Config


def tiny_config(**overrides) -> Config:
    """A ~30k-parameter GPT on synthetic data: a full run takes a second or two on CPU."""
    cfg = Config()
    cfg.data.name = "synthetic"
    cfg.data.synthetic_tokens = 60_000
    cfg.data.chunk_tokens = 1024
    cfg.model.n_layer, cfg.model.n_head, cfg.model.d_model, cfg.model.seq_len = 2, 2, 32, 32
    cfg.train.batch_size = 4
    cfg.train.max_steps = 12
    cfg.train.warmup_steps = 2
    cfg.train.log_interval = 2
    cfg.train.eval_interval = 6
    cfg.train.eval_batches = 2
    cfg.train.progress = False
    cfg.algorithm.inner_steps = 3
    cfg.algorithm.warmup_sync_steps = 0
    for dotted, value in overrides.items():
        *path, leaf = dotted.split("__")
        obj = cfg
        for p in path:
            obj = getattr(obj, p)
        if not hasattr(obj, leaf):
            raise AttributeError(f"no config key {dotted}")
        setattr(obj, leaf, value)
    return cfg


def build_test_group(cfg: Config):
    """The run's workers (all K, on CPU) and its initial model, built as ``build_run`` builds them: for tests that
    drive a strategy by hand."""
    from locoswarm.build import build_group
    from locoswarm.data import build_token_data
    from locoswarm.model import GPT, GPTShape
    from locoswarm.seeding import derive_seed

    data = build_token_data(cfg.data, cfg.workers, cfg.seed, cfg.model.seq_len)
    shape = GPTShape(n_layer=cfg.model.n_layer, n_head=cfg.model.n_head, d_model=cfg.model.d_model,
                     seq_len=cfg.model.seq_len, vocab_size=data.vocab_size, dropout=0.0)  # fmt: skip
    torch.manual_seed(derive_seed(cfg.seed, "model"))
    base = GPT(shape)
    return build_group(cfg, data, base, list(range(cfg.workers)), torch.device("cpu")), base


def final_params(run_dir: Path, worker: int = 0) -> dict[str, torch.Tensor]:
    """Worker params from the run's last checkpoint (train.checkpoint_every > 0 writes one at the end)."""
    ckpt = load_checkpoint(run_dir)
    assert ckpt is not None, f"no checkpoint in {run_dir}"
    state = ckpt["group"]["workers"][worker]["model"]
    return {k: v for k, v in state.items()}


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-30)).item() for k in a)


# The same tiny run as Hydra overrides, for tests that launch real processes (swarm peers, torchrun ranks).
TINY_OVERRIDES = [
    "data=synthetic", "data.synthetic_tokens=60000", "data.chunk_tokens=1024", "device=cpu",
    "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.seq_len=32",
    "train.batch_size=4", "train.warmup_steps=2", "train.log_interval=3", "train.eval_interval=6",
    "train.eval_batches=2", "train.checkpoint_every=1", "train.progress=false",
    "algorithm=diloco", "algorithm.inner_steps=3", "algorithm.warmup_sync_steps=0",
]  # fmt: skip
