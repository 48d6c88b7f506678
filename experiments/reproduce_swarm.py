"""SWARM vs DiLoCo-SWARM: a model cut into 2 pipeline stages of 4 peers each, over 100 Mbit/s, 50 ms WAN links, at
equal tokens; what stochastic routing buys when one peer is slow; and what moving peers buys when a stage is slow.

    python experiments/reproduce_swarm.py --out runs/swarm            # 30 runs, ~4 min on 2 cores
    python experiments/reproduce_swarm.py --out runs/swarm --report-only

The pipeline is ``experiment=swarm`` (conf/experiment/swarm.yaml): pipeline.stages=2, workers=4 (peers per stage,
8 in all), network=wan_100mbit, each worker's batch in 2 micro-batches, a modelled 50 ms step per worker at speed 1
split between the stages by parameter share. Model, data and schedule are reproduce_diloco.py's ci scale (2-layer
d=64 GPT on Shakespeare, 240 steps; DiLoCo's H=18 after a 60-step synchronous warm-start). Variants:

- swarm:                    algorithm=ddp: each stage all-reduces its gradients every step (SWARM);
- diloco-swarm:             algorithm=diloco: each stage averages its pseudo-gradients every H steps (DiLoCo-SWARM);
- <either>-slow-fixed:      peer 3 of stage 0 computes 4x slower; fixed routing (its worker's micro-batches wait);
- <either>-slow-stochastic: the same, with stochastic routing (work in proportion to measured throughput);
- <either>-slowstage:       all 4 peers of stage 1 compute 4x slower; stochastic routing, peers stay put;
- <either>-slowstage-moves: the same, with pipeline.rebalance_every=20: a stage-0 peer moves to stage 1 at a round
                            boundary when that speeds up the slowest stage (it downloads the stage's state).

Every run trains the same tokens. Columns: final validation loss (paired difference to swarm), simulated time,
compute utilisation (mean busy time of the 8 peers over the simulated time), MB each peer sent to its stage's
averaging ("within stages") and to its neighbouring stages' peers ("between stages": activations forward, their
gradients back), the share of stage 0's micro-batches peer 3 served (the slow peer, in the -slow variants), and the
peers per stage at the end.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import study_cli  # noqa: E402
from reproduce_diloco import SCALES, RunSpec  # noqa: E402
from reproduce_heterogeneous import _mean_sd, _ok, _paired, _rows, schedule  # noqa: E402

STAGES, PEERS, SLOW = 2, 4, 0.25  # stages, peers per stage, a slow peer's speed
SLOW_SPEEDS = [1.0] * (PEERS - 1) + [SLOW] + [1.0] * PEERS  # network.compute_speed over the 8 peers: peer 3 of stage 0
SLOW_STAGE = [1.0] * PEERS + [SLOW] * PEERS  # every peer of stage 1
REBALANCE_EVERY = 20
ALGOS = {"swarm": ["algorithm=ddp"], "diloco-swarm": ["algorithm=diloco"]}
STOCHASTIC = "pipeline.routing=stochastic"
SCENARIOS: dict[str, tuple[list[str], list[float]]] = {  # suffix -> (overrides, network.compute_speed)
    "": ([], []),
    "-slow-fixed": (["pipeline.routing=fixed"], SLOW_SPEEDS),
    "-slow-stochastic": ([STOCHASTIC], SLOW_SPEEDS),
    "-slowstage": ([STOCHASTIC], SLOW_STAGE),
    "-slowstage-moves": ([STOCHASTIC, f"pipeline.rebalance_every={REBALANCE_EVERY}"], SLOW_STAGE),
}
VARIANTS = [a + s for a in ALGOS for s in SCENARIOS]


def plan(seeds: int, max_steps: int | None = None) -> list[RunSpec]:
    scale = SCALES["ci"]
    steps, warm, H = schedule(max_steps)
    f = steps / scale.max_steps
    base = [*scale.model, *scale.data, *scale.train, "experiment=swarm", "outer_optimizer=nesterov",
            f"train.max_steps={steps}", f"train.eval_interval={max(1, round(scale.eval_interval * f))}"]  # fmt: skip
    runs = []
    for algo, algo_overrides in ALGOS.items():
        sync = [f"algorithm.inner_steps={H}", f"algorithm.warmup_sync_steps={warm}"] if algo == "diloco-swarm" else []
        for suffix, (routing, compute_speed) in SCENARIOS.items():
            speeds = [f"network.compute_speed=[{','.join(f'{s:g}' for s in compute_speed)}]"] if compute_speed else []
            variant = algo + suffix
            for seed in range(seeds):
                runs.append(RunSpec(f"{variant}-s{seed}", variant, ["swarm"], seed,
                                    [*base, *algo_overrides, *sync, *routing, *speeds, f"seed={seed}",
                                     f"name={variant}"]))  # fmt: skip
    return runs


def table(out: Path, seeds: int) -> tuple[str, dict]:
    runs = out / "runs"
    reference = {}
    for s in range(seeds):
        if _ok(runs / f"swarm-s{s}"):
            reference[s] = json.loads((runs / f"swarm-s{s}" / "summary.json").read_text())["final_val_loss"]
    numbers: dict[str, dict] = {}
    for variant in VARIANTS:
        n = {k: [] for k in ("final", "delta", "sim_seconds", "utilisation", "within_mb", "between_mb", "slow_share",
                             "tokens", "stage_peers", "moves")}  # fmt: skip
        for s in range(seeds):
            d = runs / f"{variant}-s{s}"
            if not _ok(d):
                continue
            summary = json.loads((d / "summary.json").read_text())
            n["final"].append(summary["final_val_loss"])
            if s in reference:
                n["delta"].append(summary["final_val_loss"] - reference[s])
            n["sim_seconds"].append(summary["sim_seconds"])
            n["utilisation"].append(summary["compute_utilisation"])
            n["within_mb"].append(summary["bytes_sent_total"] / 1e6)
            n["between_mb"].append(summary["activation_bytes_total"] / 1e6)
            n["tokens"].append(summary["tokens"])
            load = summary["stage_load"][0]
            n["slow_share"].append(load[PEERS - 1] / sum(load))
            n["stage_peers"].append(summary["stage_peers"])
            n["moves"].append(summary["stage_moves"])
        numbers[variant] = {"seeds": len(n["final"]), **n}
    return to_markdown(numbers), numbers


def to_markdown(numbers: dict[str, dict]) -> str:
    lines = ["| variant | final val loss | Δ vs swarm (paired) | sim s | utilisation | MB within stages / peer "
             "| MB between stages / peer | peer 3's share of stage 0 | peers per stage (end) | tokens (M) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for variant, n in numbers.items():
        if not n["seeds"]:
            continue
        delta = _paired(n["delta"]) if variant != "swarm" else "-"
        lines.append(f"| {variant} | {_mean_sd(n['final'])} | {delta} | {statistics.mean(n['sim_seconds']):.1f} | "
                     f"{statistics.mean(n['utilisation']):.3f} | {statistics.mean(n['within_mb']):.2f} | "
                     f"{statistics.mean(n['between_mb']):.2f} | {statistics.mean(n['slow_share']):.3f} | "
                     f"{_pools(n['stage_peers'])} | {statistics.mean(n['tokens']) / 1e6:.3f} |")  # fmt: skip
    return "\n".join(lines)


def _pools(pools: list[list[int]]) -> str:
    """Peers per stage at the end, "4+4", or each seed's where they differ."""
    shown = sorted({"+".join(map(str, p)) for p in pools})
    return " / ".join(shown)


def paper_numbers(out: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The paper's macros (``swarm.*``) and table (``swarm``) from a --out folder."""
    doc = json.loads((out / "plan.json").read_text())
    text, numbers = table(out, doc["seeds"])
    summaries = [json.loads(p.read_text()) for p in (out / "runs").glob("*/summary.json")]
    nums = {
        "swarm.seeds": str(doc["seeds"]), "swarm.seed_list": ", ".join(map(str, range(doc["seeds"]))),
        "swarm.stages": str(doc["stages"]), "swarm.peers": str(doc["peers"]), "swarm.slow": f"{doc['slow']:g}",
        "swarm.H": str(doc["H"]), "swarm.warmup_sync": str(doc["warmup_sync"]), "swarm.max_steps": str(doc["max_steps"]),
        "swarm.n_runs": str(len(summaries)), "swarm.n_failed": str(sum(s.get("status") != "ok" for s in summaries)),
        "swarm.git_sha": str(summaries[0].get("git_sha", "?"))[:12] if summaries else "?",
        "swarm.slow_expected": f"{doc['slow'] / (doc['peers'] - 1 + doc['slow']):.3f}",
        "swarm.rebalance_every": str(doc.get("rebalance_every", REBALANCE_EVERY)),
    }  # fmt: skip
    for variant, n in numbers.items():
        if not n["seeds"]:
            continue
        k = f"swarm.{variant.replace('-', '_')}"
        nums[f"{k}.loss"] = f"{statistics.mean(n['final']):.4f}"
        nums[f"{k}.delta"] = _paired(n["delta"])
        nums[f"{k}.sim_s"] = f"{statistics.mean(n['sim_seconds']):.1f}"
        nums[f"{k}.util"] = f"{statistics.mean(n['utilisation']):.3f}"
        nums[f"{k}.within_mb"] = f"{statistics.mean(n['within_mb']):.2f}"
        nums[f"{k}.between_mb"] = f"{statistics.mean(n['between_mb']):.2f}"
        nums[f"{k}.slow_share"] = f"{statistics.mean(n['slow_share']):.3f}"
        nums[f"{k}.pools"] = _pools(n["stage_peers"])
    # simulated-time ratios: what stochastic routing and moving peers buy over their baseline
    speedups = {
        "routing_speedup": ("-slow-fixed", "-slow-stochastic"),
        "rebalance_speedup": ("-slowstage", "-slowstage-moves"),
    }
    for algo in ALGOS:
        for name, (before, after) in speedups.items():
            a, b = numbers[algo + before], numbers[algo + after]
            if a["seeds"] and b["seeds"]:
                ratio = statistics.mean(a["sim_seconds"]) / statistics.mean(b["sim_seconds"])
                nums[f"swarm.{algo.replace('-', '_')}.{name}"] = f"{ratio:.2f}"
    s, d = numbers["swarm"], numbers["diloco-swarm"]
    if s["seeds"] and d["seeds"]:
        nums["swarm.time_ratio"] = f"{statistics.mean(s['sim_seconds']) / statistics.mean(d['sim_seconds']):.1f}"
        nums["swarm.bytes_ratio"] = f"{statistics.mean(s['within_mb']) / statistics.mean(d['within_mb']):.1f}"
    return nums, {"swarm": text}


def figure(out: Path, path: Path, seed: int = 0) -> Path:
    """Validation loss against simulated time, one line per variant (seed ``seed``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from locoswarm import plots

    plots.style()
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for variant in VARIANTS:
        d = out / "runs" / f"{variant}-s{seed}"
        rows = [r for r in _rows(d) if "val_loss" in r and "sim_seconds" in r] if _ok(d) else []
        if rows:
            ax.plot([r["sim_seconds"] for r in rows], [r["val_loss"] for r in rows], marker="o", ms=2, lw=1.2,
                    ls="-" if variant.startswith("swarm") else "--", label=variant)  # fmt: skip
    ax.set(xscale="log", xlabel="simulated seconds (log)", ylabel=plots.LOSS_LABEL,
           title=f"2 stages x 4 peers over WAN (seed {seed}): validation loss vs simulated time")  # fmt: skip
    ax.legend(frameon=False, fontsize=7)
    return plots.save(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = study_cli.parse(__doc__.split("\n\n")[0], argv)
    steps, warm, H = schedule(args.max_steps)
    plan_doc = {"stages": STAGES, "peers": PEERS, "slow": SLOW, "rebalance_every": REBALANCE_EVERY,
                "warmup_sync": warm, "H": H, "max_steps": steps}  # fmt: skip
    return study_cli.run_study(args, "swarm", f"SWARM vs DiLoCo-SWARM ({STAGES} stages x {PEERS} peers, wan_100mbit)",
                               plan(args.seeds, args.max_steps), plan_doc, table, figure)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
