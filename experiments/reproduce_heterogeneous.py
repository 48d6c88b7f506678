"""Synchronous DiLoCo, async_diloco and noloco on the same heterogeneous swarm: simulated time to reach synchronous
DiLoCo's final loss, final loss, bytes, staleness and replica spread.

    python experiments/reproduce_heterogeneous.py --out runs/heterogeneous            # 36 runs, ~3 min on 2 cores
    python experiments/reproduce_heterogeneous.py --out runs/heterogeneous --report-only

The swarm is ``experiment=heterogeneous`` (conf/experiment/heterogeneous.yaml): 4 workers whose speeds spread 4x
(1.0, 0.6, 0.25, 0.4), network=heterogeneous's mixed links, 5% churn per phase, a modelled 20 ms step at speed 1.
The model, data and schedule are reproduce_diloco.py's ci scale (2-layer d=64 GPT on Shakespeare, H=18 after a
60-step synchronous warm-start). Variants:

- diloco:          synchronous DiLoCo: every phase waits for the slowest worker (the reference and the target);
- async:           async_diloco, plain Nesterov on every arrival, fixed H (Liu et al. 2024's naive baseline);
- async-dn:        with delayed Nesterov, momentum_delay = K (the momentum sees one round's worth of updates);
- async-dylu:      with dynamic local updates (H per worker proportional to its speed);
- async-dn-dylu:   with both (Liu et al.'s method);
- noloco:          NoLoCo, random pairs, consensus 1 (its phases still wait for the slowest worker).

Equal work, not equal steps: an asynchronous run's step budget counts the furthest (fastest) worker's steps, so it
gets max_steps scaled by K / sum(speed / fastest speed) after the warm-start (the slow workers then train about as
many tokens in all as in the synchronous run); ``tokens`` in the table says what each variant trained. The loss,
bytes, staleness and spread columns are those equal-work runs. The target of a seed is synchronous DiLoCo's final
validation loss on that seed; time to target is the simulated time of the first evaluation at or below it
(evaluations every 6 steps of the furthest worker), taken from a second run of every variant with twice the work
(``<variant>-long``, DiLoCo's included: its schedule of faults is the same, its cosine learning rate decays over
more steps, so every variant's time comes from the same stretched schedule).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import study_cli  # noqa: E402
from reproduce_diloco import SCALES, RunSpec  # noqa: E402

SPEEDS = [1.0, 0.6, 0.25, 0.4]  # conf/experiment/heterogeneous.yaml's network.compute_speed
CHURN, STEP_SECONDS = 0.05, 0.02  # and its network.churn.drop_prob and network.step_seconds
VARIANTS: dict[str, list[str]] = {
    "diloco": ["algorithm=diloco"],
    "async": ["algorithm=async_diloco"],
    "async-dn": ["algorithm=async_diloco", "algorithm.momentum_delay=4"],
    "async-dylu": ["algorithm=async_diloco", "algorithm.dynamic_steps=true"],
    "async-dn-dylu": ["algorithm=async_diloco", "algorithm.momentum_delay=4", "algorithm.dynamic_steps=true"],
    "noloco": ["algorithm=noloco"],
}


def schedule(max_steps: int | None = None) -> tuple[int, int, int]:
    """(steps, warm-start steps, H) of the ci scale, optionally shrunk to ``max_steps``."""
    scale = SCALES["ci"]
    steps = max_steps or scale.max_steps
    f = steps / scale.max_steps
    return steps, max(1, round(scale.warmup_sync * f)), max(1, round(scale.H * f))


LONG = 2.0  # the work of the "-long" runs, in synchronous DiLoCo runs: room to reach its loss, however late


def plan(seeds: int, max_steps: int | None = None) -> list[RunSpec]:
    """Every variant at equal work (``<variant>-s<seed>``) and at LONG times the work (``<variant>-long-s<seed>``:
    the time to reach diloco's equal-work loss, diloco's own included, all on the same stretched schedule)."""
    scale = SCALES["ci"]
    steps, warm, H = schedule(max_steps)
    f = steps / scale.max_steps
    base = [
        *scale.model, *scale.data, *[o for o in scale.train if not o.startswith("train.log_interval=")],
        "train.log_interval=6", "experiment=heterogeneous", "outer_optimizer=nesterov", "compression=none",
        f"workers={len(SPEEDS)}", f"train.eval_interval={max(1, round(6 * f))}",
    ]  # fmt: skip

    def budget(variant: str, work: float) -> int:
        """The step budget for ``work`` synchronous runs' worth of local steps after the warm-start: an async run's
        budget counts its fastest worker, who trains K / sum(speed / fastest) times the mean worker's steps."""
        speedup = len(SPEEDS) / sum(s / max(SPEEDS) for s in SPEEDS) if variant.startswith("async") else 1.0
        return warm + math.ceil((steps - warm) * work * speedup)

    runs = []
    for variant, overrides in VARIANTS.items():
        algo = [*overrides, f"algorithm.inner_steps={H}", f"algorithm.warmup_sync_steps={warm}"]
        for suffix, work in [("", 1.0), ("-long", LONG)]:
            for seed in range(seeds):
                runs.append(RunSpec(f"{variant}{suffix}-s{seed}", variant + suffix, ["heterogeneous"], seed,
                                    [*base, *algo, f"train.max_steps={budget(variant, work)}", f"seed={seed}",
                                     f"name={variant}{suffix}"]))  # fmt: skip
    return runs


def _ok(run_dir: Path) -> bool:
    path = run_dir / "summary.json"
    return path.exists() and json.loads(path.read_text()).get("status") == "ok"


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _mean_sd(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def table(out: Path, seeds: int) -> tuple[str, dict]:
    """The study's table (markdown) and its numbers, from the run dirs."""
    runs = out / "runs"
    target = {}
    for s in range(seeds):
        summary = runs / f"diloco-s{s}" / "summary.json"
        if summary.exists() and json.loads(summary.read_text()).get("status") == "ok":
            target[s] = json.loads(summary.read_text())["final_val_loss"]
    reference: dict[int, float] = {}  # diloco's own time to its final loss, per seed
    numbers: dict[str, dict] = {}
    for variant in VARIANTS:
        times, finals, delta, mb, tokens, stale, spread, span, speedup = [], [], [], [], [], [], [], [], []
        reached = 0
        for s in range(seeds):
            d = runs / f"{variant}-s{s}"
            if not (d / "summary.json").exists():
                continue
            summary = json.loads((d / "summary.json").read_text())
            if summary.get("status") != "ok":  # a diverged or failed run: counted in n_failed, not averaged
                continue
            rows = _rows(d)
            finals.append(summary["final_val_loss"])
            if s in target:
                delta.append(summary["final_val_loss"] - target[s])
            span.append(summary["sim_seconds"])
            mb.append(summary["bytes_sent_total"] / 1e6)
            tokens.append(summary["tokens"])
            arrivals = [a["staleness"] for r in rows for a in r.get("arrivals", [])]
            if arrivals:
                stale.append(statistics.mean(arrivals))
            spreads = [r["replica_spread"] for r in rows if "replica_spread" in r]
            if spreads:
                spread.append(spreads[-1])
            long = runs / f"{variant}-long-s{s}"  # more work, same schedule of faults: when does it get there?
            timed = _rows(long) if _ok(long) else rows
            hit = next((r["sim_seconds"] for r in timed if "val_loss" in r and s in target
                        and r["val_loss"] <= target[s] + 1e-12), None)  # fmt: skip
            if hit is not None:
                reached += 1
                times.append(hit)
                if variant == "diloco":
                    reference[s] = hit
                elif s in reference:
                    speedup.append(reference[s] / hit)
        numbers[variant] = {"seeds": len(finals), "reached": reached, "time_to_target": times, "final": finals,
                            "delta": delta, "mb_per_worker": mb, "tokens": tokens, "sim_seconds": span,
                            "speedup": speedup, "staleness": stale, "replica_spread": spread}  # fmt: skip
    return to_markdown(numbers), numbers


def _paired(xs: list[float]) -> str:
    """Mean ± standard error of paired differences."""
    if len(xs) < 2:
        return f"{xs[0]:+.4f}" if xs else "-"
    return f"{statistics.mean(xs):+.4f} ± {statistics.stdev(xs) / len(xs) ** 0.5:.4f}"


def to_markdown(numbers: dict[str, dict]) -> str:
    lines = ["| variant | reached DiLoCo's loss | time to it (sim s) | vs diloco | final val loss (equal work) "
             "| Δ vs diloco (paired) | run (sim s) | MB sent / worker | tokens (M) | mean staleness | replica spread |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for variant, n in numbers.items():
        if not n["seeds"]:
            continue
        t = n["time_to_target"]
        stale = f"{statistics.mean(n['staleness']):.2f}" if n["staleness"] else "-"
        speed = f"{statistics.mean(n['speedup']):.2f}x" if n["speedup"] else "-"
        spread = f"{statistics.mean(n['replica_spread']):.4f}" if n["replica_spread"] else "-"
        delta = _paired(n["delta"]) if variant != "diloco" else "-"
        lines.append(f"| {variant} | {n['reached']}/{n['seeds']} | {_mean_sd(t) if t else 'never'} | {speed} | "
                     f"{_mean_sd(n['final'])} | {delta} | {statistics.mean(n['sim_seconds']):.2f} | "
                     f"{statistics.mean(n['mb_per_worker']):.2f} | {statistics.mean(n['tokens']) / 1e6:.3f} | "
                     f"{stale} | {spread} |")  # fmt: skip
    return "\n".join(lines)


def warm_start_seconds(out: Path, seed: int | None = None) -> float:
    """Simulated seconds of the shared synchronous warm-start: the diloco runs' first row at or past it (the mean
    over seeds, or ``seed``'s)."""
    plan = json.loads((out / "plan.json").read_text())
    ends = []
    for d in sorted((out / "runs").glob("diloco-s*" if seed is None else f"diloco-s{seed}")):
        rows = [r for r in _rows(d) if r["step"] >= plan["warmup_sync"] and "sim_seconds" in r]
        if rows:
            ends.append(rows[0]["sim_seconds"])
    return statistics.mean(ends) if ends else float("nan")


def paper_numbers(out: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The paper's macros (``heterogeneous.*``) and table (``heterogeneous``) from a --out folder."""
    plan = json.loads((out / "plan.json").read_text())
    text, numbers = table(out, plan["seeds"])
    summaries = [json.loads(p.read_text()) for p in (out / "runs").glob("*/summary.json")]
    warm = warm_start_seconds(out)
    nums = {
        "heterogeneous.seeds": str(plan["seeds"]), "heterogeneous.seed_list": ", ".join(map(str, range(plan["seeds"]))),
        "heterogeneous.speeds": ", ".join(f"{x:g}" for x in plan["speeds"]),
        "heterogeneous.spread": f"{max(plan['speeds']) / min(plan['speeds']):g}",
        "heterogeneous.churn_pct": f"{plan['churn'] * 100:g}%", "heterogeneous.step_ms": f"{plan['step_seconds'] * 1e3:g}",
        "heterogeneous.warmup_sync": str(plan["warmup_sync"]), "heterogeneous.H": str(plan["H"]),
        "heterogeneous.max_steps": str(plan["max_steps"]), "heterogeneous.long": f"{plan['long']:g}",
        "heterogeneous.n_runs": str(len(summaries)),
        "heterogeneous.n_failed": str(sum(s.get("status") != "ok" for s in summaries)),
        "heterogeneous.git_sha": str(summaries[0].get("git_sha", "?"))[:12] if summaries else "?",
        "heterogeneous.warm_s": f"{warm:.1f}",
    }  # fmt: skip
    for variant, n in numbers.items():
        k = f"heterogeneous.{variant.replace('-', '_')}"
        t = n["time_to_target"]
        nums[f"{k}.reached"] = f"{n['reached']}/{n['seeds']}"
        nums[f"{k}.time"] = f"{statistics.mean(t):.1f}" if t else "never"
        nums[f"{k}.local"] = f"{statistics.mean(t) - warm:.1f}" if t else "never"
        nums[f"{k}.speedup"] = f"{statistics.mean(n['speedup']):.2f}" if n["speedup"] else "-"
        nums[f"{k}.loss"] = f"{statistics.mean(n['final']):.4f}"
        nums[f"{k}.delta"] = _paired(n["delta"])
        nums[f"{k}.mb"] = f"{statistics.mean(n['mb_per_worker']):.1f}"
        nums[f"{k}.staleness"] = f"{statistics.mean(n['staleness']):.2f}" if n["staleness"] else "-"
        nums[f"{k}.spread"] = f"{statistics.mean(n['replica_spread']):.3f}" if n["replica_spread"] else "-"
    d = nums["heterogeneous.diloco.local"]
    b = nums["heterogeneous.async_dn_dylu.local"]
    nums["heterogeneous.local_speedup"] = f"{float(d) / float(b):.1f}" if "never" not in (d, b) else "-"
    return nums, {"heterogeneous": text}


def figure(out: Path, path: Path, seed: int = 0) -> Path:
    """Validation loss against simulated time, one line per variant (its longer run where it has one, seed
    ``seed``), with synchronous DiLoCo's final loss (the target) and the end of the shared warm-start marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from locoswarm import plots

    plots.style()
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for variant in VARIANTS:
        d = out / "runs" / f"{variant}-long-s{seed}"
        d = d if _ok(d) else out / "runs" / f"{variant}-s{seed}"
        if not _ok(d):
            continue
        rows = [r for r in _rows(d) if "val_loss" in r and "sim_seconds" in r]
        if rows:
            ax.plot([r["sim_seconds"] for r in rows], [r["val_loss"] for r in rows], marker="o", ms=2, lw=1.2,
                    label=variant)  # fmt: skip
    if _ok(out / "runs" / f"diloco-s{seed}"):
        ax.axhline(json.loads((out / "runs" / f"diloco-s{seed}" / "summary.json").read_text())["final_val_loss"],
                   color="k", ls=":", lw=1, label="target: diloco's final loss (equal work)")  # fmt: skip
    ax.axvline(warm_start_seconds(out, seed), color="grey", ls="--", lw=1, label="end of the synchronous warm-start")
    ax.set(xlabel="simulated seconds", ylabel=plots.LOSS_LABEL,
           title=f"Heterogeneous swarm (seed {seed}): validation loss vs simulated time")  # fmt: skip
    finals = [
        json.loads((d / "summary.json").read_text())["final_val_loss"] for d in (out / "runs").iterdir() if _ok(d)
    ]
    if finals:
        ax.set_ylim(min(finals) - 0.05, min(finals) + 1.0)
    ax.legend(frameon=False, fontsize=7)
    return plots.save(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = study_cli.parse(__doc__.split("\n\n")[0], argv)
    steps, warm, H = schedule(args.max_steps)
    plan_doc = {"speeds": SPEEDS, "churn": CHURN, "step_seconds": STEP_SECONDS, "long": LONG, "warmup_sync": warm,
                "H": H, "max_steps": steps}  # fmt: skip
    return study_cli.run_study(args, "heterogeneous", f"heterogeneous swarm (speeds {SPEEDS}, churn 5%)",
                               plan(args.seeds, args.max_steps), plan_doc, table, figure)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
