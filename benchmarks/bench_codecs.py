"""Encode + decode throughput of every codec on one 4M-entry fp32 tensor, against ``torch.clone`` of it.

Run: ``python benchmarks/bench_codecs.py [--numel N] [--repeats R] [--threads T]``. For each device (CPU, and
CUDA when available) the codecs and a plain clone are timed in interleaved rounds (clone, codec, clone, codec,
...), R rounds, and the medians are reported: GB/s of fp32 input processed per second, the time relative to
clone measured in the same run (x clone: how many clones one encode + decode costs), and the achieved wire
ratio (payload bytes / fp32 bytes). The tensor is a 2048 x 2048 matrix, so PowerSGD compresses it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from locoswarm.compression import compression_ratio, make_codec
from locoswarm.config import CompressionConfig, CompressionName

CASES = [
    ("none", {}),
    ("fp16", {}),
    ("bf16", {}),
    ("int8", {"block_size": 64}),
    ("int4", {"block_size": 64}),
    ("sign", {"block_size": 64}),
    ("topk", {"ratio": 0.01}),
    ("randomk", {"ratio": 0.01}),
    ("powersgd", {"rank": 4}),
    ("topk+ef", {"ratio": 0.01, "error_feedback": True}),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def bench(device: torch.device, numel: int, repeats: int) -> list[tuple[str, float, float, float]]:
    side = int(numel**0.5)
    x = torch.randn(side, numel // side, generator=torch.Generator().manual_seed(0)).to(device)
    codecs = {}
    for label, kw in CASES:
        name = label.split("+")[0]
        codecs[label] = make_codec(CompressionConfig(name=CompressionName(name), **kw), seed=1)
    ratios = {}
    for label, codec in codecs.items():  # warm-up (allocator, first PowerSGD Q, lazy init)
        p = codec.encode(x)
        codec.decode(p)
        ratios[label] = compression_ratio(p)
    clone_times: list[float] = []
    times: dict[str, list[float]] = {label: [] for label in codecs}
    for _ in range(repeats):
        for label, codec in codecs.items():
            clone_times.append(_time(lambda: x.clone(), device))
            times[label].append(_time(lambda c=codec: c.decode(c.encode(x)), device))
    clone = statistics.median(clone_times)
    gb = x.numel() * 4 / 1e9
    rows = [("clone", gb / clone, 1.0, 1.0)]
    for label in codecs:
        t = statistics.median(times[label])
        rows.append((label, gb / t, t / clone, ratios[label]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {args.numel} fp32 entries")
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"\n{name}: encode + decode, median of {args.repeats} interleaved rounds")
        print(f"{'codec':<10} {'GB/s':>8} {'x clone':>8} {'wire ratio':>11}")
        for label, gbps, rel, ratio in bench(device, args.numel, args.repeats):
            print(f"{label:<10} {gbps:>8.2f} {rel:>8.1f} {ratio:>11.4f}")


if __name__ == "__main__":
    main()
