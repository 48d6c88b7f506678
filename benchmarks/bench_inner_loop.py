"""Inner-loop overhead: a locoswarm Worker's tokens/s ÷ a bare PyTorch training loop's, same model/batch/device.

Both loops run in this one process, interleaved in alternating blocks so machine noise hits both alike; the
ratio of the medians is reported (target >= 0.97). The bare loop is the minimal nanoGPT-style loop: sample a
batch, forward, backward, clip, AdamW step, lr schedule step.

    python benchmarks/bench_inner_loop.py [--model tiny] [--batch 16] [--blocks 7] [--steps 20]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch

from locoswarm.config import InnerOptimizerConfig, TrainConfig
from locoswarm.data import BatchSampler
from locoswarm.model import GPT, PRESETS, GPTShape
from locoswarm.worker import Worker, build_inner_optimizer, lr_lambda


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=7, help="alternating measurement blocks per loop")
    ap.add_argument("--steps", type=int, default=20, help="steps per block")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    device = torch.device(args.device)
    shape = GPTShape(**PRESETS[args.model], seq_len=args.seq_len)
    torch.manual_seed(0)
    base = GPT(shape)
    tokens = np.random.default_rng(0).integers(0, 256, size=2_000_000, dtype=np.uint8)
    train_cfg = TrainConfig(max_steps=10**6, batch_size=args.batch, warmup_steps=10)
    inner_cfg = InnerOptimizerConfig()

    worker = Worker(0, copy.deepcopy(base), BatchSampler(tokens, args.batch, args.seq_len, seed=1), inner_cfg,
                    train_cfg, device, seed=2)  # fmt: skip

    # The bare loop: same model, optimiser groups, schedule, clipping; its own minimal batch sampling.
    model = copy.deepcopy(base).to(device)
    opt = build_inner_optimizer(model, inner_cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train_cfg))
    gen = torch.Generator().manual_seed(1)
    data = torch.from_numpy(tokens.astype(np.int64))
    autocast = device.type == "cuda"

    def bare_steps(n: int) -> None:
        for _ in range(n):
            ix = torch.randint(len(data) - args.seq_len - 1, (args.batch,), generator=gen)
            x = torch.stack([data[i : i + args.seq_len] for i in ix]).to(device)
            y = torch.stack([data[i + 1 : i + 1 + args.seq_len] for i in ix]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        loss.item()

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(args.steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.steps * args.batch * args.seq_len / (time.perf_counter() - t0)

    bare_steps(3)  # warm-up both (allocator, kernels)
    worker.inner_steps(3)
    bare, ours = [], []
    for b in range(args.blocks):
        # alternate which loop goes first so drift in machine load does not favour one
        if b % 2 == 0:
            bare.append(timed(bare_steps))
            ours.append(timed(worker.inner_steps))
        else:
            ours.append(timed(worker.inner_steps))
            bare.append(timed(bare_steps))
    mb, mo = statistics.median(bare), statistics.median(ours)
    n_params = base.num_params()
    print(f"model={args.model} ({n_params / 1e6:.2f}M params) batch={args.batch}x{args.seq_len} device={device} "
          f"blocks={args.blocks}x{args.steps} steps")  # fmt: skip
    print(f"bare PyTorch loop : {mb:10.0f} tokens/s (median; min {min(bare):.0f}, max {max(bare):.0f})")
    print(f"locoswarm Worker  : {mo:10.0f} tokens/s (median; min {min(ours):.0f}, max {max(ours):.0f})")
    print(f"ratio (Worker / bare) = {mo / mb:.3f}   target >= 0.97")


if __name__ == "__main__":
    main()
