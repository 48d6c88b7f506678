"""Streaming DiLoCo against DiLoCo at equal tokens on a 100 Mbit/s WAN: loss, peak bytes, total bytes, utilisation.

    python experiments/reproduce_streaming.py --scale ci --out runs/streaming_ci      # 25 runs, ~6 CPU-minutes, one core
    python experiments/reproduce_streaming.py --scale small --out runs/streaming_small  # about an hour on CPU
    python experiments/reproduce_streaming.py --scale paper --out runs/streaming_paper  # GPUs, data=hf (C4)
    make -C paper STREAMING_RUNS=$PWD/runs/streaming_ci                                # the report's section

Streaming DiLoCo: Douillard et al. 2025, "Streaming DiLoCo with overlapping communication: Towards a Distributed
Free Lunch" (arXiv:2501.18512). The model's blocks are split into P fragments (strided: block b in fragment b mod
P, as in the paper); fragment p is averaged every H inner steps at offset p·H/P, so one P-th of the model crosses
the network at a time and the peak bytes per exchange drop by about P; with overlap the workers train τ more
steps while a fragment is in flight and then mix: local := α·local + (1 − α)·global. Variants, each the same
runs as the reference DiLoCo run (same scale, K, H, warm-start, steps, seeds, network) except for the algorithm:

- diloco:                       the reference (reproduce_diloco.py's, priced on the WAN below);
- streaming-P<P>:               P fragments, τ = 0, α = 0 (no overlap: each exchange blocks like DiLoCo's);
- streaming-P<P>-tau<τ>:        the paper's main setting: overlap τ = 1 inner step, mixing α = 0.5;
- streaming-P<P>-tau<τ>-int4:   the same with 4-bit pseudo-gradients (the paper's FP4 row; ours is int4, 4 bits
                                plus an fp32 scale per 64 entries).

Every run is priced on ``network=wan_100mbit`` (100 Mbit/s per worker, 50 ms one way, ring all-reduce) with a
fixed ``network.step_seconds`` per scale, so sim_seconds and compute_utilisation are the same on any machine
(``STEP_SECONDS`` says where each value comes from). Training numerics do not depend on the price.

The scales, the composition of each run's config (as ``locoswarm-train`` would compose it), the resumable
skip-if-done loop and the pool are ``reproduce_diloco.py``'s; this script only changes the model where the
scale's has fewer blocks than the largest P, the log interval (1: every strategy round gets its own metrics row,
so ``fragment_bytes_sent`` of every exchange is kept) and the seeds. Output: ``OUT/plan.json``,
``OUT/runs/<variant>-s<seed>/`` (the run-dir contract), ``OUT/report/`` (``streaming_report.py``: table, claims,
numbers.json, figure; ``paper/build.py`` uses the same functions).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from reproduce_diloco import SCALES, SEP, RunSpec, Scale, codec_available, run_all, shrink  # noqa: E402

NETWORK = "wan_100mbit"
PAPER = (
    "Douillard et al. 2025, Streaming DiLoCo with overlapping communication: Towards a Distributed Free Lunch "
    "(arXiv:2501.18512)"
)

# GPT-2 124M: 35 ms per 16 x 1024-token step on an H100 (the anchor benchmarks/bench_utilisation.py scales).
H100_GPT2_STEP_SECONDS, GPT2_PARAMS, GPT2_TOKENS_PER_STEP = 0.035, 124e6, 16 * 1024


def _paper_step_seconds() -> float:
    """The 150m preset at the paper scale's 512 x 1024 tokens per step: the H100 anchor scaled by parameters and
    tokens (training FLOPs ~ 6 x params x tokens; attention's extra FLOPs ignored)."""
    from locoswarm.netsim import preset_params

    return H100_GPT2_STEP_SECONDS * preset_params("150m") / GPT2_PARAMS * 512 * 1024 / GPT2_TOKENS_PER_STEP


@dataclass
class Streaming:
    """What this study sets on top of a reproduce_diloco scale."""

    model: list[str]  # replaces the scale's model overrides (the ci model has 2 blocks; P=4 needs >= 4)
    step_seconds: float | None  # network.step_seconds (None: computed by _paper_step_seconds)
    step_note: str
    seeds: int
    fragments: list[int]  # P values without overlap; the largest also runs with overlap and with int4
    overlap_steps: int = 1  # τ: the paper's main experiments overlap 1 inner step
    mixing: float = 0.5  # α: the paper's
    pattern: str = "strided"
    note: str = ""


STREAMING: dict[str, Streaming] = {
    # The ci model with 4 blocks instead of 2 (0.22M params) so that P=4 gives one block per fragment; a run is
    # ~20 s on one core. Step time: one AdamW step of this model (8 x 32 tokens) on one core of the 2-core
    # development machine measured 16-24 ms (median of 100 steps, depending on the other load); fixed at 20 ms.
    "ci": Streaming(
        model=[
            "model=tiny",
            "model.name=custom",
            "model.n_layer=4",
            "model.n_head=2",
            "model.d_model=64",
            "model.seq_len=32",
        ],  # fmt: skip
        step_seconds=0.02,
        step_note="this model's AdamW step of 8 x 32 tokens, measured at 16-24 ms on one CPU core",
        seeds=5,
        fragments=[2, 4],
        note="4-layer d=64 GPT, Shakespeare bytes, 4 workers x 240 steps x 8 x 32 tokens",
    ),
    # The tiny preset has 4 blocks already. Its step (16 x 128 tokens) measured ~170 ms on one CPU core.
    "small": Streaming(
        model=["model=tiny"],
        step_seconds=0.17,
        step_note="the tiny preset's AdamW step of 16 x 128 tokens, measured at ~170 ms on one CPU core",
        seeds=3,
        fragments=[2, 4],
        note=SCALES["small"].note,
    ),
    # 150m has 12 blocks; P=4 is 3 blocks per fragment (the paper's fragments are 3 layers).
    "paper": Streaming(
        model=["model=150m"],
        step_seconds=None,
        step_note="the 150m preset on an H100: GPT-2 124M's 35 ms per 16 x 1024 tokens scaled by params and tokens",
        seeds=1,
        fragments=[2, 4],
        note=SCALES["paper"].note,
    ),
}


def study_scale(name: str, max_steps: int | None = None) -> tuple[Scale, Streaming]:
    """The reproduce_diloco scale with this study's model and a log row per strategy round (optionally shrunk)."""
    st = dataclasses.replace(STREAMING[name])
    if st.step_seconds is None:
        st.step_seconds = _paper_step_seconds()
    scale = dataclasses.replace(SCALES[name], model=list(st.model),
                                train=[o for o in SCALES[name].train if not o.startswith("train.log_interval=")]
                                + ["train.log_interval=1"])  # fmt: skip
    if max_steps is not None:
        scale = shrink(scale, max_steps)
    return scale, st


def variants(st: Streaming) -> dict[str, list[str]]:
    """variant -> the overrides that make it differ from the reference DiLoCo run (display order)."""

    def streaming(p: int, tau: int, alpha: float) -> list[str]:
        return ["algorithm=streaming_diloco", f"algorithm.fragments={p}", f"algorithm.fragment_pattern={st.pattern}",
                f"algorithm.overlap_steps={tau}", f"algorithm.mixing={alpha:g}"]  # fmt: skip

    out: dict[str, list[str]] = {"diloco": ["algorithm=diloco"]}
    for p in st.fragments:
        out[f"streaming-P{p}"] = streaming(p, 0, 0.0)
    p, tau = max(st.fragments), st.overlap_steps
    out[f"streaming-P{p}-tau{tau}"] = streaming(p, tau, st.mixing)
    out[f"streaming-P{p}-tau{tau}-int4"] = [*streaming(p, tau, st.mixing), "compression=int4"]
    return out


def plan(scale: Scale, st: Streaming, seeds: int) -> list[RunSpec]:
    """Every variant x seed, at equal tokens (same max_steps, K, H, warm-start) and on the same priced network."""
    base = [
        *scale.model, *scale.data, *scale.train, *scale.extra, "outer_optimizer=nesterov", f"workers={scale.workers}",
        f"train.max_steps={scale.max_steps}", f"train.eval_interval={scale.eval_interval}",
        f"network={NETWORK}", f"network.step_seconds={st.step_seconds:.6g}",
    ]  # fmt: skip
    algo = [f"algorithm.inner_steps={scale.H}", f"algorithm.warmup_sync_steps={scale.warmup_sync}"]
    runs = []
    for variant, overrides in variants(st).items():
        codec = [] if any(o.startswith("compression=") for o in overrides) else ["compression=none"]
        for seed in range(seeds):
            runs.append(RunSpec(f"{variant}-s{seed}", variant, ["streaming"], seed,
                                [*overrides, *base, *codec, *algo, f"seed={seed}", f"name={variant}"]))  # fmt: skip
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scale", choices=sorted(STREAMING), required=True)
    p.add_argument("--out", type=Path, required=True, help="output folder (runs/, plan.json, report/)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="shrink every run to this many inner steps (tests); H, warm-start scale with it")  # fmt: skip
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: the scale's)")
    p.add_argument("--data", default=None, help="replace the scale's data overrides, e.g. synthetic (offline)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table and figure")
    p.add_argument("--no-progress", action="store_true", help="no per-run progress bar")
    p.add_argument("--jobs", type=int, default=1, help="runs trained side by side in worker processes (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 at scale ci, whose tiny model gains nothing more)")  # fmt: skip
    args = p.parse_args(argv)
    threads = args.threads or (1 if args.scale == "ci" else None)

    scale, st = study_scale(args.scale, args.max_steps)
    if args.data is not None:
        scale.data = [f"data={args.data}"]
    seeds = args.seeds or st.seeds
    runs = plan(scale, st, seeds)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    notes, kept = [], []
    for r in runs:
        why = codec_available(r.overrides) if "compression=int4" in r.overrides else None
        if why is None:
            kept.append(r)
        elif not any(n.startswith(r.variant + ":") for n in notes):
            notes.append(f"{r.variant}: left out, its codec is not available ({why})")
    for n in notes:
        print("note:", n)
    rounds = math.ceil((scale.max_steps - scale.warmup_sync) / scale.H)
    plan_doc = {
        "paper": PAPER,
        "scale": args.scale,
        "scale_config": asdict(scale),
        "streaming": asdict(st),
        "network": NETWORK,
        "description": st.note,
        "reference_outer_rounds": rounds,
        "notes": notes,
        "runs": [asdict(r) for r in kept],
    }  # fmt: skip
    (out / "plan.json").write_text(json.dumps(plan_doc, indent=2) + "\n")
    print(f"{SEP}\nStreaming DiLoCo vs DiLoCo, scale={args.scale}, network={NETWORK}, "
          f"step {st.step_seconds * 1e3:.4g} ms\n{len(kept)} runs -> {out / 'runs'} (K={scale.workers}, H={scale.H}, "
          f"{scale.warmup_sync} warm-start steps, {rounds} DiLoCo rounds, P in {st.fragments}, τ={st.overlap_steps}, "
          f"α={st.mixing:g}, {seeds} seeds)\n{SEP}")  # fmt: skip

    if not args.report_only:
        results = run_all(kept, out, not args.no_progress, args.jobs, threads)
        failed = [k for k, s in results.items() if s.get("status") != "ok"]
        if failed:
            print(f"{len(failed)} runs failed: {', '.join(failed)} (see their summary.json); re-run to retry them")

    from streaming_report import write_report

    report = write_report(out, out / "report")
    print(f"{SEP}\n{(report / 'streaming.md').read_text()}\n{(report / 'claims.md').read_text()}\n{SEP}\n"
          f"table, claims and figure: {report}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
