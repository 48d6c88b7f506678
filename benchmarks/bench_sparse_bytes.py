"""Bytes each worker sends per round as the group grows: top-k (all-gathered) against block top-k and sign
(re-sparsifying reduce-scatter), with fp32 and int8 for reference.

One averaging round of the ``small`` model's parameter tensors (10.7M parameters) among K workers, on the sim
backend: every worker's pseudo-gradient is really encoded, its payload counted, and the exchange priced as the real
backends run it (comm/exchange.py; tests/test_torch_backend.py and tests/test_hivemind_compression.py check that
torch/gloo and hivemind send exactly these bytes). Random pseudo-gradients: only the sizes matter here.

    .venv/bin/python benchmarks/bench_sparse_bytes.py [--workers 4 8 32] [--ratio 0.01] [--block-size 1024]

Columns: MB sent per worker per round, and that as a multiple of one worker's payload (topk: K-1; the
reduce-scattered codecs: 2(K-1)/K, below 2 for every K).
"""

from __future__ import annotations

import argparse

import torch

from locoswarm.comm.sim import SimAverager
from locoswarm.compression import codec_factory
from locoswarm.config import CompressionConfig, NetworkConfig
from locoswarm.model import GPT, GPTShape
from locoswarm.netsim import NetworkModel


def small_shapes() -> list[tuple[int, ...]]:
    with torch.device("meta"):
        model = GPT(GPTShape(n_layer=6, n_head=6, d_model=384, seq_len=256, vocab_size=65))
        return [tuple(p.shape) for p in model.parameters()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[4, 8, 32])
    p.add_argument("--ratio", type=float, default=0.01, help="kept fraction for topk and blocktopk")
    p.add_argument("--block-size", type=int, default=1024, help="blocktopk's block (sign keeps its 64)")
    args = p.parse_args()

    shapes = small_shapes()
    params = sum(torch.Size(s).numel() for s in shapes)
    codecs = [
        ("none", CompressionConfig(name="none")),
        ("int8", CompressionConfig(name="int8")),
        ("sign", CompressionConfig(name="sign")),
        (f"topk {args.ratio:g}", CompressionConfig(name="topk", ratio=args.ratio)),
        (f"blocktopk {args.ratio:g} B={args.block_size}",
         CompressionConfig(name="blocktopk", ratio=args.ratio, block_size=args.block_size)),
    ]  # fmt: skip
    print(f"# small model: {params / 1e6:.2f}M parameters in {len(shapes)} tensors; one round on the sim backend")
    header = f"| {'codec':<26} | {'path':<14} | {'payload MB':>10} |" + "".join(
        f" {f'K={k} MB':>9} | {'x payload':>9} |" for k in args.workers
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    gen = torch.Generator().manual_seed(0)
    for label, comp in codecs:
        cells, path, payload = [], "", 0.0
        for k in args.workers:
            averager = SimAverager(codec_factory(comp, 0), NetworkModel(NetworkConfig(), k))
            tensors = [torch.randn(k, *s, generator=gen) for s in shapes]
            r = averager.average(tensors, torch.ones(k))
            payload = r.payload_bytes  # one worker's payload (the mean over workers; equal here)
            path = "all-gather" if r.allgather else "reduce/all-red"
            per_worker = r.bytes_sent
            cells.append(f" {per_worker / 1e6:>9.3f} | {per_worker / payload:>9.3f} |")
            del tensors
        print(f"| {label:<26} | {path:<14} | {payload / 1e6:>10.3f} |" + "".join(cells))


if __name__ == "__main__":
    main()
