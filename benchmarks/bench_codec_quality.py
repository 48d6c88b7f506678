"""Quality vs bytes: one tiny-model DiLoCo run per codec (sim backend, same seed and data), final val loss
against the bytes each worker sent, as a markdown table. Bytes are what a real backend sends: summable codecs'
payloads are all-reduced (2(K-1)/K payloads each way), blockwise codecs' (int8, int4, sign, blocktopk)
reduce-scattered and re-encoded (as much), the others all-gathered (K-1 payloads; comm/exchange.py).

    python benchmarks/bench_codec_quality.py [--steps 300] [--workers 4] [--out runs/codec_quality] [--only int8,topk]

Every row is a full training run through the same harness `locoswarm-train` uses; the run dirs are kept
under --out so the numbers can be re-read with `locoswarm.analysis.load_runs`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from locoswarm.compression import make_codec
from locoswarm.config import Config, config_hash
from locoswarm.trainer import train

CODECS = [
    ("none", {}),
    ("fp16", {}),
    ("bf16", {}),
    ("int8", {}),
    ("int4", {}),
    ("sign", {"error_feedback": True}),
    ("topk", {"ratio": 0.1}),
    ("topk", {"ratio": 0.1, "error_feedback": True}),
    ("blocktopk", {"ratio": 0.1, "block_size": 1024}),
    ("blocktopk", {"ratio": 0.1, "block_size": 1024, "error_feedback": True}),
    ("randomk", {"ratio": 0.1, "error_feedback": True}),
    ("powersgd", {"rank": 4, "error_feedback": True}),
]


def config(args, name: str, extra: dict) -> Config:
    cfg = Config()
    cfg.data.name = args.data
    cfg.workers = args.workers
    cfg.train.max_steps = args.steps
    cfg.train.batch_size = args.batch
    cfg.train.eval_interval = args.steps
    cfg.train.progress = False
    cfg.algorithm.inner_steps = args.inner_steps
    cfg.algorithm.warmup_sync_steps = args.warmup
    cfg.inner_optimizer.lr = 3e-3
    cfg.compression.name = name
    for k, v in extra.items():
        setattr(cfg.compression, k, v)
    cfg.name = name + "".join(f"-{k}={v}" for k, v in extra.items())
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--inner-steps", type=int, default=25)
    # No synchronous warm-up by default: every byte in the table is a compressed pseudo-gradient.
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--out", default="runs/codec_quality")
    ap.add_argument("--only", default="", help="comma-separated codec names to run (default: all; none always runs)")
    args = ap.parse_args()
    only = {"none", *args.only.split(",")} if args.only else None

    rows = []
    for name, extra in CODECS:
        if only is not None and name not in only:
            continue
        cfg = config(args, name, extra)
        run_dir = Path(args.out) / cfg.name.replace("=", "").replace(".", "p")
        done = run_dir / "summary.json"
        # an interrupted benchmark resumes: finished runs of the same config are read back, not re-run
        s = json.loads(done.read_text()) if done.exists() else {}
        if s.get("status") != "ok" or s.get("config_hash") != config_hash(cfg):
            s = train(cfg, run_dir)
        codec = make_codec(cfg.compression)
        exchange = "all-reduce" if codec.summable else "reduce-scatter" if codec.reducible else "all-gather"
        rows.append((cfg.name, s["final_val_loss"], s["bytes_sent_total"], s["compression_ratio"], exchange))
        print(f"{cfg.name:<36} val {s['final_val_loss']:.4f}  sent {s['bytes_sent_total'] / 1e6:8.2f} MB", flush=True)
    base_loss, base_bytes = rows[0][1], rows[0][2]
    print(f"\nDiLoCo, tiny GPT, {args.workers} workers, H={args.inner_steps}, {args.steps} steps "
          f"({args.warmup} synchronous warm-up steps), data={args.data}\n")  # fmt: skip
    print("| codec | final val loss | Δ vs none | payload ratio | exchange | MB sent / worker | bytes vs none |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, loss, sent, ratio, exchange in rows:
        print(f"| {name} | {loss:.4f} | {loss - base_loss:+.4f} | {ratio:.4f} | {exchange} | {sent / 1e6:.2f} | "
              f"{sent / base_bytes:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
