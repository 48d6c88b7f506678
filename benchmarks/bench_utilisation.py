"""Compute utilisation of ddp and diloco (H=50, H=500), with and without compression, from 10 Gbit/s to 10 Mbit/s.

The model is the ``150m`` preset (conf/model/150m.yaml) with the GPT-2 vocabulary (50257), priced with the
measured H100 step time of the issue: GPT-2 124M takes 35 ms per 16x1024-token step. The 150m preset trains on
the same 16x1024 tokens per step, so its step time is that figure scaled by parameter count (training FLOPs per
token are ~6 x params; attention's extra FLOPs at T=1024 are ignored). ``--measure`` times the step on this
machine's CUDA device instead (both shapes, side by side).

Every cell is ``locoswarm.netsim.utilisation``: the same NetworkModel the sim backend prices runs with, for K
workers with uniform links, each round = H steps of compute then one all-reduce of the pseudo-gradient (ddp:
one step and a gradient all-reduce). Payloads come from the codecs themselves (``Codec.wire_nbytes`` on every
parameter tensor): int8 is 1 byte per entry plus an fp32 scale per 64-entry block, exchanged by a re-quantising
reduce-scatter (priced as an all-reduce); sign, 1 bit plus a scale per block, and blocktopk 1% (6 bytes per kept
entry) the same way; topk 1% (8 bytes per kept entry, one selection over each whole tensor) all-gathered.

    .venv/bin/python benchmarks/bench_utilisation.py [--workers 8] [--latency-ms 0] [--topology ring] [--overlap]
"""

from __future__ import annotations

import argparse
import time

import torch

from locoswarm.compression import make_codec
from locoswarm.config import CompressionConfig, NetworkConfig, Topology
from locoswarm.model import GPT, GPTShape
from locoswarm.netsim import codec_allgathers, required_bandwidth, utilisation

GPT2_PARAMS = 124e6  # GPT-2 small as usually counted (tied embeddings, vocab 50257, 1024 positions)
GPT2_STEP_SECONDS = 0.035  # measured on an H100 for a 16 x 1024-token step (the figure)
VOCAB = 50257
BANDWIDTHS_MBPS = [10_000, 3_000, 1_000, 300, 100, 30, 10]


def preset_150m() -> GPTShape:
    return GPTShape(n_layer=12, n_head=16, d_model=896, seq_len=1024, vocab_size=VOCAB)


def param_shapes(shape: GPTShape) -> list[tuple[int, ...]]:
    with torch.device("meta"):
        return [tuple(p.shape) for p in GPT(shape).parameters()]


def payload_bytes(shapes: list[tuple[int, ...]], codec: CompressionConfig) -> float:
    c = make_codec(codec)
    return float(sum(c.wire_nbytes(s, torch.float32) for s in shapes))


def measure_step_seconds(shape: GPTShape, batch: int = 16, steps: int = 10) -> float:
    """Median seconds of one bf16-autocast AdamW training step on CUDA."""
    dev = torch.device("cuda")
    model = GPT(shape).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, shape.vocab_size, (batch, shape.seq_len), device=dev)
    times = []
    for i in range(steps + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def fmt_bw(mbps: float) -> str:
    if mbps == float("inf"):
        return "never"
    if mbps >= 1e6:
        return f"{mbps / 1e6:.3g}T"
    return f"{mbps / 1e3:.3g}G" if mbps >= 1e3 else f"{mbps:.3g}M"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--topology", default="ring", choices=[t.value for t in Topology])
    p.add_argument("--overlap", action="store_true")
    p.add_argument("--measure", action="store_true", help="time the 150m step on CUDA instead of scaling 35 ms")
    args = p.parse_args()

    shape = preset_150m()
    shapes = param_shapes(shape)
    params = sum(torch.Size(s).numel() for s in shapes)
    if args.measure:
        if not torch.cuda.is_available():
            raise SystemExit("--measure needs a CUDA device")
        gpt2 = GPTShape(n_layer=12, n_head=12, d_model=768, seq_len=1024, vocab_size=VOCAB)
        ref = measure_step_seconds(gpt2)
        step = measure_step_seconds(shape)
        print(f"# measured on {torch.cuda.get_device_name()}: GPT-2 124M {ref * 1e3:.1f} ms/step, "
              f"150m {step * 1e3:.1f} ms/step (ratio {step / ref:.2f}; params ratio {params / GPT2_PARAMS:.2f})")  # fmt: skip
    else:
        step = GPT2_STEP_SECONDS * params / GPT2_PARAMS
    net = NetworkConfig(name="bench", latency_ms=args.latency_ms, topology=Topology(args.topology),
                        overlap=args.overlap)  # fmt: skip
    print(f"# 150m preset: {params / 1e6:.1f}M params (vocab {VOCAB}), {step * 1e3:.1f} ms per 16x1024-token step "
          f"({'measured' if args.measure else f'= 35 ms x {params / 1e6:.1f}M / 124M, the H100 GPT-2 figure scaled'})")  # fmt: skip
    print(f"# K={args.workers} workers, {args.topology} all-reduce, latency {args.latency_ms} ms, "
          f"overlap={args.overlap}; cells: compute utilisation; last column: bandwidth for 95%")  # fmt: skip
    header = f"| {'algorithm':<34} | {'payload':>9} |" + "".join(
        f" {fmt_bw(b) + 'bit/s':>9} |" for b in BANDWIDTHS_MBPS
    )
    print(header + f" {'95% needs':>10} |")
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|" + "-" * 12 + "|")
    # int8, sign and blocktopk are reduce-scattered and re-encoded per chunk (2(K-1)/K payloads each way, like an
    # all-reduce); topk can only be all-gathered (K-1 payloads), which at K=8 costs it 4x the bytes of blocktopk
    # at the same ratio (3.5x less 8/6 for its wider indices). Each priced as the backends send it.
    variants = (
        (CompressionConfig(name="none"), ""),
        (CompressionConfig(name="int8"), " +int8"),
        (CompressionConfig(name="sign"), " +sign"),
        (CompressionConfig(name="topk", ratio=0.01), " +topk 1% (all-gather)"),
        (CompressionConfig(name="blocktopk", ratio=0.01, block_size=1024), " +blocktopk 1%"),
    )
    for h, name in ((1, "ddp"), (50, "diloco H=50"), (500, "diloco H=500")):
        for codec, suffix in variants:
            allgather = codec_allgathers(codec)
            payload = payload_bytes(shapes, codec)
            label = name + suffix
            cells = []
            for mbps in BANDWIDTHS_MBPS:
                cfg = NetworkConfig(name="bench", bandwidth_mbps=mbps, latency_ms=args.latency_ms,
                                    topology=Topology(args.topology), overlap=args.overlap)  # fmt: skip
                cells.append(utilisation(cfg, args.workers, h * step, payload, allgather))
            need = required_bandwidth(net, args.workers, h * step, payload, 0.95, allgather)
            print(f"| {label:<34} | {payload / 1e6:>6.0f} MB |" + "".join(f" {u:>9.1%} |" for u in cells)
                  + f" {fmt_bw(need) + 'bit/s':>10} |")  # fmt: skip


if __name__ == "__main__":
    main()
