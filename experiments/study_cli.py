"""The command line every small study script shares (reproduce_heterogeneous.py, reproduce_swarm.py): its flags,
the plan it writes, the runs it trains (resumably, ``jobs`` at a time) and the table, numbers and figure it leaves
in ``<out>/report/``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from reproduce_diloco import SEP, RunSpec, run_all


def parse(description: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (runs/, plan.json, report/)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    p.add_argument("--max-steps", type=int, default=None, help="shrink the runs to this many steps (tests)")
    p.add_argument("--data", default=None, help="replace the data overrides, e.g. synthetic (offline tests)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained side by side (default 2)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table")
    p.add_argument("--no-progress", action="store_true", help="no per-run progress bar")
    return p.parse_args(argv)


def run_study(
    args: argparse.Namespace,
    name: str,
    title: str,
    runs: list[RunSpec],
    plan: dict,
    table: Callable[[Path, int], tuple[str, dict]],
    figure: Callable[[Path, Path], Path],
) -> int:
    """Write ``plan`` (with the runs) to plan.json, train what is not finished, then report/<name>.md,
    numbers.json and <name>.png. A --report-only re-report keeps the plan the runs were made with."""
    if args.data is not None:
        for r in runs:
            r.overrides = [o for o in r.overrides if not o.startswith("data=")] + [f"data={args.data}"]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (args.report_only and (out / "plan.json").exists()):
        doc = {**plan, "seeds": args.seeds, "runs": [r.__dict__ for r in runs]}
        (out / "plan.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{SEP}\n{title}: {len(runs)} runs -> {out / 'runs'}\n{SEP}")
    if not args.report_only:
        results = run_all(runs, out, not args.no_progress, args.jobs, 1)
        failed = [k for k, s in results.items() if s.get("status") != "ok"]
        if failed:
            print(f"{len(failed)} runs failed: {', '.join(failed)} (see their summary.json); re-run to retry them")
    text, numbers = table(out, args.seeds)
    report = out / "report"
    report.mkdir(exist_ok=True)
    (report / f"{name}.md").write_text(text + "\n")
    (report / "numbers.json").write_text(json.dumps(numbers, indent=2) + "\n")
    figure(out, report / f"{name}.png")
    print(f"{SEP}\n{text}\n{SEP}\ntable, numbers and figure: {report}")
    return 0
