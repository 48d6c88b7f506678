"""Byzantine workers against robust aggregation: final loss under each attack x aggregator, K=8, n=1 and 2.

    python experiments/reproduce_attacks.py --scale ci --out runs/attacks_ci        # 130 runs, ~15 CPU-minutes
    python experiments/reproduce_attacks.py --scale small --out runs/attacks_small  # hours on CPU
    make -C paper ATTACKS_RUNS=$PWD/runs/attacks_ci                               # the report's section

A swarm that strangers can join must survive some of them sending garbage. This study trains the reference DiLoCo
run (reproduce_diloco.py's scale, with K=8 workers) while the last n ranks attack every averaging round from the
first one on (the synchronous warm-start's gradient all-reduces included), and measures the final validation loss
for each aggregator (``comm/aggregate.py``) against each attack (``comm/adversary.py``):

- aggregators: ``mean`` (token-weighted; over the uncompressed, summable exchange an all-reduce, in which nobody
  sees a single contribution), ``trimmed_mean`` with ``aggregator.trim=0.25`` (floor(0.25 x 8) = 2 values dropped
  at each end of every coordinate, so it can trim n=2 attackers; the default 0.1 trims none of 8), ``median``,
  ``centered_clip`` (automatic radius, 3 iterations); screening at its default (non-finite rows only);
- attacks: none (the clean run of each aggregator), ``nan``, ``scale`` (x -100), ``signflip``, ``random`` (noise
  of the honest norm) and ``alie`` ("A Little Is Enough"), each with n=1 and n=2 of the 8 workers.

Seeds: every attacked cell runs seed 0; each aggregator's clean run runs seeds 0, 1, 2. A cell whose seed-0 loss
is within ``small`` (10%, the report's threshold for "broken") of its clean seed-0 loss then gets seeds 1 and 2 as
well (the ``confirm`` stage; plan.json lists which and why): its verdict (held or hurt) rests on differences of a
few percent at most, which one seed cannot tell from noise. Only the cells an attack breaks by far more are left
at one seed. One more comparison, on ``aggregator=mean``: a lazy worker (``faults.lazy=1``, it runs half of its H steps
and claims all of them) without verification and with ``verify.fraction=0.25`` (verify.py: a quarter of the
(worker, phase) pairs are replayed; a failed replay excludes the worker from then on), seeds 0-2.

The scales, the composition of each run's config (as ``locoswarm-train`` would compose it), the resumable
skip-if-done loop and the pool are ``reproduce_diloco.py``'s; this script changes K, the steps (the ci scale is
shrunk to 120 inner steps so that its 130 runs fit in ~15 CPU-minutes), the log and eval intervals (rows at the
outer steps are what the report needs) and adds the attack overrides. Output: ``OUT/plan.json``,
``OUT/runs/<variant>-s<seed>/`` (the run-dir contract), ``OUT/report/`` (``attacks_report.py``: tables, numbers.json,
heatmap; ``paper/build.py`` uses the same functions).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from reproduce_diloco import SCALES, SEP, RunSpec, Scale, run_all, shrink  # noqa: E402

# display order; each aggregator's overrides (trim 0.25: floor(0.25 x 8) = 2 values trimmed at each end)
AGGREGATORS: dict[str, list[str]] = {
    "mean": ["aggregator=mean"],
    "trimmed_mean": ["aggregator=trimmed_mean", "aggregator.trim=0.25"],
    "median": ["aggregator=median"],
    "centered_clip": ["aggregator=centered_clip"],
}
ATTACKS = ["nan", "scale", "signflip", "random", "alie"]


@dataclass
class Attacks:
    """What this study sets on top of a reproduce_diloco scale."""

    max_steps: int | None  # shrink the scale to this many inner steps (None: keep its steps)
    workers: int = 8
    byzantine: list[int] = field(default_factory=lambda: [1, 2])
    attacks: list[str] = field(default_factory=lambda: list(ATTACKS))
    aggregators: dict[str, list[str]] = field(default_factory=lambda: dict(AGGREGATORS))
    seeds: int = 1  # seeds of every attacked cell
    confirm_seeds: int = 2  # more seeds: every clean run, and the cells within `small` of their clean run
    small: float = 0.10  # relative |loss change vs clean| (seed 0) below which a cell gets the confirm seeds
    evals: int = 4  # validation passes per run (the last at the final step): only the final loss is reported
    lazy_fraction: float = 0.5  # the lazy worker runs ceil(0.5 H) of its H steps and claims H
    verify_fraction: float = 0.25
    note: str = ""


STUDY: dict[str, Attacks] = {
    # The ci model (2 blocks, d=64, ~0.1M params) at K=8. One run of the full 240-step ci scale takes ~14 s on one
    # core here (K=8 doubles the ci's K=4 compute), and the grid needs 130 runs: shrunk to 120 steps (30
    # warm-start steps, H=9, 10 outer rounds, as reproduce_diloco.py --max-steps 120 would), ~7 s a run.
    "ci": Attacks(max_steps=120,
                  note="2-layer d=64 GPT (~0.1M params), Shakespeare bytes, 8 workers x 120 steps x 8 x 32 tokens"),
    "small": Attacks(max_steps=None, note="tiny preset (~0.8M params), Shakespeare bytes, 8 workers x 1000 steps"),
}  # fmt: skip


def study_scale(name: str, max_steps: int | None = None) -> tuple[Scale, Attacks]:
    """The reproduce_diloco scale at this study's K and steps (``max_steps`` overrides them: tests), with a log row
    at the end of the warm-start and at every outer step, and ``evals`` validation passes."""
    at = dataclasses.replace(STUDY[name])
    scale = SCALES[name]
    steps = max_steps or at.max_steps
    if steps is not None and steps != scale.max_steps:
        scale = shrink(scale, steps)
    scale = dataclasses.replace(scale, workers=at.workers, train=[o for o in scale.train if not o.startswith("train.log_interval=")]
                                + [f"train.log_interval={max(1, scale.warmup_sync)}"],
                                eval_interval=max(1, math.ceil(scale.max_steps / at.evals)))  # fmt: skip
    return scale, at


def base_overrides(scale: Scale) -> list[str]:
    return [
        *scale.model, *scale.data, *scale.train, *scale.extra, "algorithm=diloco", "outer_optimizer=nesterov",
        "compression=none", f"workers={scale.workers}", f"algorithm.inner_steps={scale.H}",
        f"algorithm.warmup_sync_steps={scale.warmup_sync}", f"train.max_steps={scale.max_steps}",
        f"train.eval_interval={scale.eval_interval}",
    ]  # fmt: skip


def cell(aggregator: str, attack: str = "none", n: int = 0) -> str:
    """The variant name of one cell: '<aggregator>-clean' or '<aggregator>-<attack>-n<n>'."""
    return f"{aggregator}-clean" if attack == "none" else f"{aggregator}-{attack}-n{n}"


def _faults(attack: str, n: int) -> list[str]:
    # quoted: Hydra's override grammar reads a bare `nan` as the float NaN, which the AttackName enum refuses
    return [] if attack == "none" else [f"faults.byzantine={n}", f"faults.attack='{attack}'"]


def _spec(base: list[str], variant: str, study: str, seed: int, overrides: list[str]) -> RunSpec:
    return RunSpec(f"{variant}-s{seed}", variant, [study], seed, [*base, *overrides, f"seed={seed}", f"name={variant}"])


def grid(scale: Scale, at: Attacks) -> list[RunSpec]:
    """Stage 1: every aggregator's clean run (seeds 0 .. seeds+confirm_seeds-1), every attack x n x aggregator
    (seeds 0 .. seeds-1), and the lazy-worker pair on mean (all seeds)."""
    base, every = base_overrides(scale), at.seeds + at.confirm_seeds
    runs = []
    for agg, agg_over in at.aggregators.items():
        runs += [_spec(base, cell(agg), "attacks", s, agg_over) for s in range(every)]
        for attack in at.attacks:
            for n in at.byzantine:
                runs += [_spec(base, cell(agg, attack, n), "attacks", s, [*agg_over, *_faults(attack, n)])
                         for s in range(at.seeds)]  # fmt: skip
    lazy = [*at.aggregators["mean"], "faults.lazy=1", f"faults.lazy_fraction={at.lazy_fraction:g}"]
    for s in range(every):
        runs.append(_spec(base, "mean-lazy", "verify", s, lazy))
        runs.append(_spec(base, "mean-lazy-verify", "verify", s, [*lazy, f"verify.fraction={at.verify_fraction:g}"]))
    return runs


def final_losses(out: Path, runs: list[RunSpec]) -> dict[str, float]:
    """run id -> final val loss of the finished (status ok) runs among ``runs``."""
    losses = {}
    for r in runs:
        path = out / "runs" / r.run_id / "summary.json"
        if path.exists():
            s = json.loads(path.read_text())
            if s.get("status") == "ok" and math.isfinite(s.get("final_val_loss", math.nan)):
                losses[r.run_id] = float(s["final_val_loss"])
    return losses


def confirm(scale: Scale, at: Attacks, first: list[RunSpec], losses: dict[str, float]) -> tuple[list[RunSpec], dict]:
    """Stage 2: seeds seeds .. seeds+confirm_seeds-1 for every attacked cell whose seed-0 loss is within ``small``
    of its aggregator's clean seed-0 loss. Returns the runs and, per cell, the seed-0 change that decided."""
    base, runs, why = base_overrides(scale), [], {}
    by_variant = {r.variant: r for r in first if r.seed == 0 and "verify" not in r.studies}
    for agg, agg_over in at.aggregators.items():
        clean = losses.get(f"{cell(agg)}-s0")
        for attack in at.attacks:
            for n in at.byzantine:
                v = cell(agg, attack, n)
                loss = losses.get(f"{v}-s0")
                if v not in by_variant or clean is None or loss is None:
                    continue
                rel = (loss - clean) / clean
                if abs(rel) < at.small:
                    why[v] = f"{rel:+.2%} vs clean on seed 0"
                    runs += [_spec(base, v, "attacks", s, [*agg_over, *_faults(attack, n)])
                             for s in range(at.seeds, at.seeds + at.confirm_seeds)]  # fmt: skip
    return runs, why


def diverged(out: Path, runs: list[RunSpec], progress: bool, jobs: int) -> set[str]:
    """Run ids whose summary says they diverged under this exact config: for an attack study that is a result, not
    a transient failure, so it is kept instead of being retrained (reproduce_diloco.run_all retrains any run not
    ok). Composed as run_all composes them (the same config hash)."""
    from reproduce_diloco import compose

    from locoswarm.config import config_hash

    out_ids = set()
    for r in runs:
        path = out / "runs" / r.run_id / "summary.json"
        s = json.loads(path.read_text()) if path.exists() else {}
        if s.get("status") == "failed" and "diverged" in str(s.get("error")):
            cfg = compose([*r.overrides, f"train.progress={progress and jobs == 1}"])
            if s.get("config_hash") == config_hash(cfg):
                out_ids.add(r.run_id)
    return out_ids


def train_all(runs: list[RunSpec], out: Path, progress: bool, jobs: int, threads: int | None) -> None:
    """reproduce_diloco.run_all on every run that has neither finished nor diverged for its config."""
    settled = diverged(out, runs, progress, jobs)
    for r in runs:
        if r.run_id in settled:
            print(f"{r.run_id:<30} skipped: diverged earlier under this config (a result of the attack)", flush=True)
    run_all([r for r in runs if r.run_id not in settled], out, progress, jobs, threads)


def write_plan(out: Path, name: str, scale: Scale, at: Attacks, runs: list[RunSpec], confirmed: dict) -> None:
    doc = {
        "study": "attacks x aggregators (issue 'A swarm that strangers can join', item 2)",
        "scale": name,
        "scale_config": asdict(scale),
        "attacks": asdict(at),
        "description": at.note,
        "reference_outer_rounds": math.ceil((scale.max_steps - scale.warmup_sync) / scale.H),
        "confirm_rule": f"cells within {at.small:.0%} of their clean run on seed 0 get seeds "
                        f"{at.seeds}..{at.seeds + at.confirm_seeds - 1} too",
        "confirmed": confirmed,
        "notes": [],
        "runs": [asdict(r) for r in runs],
    }  # fmt: skip
    (out / "plan.json").write_text(json.dumps(doc, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scale", choices=sorted(STUDY), required=True)
    p.add_argument("--out", type=Path, required=True, help="output folder (runs/, plan.json, report/)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="shrink every run to this many inner steps (tests); H, warm-start scale with it")  # fmt: skip
    p.add_argument(
        "--confirm-seeds", type=int, default=None, help="extra seeds of the clean runs and of the cells near them"
    )
    p.add_argument("--attacks", default=None, help="comma-separated subset of the attacks (tests)")
    p.add_argument("--data", default=None, help="replace the scale's data overrides, e.g. synthetic (offline)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the tables and figure")
    p.add_argument("--no-progress", action="store_true", help="no per-run progress bar")
    p.add_argument("--jobs", type=int, default=1, help="runs trained side by side in worker processes (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 at scale ci, whose tiny model gains nothing more)")  # fmt: skip
    args = p.parse_args(argv)
    threads = args.threads or (1 if args.scale == "ci" else None)

    scale, at = study_scale(args.scale, args.max_steps)
    if args.confirm_seeds is not None:
        at.confirm_seeds = args.confirm_seeds
    if args.attacks:
        at.attacks = [a for a in args.attacks.split(",") if a]
        unknown = set(at.attacks) - set(ATTACKS)
        if unknown:
            p.error(f"--attacks: unknown {sorted(unknown)} (allowed: {', '.join(ATTACKS)})")
    if args.data is not None:
        scale.data = [f"data={args.data}"]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    first = grid(scale, at)
    write_plan(out, args.scale, scale, at, first, {})
    print(f"{SEP}\nAttacks x aggregators, scale={args.scale}: {at.note}\nK={scale.workers}, H={scale.H}, "
          f"{scale.warmup_sync} warm-start steps, {scale.max_steps} steps; aggregators {', '.join(at.aggregators)}; "
          f"attacks {', '.join(at.attacks)} with n in {at.byzantine}\nstage 1: {len(first)} runs -> {out / 'runs'}"
          f"\n{SEP}")  # fmt: skip
    if not args.report_only:
        train_all(first, out, not args.no_progress, args.jobs, threads)
    second, confirmed = confirm(scale, at, first, final_losses(out, first))
    write_plan(out, args.scale, scale, at, first + second, confirmed)
    print(
        f"{SEP}\nstage 2: {len(second)} more runs for the {len(confirmed)} cells within {at.small:.0%} of clean\n{SEP}"
    )
    if not args.report_only and second:
        train_all(second, out, not args.no_progress, args.jobs, threads)
    gone = diverged(out, first + second, False, 1)
    failed = [r.run_id for r in first + second if r.run_id not in final_losses(out, [r]) and r.run_id not in gone]
    if gone:
        print(f"{len(gone)} runs diverged (status failed; reported as such): {', '.join(sorted(gone))}")
    if failed:
        print(f"{len(failed)} runs did not finish: {', '.join(failed)} (see their summary.json); re-run to retry")

    from attacks_report import write_report

    report = write_report(out, out / "report")
    print(f"{SEP}\n{(report / 'attacks.md').read_text()}\n{(report / 'verify.md').read_text()}\n{SEP}\n"
          f"tables, numbers and figure: {report}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
