"""Batched ÷ sequential simulation: seconds per DiLoCo outer round, same workers, same data, side by side.

For every (preset, K) both groups are built from the same init, samplers and seeds, and one DiLoCo round
(H inner steps on every worker, pseudo-gradients, sim averaging, nesterov outer step) is timed for each,
interleaved rep by rep with alternating order so drifting machine load hits both alike. The table reports the
medians and their ratio (issue 7 targets on an H100, tiny preset: <= 0.3 at K=8, <= 0.1 at K=32).

    python benchmarks/bench_batched.py [--presets tiny small] [--workers 4 8 32] [--steps 1] [--batch 8] [--threads 1]

CPU rows are always measured; GPU rows only where CUDA is available (otherwise the table says so).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch

from locoswarm.batched import BatchedWorkerGroup
from locoswarm.comm.sim import SimAverager
from locoswarm.compression import make_codec
from locoswarm.config import CompressionConfig, InnerOptimizerConfig, NetworkConfig, OuterOptimizerConfig, TrainConfig
from locoswarm.data import BatchSampler
from locoswarm.model import GPT, PRESETS, GPTShape
from locoswarm.netsim import NetworkModel
from locoswarm.outer import OuterOptimizer
from locoswarm.strategies import DiLoCo
from locoswarm.worker import Worker, WorkerGroup


def build(mode: str, base: GPT, k: int, tokens: np.ndarray, args, device: torch.device) -> DiLoCo:
    train = TrainConfig(max_steps=10**6, batch_size=args.batch, warmup_steps=10)
    inner = InnerOptimizerConfig()
    samplers = [BatchSampler(tokens, args.batch, base.shape.seq_len, seed=100 + r) for r in range(k)]
    if mode == "batched":
        group = BatchedWorkerGroup(list(range(k)), base, samplers, inner, train, device, seeds=list(range(k)))
    else:
        workers = [Worker(r, copy.deepcopy(base), samplers[r], inner, train, device, seed=r) for r in range(k)]
        group = WorkerGroup(workers)
    averager = SimAverager(lambda key, i: make_codec(CompressionConfig()), NetworkModel(NetworkConfig(), k))
    anchor = [p.detach().clone() for p in group.params(0)]
    return DiLoCo(group, averager, anchor, OuterOptimizer(anchor, OuterOptimizerConfig()), args.steps)


def timed_round(strategy: DiLoCo, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    strategy.round(10**6)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(preset: str, k: int, reps: int, args, device: torch.device) -> tuple[float, float, int]:
    torch.manual_seed(0)
    base = GPT(GPTShape(**PRESETS[preset], seq_len=args.seq_len))
    tokens = np.random.default_rng(0).integers(0, 256, size=1_000_000, dtype=np.uint8)
    runs = {mode: build(mode, base, k, tokens, args, device) for mode in ("sequential", "batched")}
    if reps > 1:  # a single-rep cell is a big one: an untimed warm-up round would double its cost
        for s in runs.values():
            timed_round(s, device)  # warm-up: allocator, kernels, vmap tracing
    times: dict[str, list[float]] = {mode: [] for mode in runs}
    for rep in range(reps):
        order = list(runs) if rep % 2 == 0 else list(reversed(runs))
        for mode in order:
            times[mode].append(timed_round(runs[mode], device))
    return statistics.median(times["sequential"]), statistics.median(times["batched"]), base.num_params()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(PRESETS))
    ap.add_argument("--workers", nargs="+", type=int, default=[4, 8, 32])
    ap.add_argument("--steps", type=int, default=1, help="H: inner steps per round (CPU-sized default)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5, help="timed rounds per mode (fewer for small and K=32)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"DiLoCo round: H={args.steps} inner steps, batch {args.batch}x{args.seq_len}, AdamW, nesterov outer, "
          f"compression none; medians over interleaved reps; torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")  # fmt: skip
    print("| device | preset | params | K | reps | sequential s/round | batched s/round | batched ÷ sequential |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        for preset in args.presets:
            for k in args.workers:
                # On CPU the big cells dominate the run time: 3 reps for small or K=32, 1 for small at K=32.
                reps = args.reps
                if device.type == "cpu" and (preset != "tiny" or k >= 32):
                    reps = 1 if preset != "tiny" and k >= 32 else min(reps, 3)
                seq, bat, n = measure(preset, k, reps, args, device)
                print(f"| {name} | {preset} | {n / 1e6:.2f}M | {k} | {reps} | {seq:.3f} | {bat:.3f} | {bat / seq:.2f} |",
                      flush=True)  # fmt: skip
    if not torch.cuda.is_available():
        print("GPU rows: unmeasured (no CUDA device on this machine).")


if __name__ == "__main__":
    main()
