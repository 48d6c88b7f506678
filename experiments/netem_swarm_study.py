"""A pipeline's throughput against its peers per stage, measured on a real swarm: locoswarm-netem's 10 Mbit/s
testbed (root only: network namespaces), SWARM and DiLoCo-SWARM.

    sudo .venv/bin/python experiments/netem_swarm_study.py --out runs/netem-swarm      # 18 runs, ~20 min
    python experiments/netem_swarm_study.py --out runs/netem-swarm --report-only      # the table again

Every run is ``locoswarm-netem --peers 2K experiment=netem_swarm`` (conf/experiment/netem_swarm.yaml): 2 stages of K
peers, each peer in its own namespace behind a tbf-shaped 10 Mbit/s link each way, K drivers pushing 2 micro-batches
per step through stage 1 over hivemind's P2P (fixed routing), 30 steps. SWARM (``algorithm=ddp``) all-reduces each
stage's gradients among its K peers every step; DiLoCo-SWARM (``algorithm=diloco``, H=5) averages each stage's
pseudo-gradients every 5 steps, and with H=15 (60 steps, so that it too has 4 rounds) every 15. Runs go one after
another (they share the box's CPUs; never side by side); a run whose
netem.json says every peer finished ok is not run again.

Columns: tokens per second through every stage (the K drivers' first to second-to-last sync row, summed:
``locoswarm.cli.netem.pipeline_tokens_per_second``) and its ratio to K=1 of the same algorithm and seed; the mean
seconds between sync rows; per peer: MB sent to its stage's averaging (payload), MB a driver received from stage 1
(payload: its activations' gradients; the activations it sent are as large) and MB on the wire (eth0 counters,
everything included); the box's 1-minute load average during the run (all 2K peers share its 2 cores here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from locoswarm.cli.netem import run_measured

PEERS_PER_STAGE = (1, 2, 4)
ALGOS = {
    "swarm": ["algorithm=ddp"],
    "diloco-swarm": ["algorithm=diloco"],  # H=5 (the experiment's)
    "diloco-swarm-H15": ["algorithm=diloco", "algorithm.inner_steps=15", "train.max_steps=60"],  # 4 rounds
}
STAGES = 2
TIMEOUT = 600.0  # seconds one netem run may take


def run_name(algo: str, k: int, seed: int) -> str:
    return f"{algo}-K{k}-s{seed}"


def finished(run: Path) -> bool:
    path = run / "netem.json"
    if not path.exists():
        return False
    doc = json.loads(path.read_text())
    return not doc.get("error") and all(p["status"] == "ok" for p in doc["peers"])


def run_one(algo: str, k: int, seed: int, run: Path) -> None:
    p, seconds, load = run_measured(["--peers", str(STAGES * k), "--out", str(run), "--timeout", str(TIMEOUT),
                                     "experiment=netem_swarm", *ALGOS[algo], f"seed={seed}"])  # fmt: skip
    print(f"{run.name}: locoswarm-netem exit {p.returncode} after {seconds:.0f}s", flush=True)
    print("\n".join("  " + line for line in (p.stdout + p.stderr).strip().splitlines()[-4:]), flush=True)
    if (run / "netem.json").exists():
        doc = json.loads((run / "netem.json").read_text())
        doc["load_during"] = load
        (run / "netem.json").write_text(json.dumps(doc, indent=2) + "\n")


def measure(run: Path, k: int) -> dict | None:
    """One run's numbers (None if it did not finish ok)."""
    if not finished(run):
        return None
    doc = json.loads((run / "netem.json").read_text())
    summaries = [json.loads((run / f"peer-{i}" / "summary.json").read_text()) for i in range(STAGES * k)]
    return {
        "tokens_per_second": doc["tokens_per_second"],
        "round_seconds": doc["round_seconds"],
        "within_mb": statistics.mean(s["bytes_sent_total"] for s in summaries) / 1e6,
        "between_mb": statistics.mean(s["activation_bytes_total"] for s in summaries[:k]) / 1e6,
        "wire_mb": doc["tx_bytes_per_peer"] / 1e6,
        "load": doc.get("load_during"),
        "stage_failures": sum(s.get("stage_failures", 0) for s in summaries),
        "git_sha": summaries[0].get("git_sha", "?"),
    }


def table(out: Path, seeds: int) -> tuple[str, dict]:
    """The markdown table and the numbers (per algorithm and K: lists over seeds)."""
    numbers: dict = {}
    lines = ["| algorithm | peers per stage | tokens/s | vs K=1 | s between syncs | MB within stage | MB between "
             "stages | MB on the wire | load | seeds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for algo in ALGOS:
        for k in PEERS_PER_STAGE:
            ms = {s: measure(out / "runs" / run_name(algo, k, s), k) for s in range(seeds)}
            ok = {s: m for s, m in ms.items() if m is not None}
            base = {s: measure(out / "runs" / run_name(algo, 1, s), 1) for s in ok}
            ratios = [m["tokens_per_second"] / base[s]["tokens_per_second"] for s, m in ok.items()
                      if base[s] is not None and m["tokens_per_second"] and base[s]["tokens_per_second"]]  # fmt: skip
            n = {key: [m[key] for m in ok.values()] for key in ("tokens_per_second", "round_seconds", "within_mb",
                                                                 "between_mb", "wire_mb", "load", "stage_failures")}  # fmt: skip
            n["speedup"], n["seeds"] = ratios, sorted(ok)
            n["git_sha"] = sorted({m["git_sha"] for m in ok.values()})
            numbers[f"{algo}-K{k}"] = n

            def mean(key: str, fmt: str, n=n) -> str:
                xs = [x for x in n[key] if x is not None]
                return format(statistics.mean(xs), fmt) if xs else "-"

            lines.append(f"| {algo} | {k} | {mean('tokens_per_second', '.0f')} | {mean('speedup', '.2f')} | "
                         f"{mean('round_seconds', '.2f')} | {mean('within_mb', '.2f')} | {mean('between_mb', '.2f')} | "
                         f"{mean('wire_mb', '.1f')} | {mean('load', '.1f')} | {', '.join(map(str, sorted(ok))) or '-'} |")  # fmt: skip
    return "\n".join(lines), numbers


def figure(numbers: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for algo, style in zip(ALGOS, ("o-", "s--", "^-."), strict=True):
        ks = [k for k in PEERS_PER_STAGE if numbers[f"{algo}-K{k}"]["tokens_per_second"]]
        ys = [statistics.mean(numbers[f"{algo}-K{k}"]["tokens_per_second"]) for k in ks]
        ax.plot(ks, ys, style, label=algo)
        if ks and ks[0] == 1:
            ax.plot(ks, [ys[0] * k for k in ks], ":", color=ax.lines[-1].get_color(), alpha=0.6,
                    label=f"{algo}: K x its K=1")  # fmt: skip
    ax.set_xlabel("peers per stage (K)")
    ax.set_ylabel("tokens/s through every stage")
    ax.set_xticks(list(PEERS_PER_STAGE))
    ax.set_title("2 stages on 10 Mbit/s links (locoswarm-netem)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def paper_numbers(out: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The paper's macros (``netem_swarm.*``) and table (``netem_swarm``) from a --out folder."""
    doc = json.loads((out / "plan.json").read_text())
    text, numbers = table(out, doc["seeds"])
    shas = sorted({sha for n in numbers.values() for sha in n["git_sha"]})
    nums = {"netem_swarm.seed_list": ", ".join(map(str, range(doc["seeds"]))), "netem_swarm.stages": str(doc["stages"]),
            "netem_swarm.git_sha": ", ".join(sha[:12] + ("-dirty" if sha.endswith("-dirty") else "") for sha in shas)
            or "?",
            "netem_swarm.n_failed": str(sum(doc["seeds"] - len(n["seeds"]) for n in numbers.values()))}  # fmt: skip
    for cell, n in numbers.items():
        k = f"netem_swarm.{cell.replace('-', '_')}"
        for key, fmt in (("tokens_per_second", ".0f"), ("speedup", ".2f"), ("round_seconds", ".2f"),
                         ("within_mb", ".2f"), ("between_mb", ".2f"), ("load", ".1f")):  # fmt: skip
            xs = [x for x in n[key] if x is not None]
            nums[f"{k}.{key}"] = format(statistics.mean(xs), fmt) if xs else "-"
    for k in PEERS_PER_STAGE:  # what DiLoCo inside the stages buys at each K
        a, b = numbers[f"swarm-K{k}"]["tokens_per_second"], numbers[f"diloco-swarm-K{k}"]["tokens_per_second"]
        ratio = statistics.mean(b) / statistics.mean(a) if a and b else None
        nums[f"netem_swarm.diloco_over_swarm_K{k}"] = f"{ratio:.2f}" if ratio else "-"
    return nums, {"netem_swarm": text}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (runs/, plan.json, report/)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per cell (default 2)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table from what is there")
    args = p.parse_args(argv)
    out = args.out.resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        (out / "plan.json").write_text(json.dumps({"stages": STAGES, "peers_per_stage": list(PEERS_PER_STAGE),
                                                   "algorithms": ALGOS, "seeds": args.seeds}, indent=2) + "\n")  # fmt: skip
        cells = [(a, k, s) for s in range(args.seeds) for a in ALGOS for k in PEERS_PER_STAGE]
        for i, (algo, k, seed) in enumerate(cells):
            run = out / "runs" / run_name(algo, k, seed)
            if finished(run):
                continue
            print(f"[{i + 1}/{len(cells)}] {run.name}", flush=True)
            run_one(algo, k, seed, run)
    seeds = json.loads((out / "plan.json").read_text())["seeds"]
    text, numbers = table(out, seeds)
    report = out / "report"
    report.mkdir(exist_ok=True)
    (report / "netem_swarm.md").write_text(text + "\n")
    (report / "numbers.json").write_text(json.dumps(numbers, indent=2) + "\n")
    figure(numbers, report / "netem_swarm.png")
    print(f"{text}\n\ntable, numbers and figure: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
