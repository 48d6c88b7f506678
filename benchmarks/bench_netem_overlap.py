"""Overlapped communication on a real network: wall time of a 4-peer hivemind run with overlap / without, on
locoswarm-netem's 10 Mbit/s testbed, beside the sim's prediction of both (conf/experiment/netem_overlap.yaml).

    sudo .venv/bin/python benchmarks/bench_netem_overlap.py                       # diloco, streaming, outer_delay
    sudo .venv/bin/python benchmarks/bench_netem_overlap.py --variants diloco,streaming --out runs/bench-overlap

Root only (network namespaces). Each variant is one ``locoswarm-netem --peers 4 --validate experiment=netem_overlap
<variant overrides>`` run, one after another (they share the box's CPUs, so never side by side); the testbed, its
namespaces and processes are torn down by locoswarm-netem itself on every exit path.

Wall time is the training loop as the peers lived it: from the step-1 sync row (a barrier every algorithm has,
``algorithm.warmup_sync_steps=1``) to the last sync row, over the same steps and tokens for every variant (see
``locoswarm.cli.netem.loop_span``). Two predictions per variant, both from the sim's Timeline on network=testbed:
  own t:      compute priced at the step time this run's peers measured (what --validate judges: does the model
              combine compute and exchanges as the real schedule does?)
  baseline t: compute priced at the step time the *baseline* (no overlap) run measured, the same for every
              variant: a prediction of the overlapped run made before running it, and of the ratio.
Bytes: on-wire bytes per peer (eth0 counters, Ethernet frames) against the sim's payload x (1 + wire_overhead).

The load average is sampled every 5 s during each testbed run (the 4 peers themselves add ~4 on 2 cores); the
load before a run is what else was running on the box.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from locoswarm.cli.netem import run_measured

VARIANTS: dict[str, list[str]] = {
    "diloco": [],  # the baseline: blocking DiLoCo, H=44
    "streaming": ["algorithm=streaming_diloco", "algorithm.fragments=2", "algorithm.overlap_steps=22"],
    "outer_delay": ["algorithm.outer_delay=1"],
}
BASELINE = "diloco"
PEERS = 4


def run_variant(name: str, out: Path, timeout: float) -> dict:
    argv = ["--peers", str(PEERS), "--out", str(out), "--validate", "--timeout", str(timeout),
            "experiment=netem_overlap", *VARIANTS[name]]  # fmt: skip
    before = os.getloadavg()[0]
    p, seconds, load = run_measured(argv)
    print(f"# {name}: locoswarm-netem exit {p.returncode} after {seconds:.0f}s", flush=True)
    print("\n".join("#   " + line for line in p.stdout.strip().splitlines()), flush=True)
    if not (out / "netem.json").exists() or "predicted" not in json.loads((out / "netem.json").read_text()):
        sys.exit(f"{name}: no measurement or prediction; see {out}/peer-*/peer.log\n{p.stderr[-3000:]}")
    result = json.loads((out / "netem.json").read_text())
    result["load_before"] = before
    result["load_during"] = load
    result["netem_returncode"] = p.returncode
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_netem_overlap"))
    ap.add_argument("--timeout", type=float, default=400.0, help="seconds each swarm may run")
    ap.add_argument("--no-baseline-t", action="store_true", help="skip the predictions at the baseline's step time")
    args = ap.parse_args()
    names = [n for n in args.variants.split(",") if n]
    if unknown := set(names) - set(VARIANTS):
        ap.error(f"unknown variants {sorted(unknown)}: choose from {', '.join(VARIANTS)}")
    if BASELINE not in names:
        ap.error(f"--variants must include the baseline {BASELINE}")
    if os.geteuid() != 0:
        sys.exit("bench_netem_overlap needs root (locoswarm-netem builds network namespaces); run it with sudo")
    from locoswarm.cli import netem

    names = [BASELINE] + [n for n in names if n != BASELINE]
    print(f"# load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    results = {n: run_variant(n, args.out / n, args.timeout) for n in names}
    base_t = results[BASELINE]["step_seconds"]
    for n, r in results.items():
        r["predicted_baseline_t"] = r["predicted"] if n == BASELINE else None
        if n != BASELINE and not args.no_baseline_t:
            rounds = len(r["peers"][0]["round_seconds"])
            r["predicted_baseline_t"] = netem.predict_on_sim(
                r["overrides"], args.out / n / "sim-baseline-t", rounds, [base_t] * PEERS
            )

    print("\n# 4 hivemind peers, 10 Mbit/s tbf links (network=testbed), experiment=netem_overlap; wall = training "
          "loop, step-1 sync row to the last (s)")  # fmt: skip
    head = (f"{'variant':<12}{'steps':>6}{'t/step':>8}{'measured':>10}{'pred(own t)':>13}{'err':>8}"
            f"{'pred(base t)':>14}{'err':>8}{'wire MB/peer':>14}{'pred MB':>9}{'B/round err':>12}{'load':>13}")  # fmt: skip
    print(head)
    for n, r in results.items():
        pr, pb, c = r["predicted"], r["predicted_baseline_t"], r["comparison"]
        m = r["loop_seconds"]
        b = pb["loop_seconds"] if pb else float("nan")
        print(f"{n:<12}{r['peers'][0]['sync_row_steps'][-1]:>6}{r['step_seconds'] * 1e3:>6.0f}ms{m:>9.1f}s"
              f"{pr['loop_seconds']:>12.1f}s{pr['loop_seconds'] / m - 1:>+8.1%}{b:>13.1f}s{b / m - 1:>+8.1%}"
              f"{r['tx_bytes_per_peer'] / 1e6:>14.2f}{pr['wire_bytes_per_peer'] / 1e6:>9.2f}"
              f"{c['bytes_error']:>+12.1%}{r['load_before']:>6.2f}/{r['load_during']:<6.2f}")  # fmt: skip
    print("# load: 1-min load average before the run / mean during it (the 4 peers add ~4)")
    m0 = results[BASELINE]["loop_seconds"]
    p0 = results[BASELINE]["predicted"]["loop_seconds"]
    print(f"\n# wall time with overlap / without (baseline {BASELINE})")
    print(f"{'variant':<12}{'measured':>10}{'pred(own t)':>13}{'pred(base t)':>14}")
    for n, r in results.items():
        if n == BASELINE:
            continue
        pb = r["predicted_baseline_t"]
        ratio_b = pb["loop_seconds"] / p0 if pb else float("nan")
        print(f"{n:<12}{r['loop_seconds'] / m0:>10.3f}{r['predicted']['loop_seconds'] / p0:>13.3f}{ratio_b:>14.3f}")
    summary = {n: {k: r.get(k) for k in ("loop_seconds", "step_seconds", "tx_bytes_per_peer", "load_before",
                                          "load_during", "comparison", "netem_returncode")}
               | {"predicted_loop_seconds": r["predicted"]["loop_seconds"],
                  "predicted_loop_seconds_baseline_t": (r["predicted_baseline_t"] or {}).get("loop_seconds"),
                  "predicted_wire_bytes_per_peer": r["predicted"]["wire_bytes_per_peer"]}
               for n, r in results.items()}  # fmt: skip
    (args.out / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"# written: {args.out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
