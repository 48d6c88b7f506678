"""Analysis on top of run directories: ``load_runs(root)`` is one DataFrame row per run.

Columns are the flattened config (``algorithm.inner_steps``, ``compression.name``, …) plus every
``summary.json`` key, plus ``run_dir``. ``load_metrics(run_dir)`` gives that run's ``metrics.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_runs(root: str | Path) -> pd.DataFrame:
    """Every run dir under ``root`` (any depth) that has a summary.json: config columns + summary columns."""
    rows = []
    for summary_path in sorted(Path(root).rglob("summary.json")):
        run_dir = summary_path.parent
        row: dict = {"run_dir": str(run_dir)}
        cfg_path = run_dir / ".hydra" / "config.yaml"
        if cfg_path.exists():
            row.update(_flatten(yaml.safe_load(cfg_path.read_text()) or {}))
        row.update(json.loads(summary_path.read_text()))
        rows.append(row)
    return pd.DataFrame(rows)


def load_metrics(run_dir: str | Path) -> pd.DataFrame:
    path = Path(run_dir) / "metrics.jsonl"
    with open(path) as f:
        return pd.DataFrame([json.loads(line) for line in f if line.strip()])


def comparison_table(df: pd.DataFrame) -> str:
    """A plain-text table: final val loss, tokens, bytes each worker sent, wall time, status."""
    cols = ["name", "final_val_loss", "tokens", "outer_steps", "bytes_sent_total", "wall_seconds", "sim_seconds",
            "status"]  # fmt: skip
    header = (
        f"{'run':<24} {'val loss':>9} {'tokens':>10} {'syncs':>6} {'MB sent/worker':>15} {'wall s':>8} {'status':>7}"
    )
    lines = [header, "-" * len(header)]
    for _, r in df[[c for c in cols if c in df.columns]].fillna({c: 0 for c in cols[2:-1]}).iterrows():
        val = r.get("final_val_loss")  # a job that failed before training has only status and error
        lines.append(
            f"{str(r.get('name', '?')):<24} {'-' if pd.isna(val) else f'{val:9.4f}':>9} {r.get('tokens', 0):>10.3g} "
            f"{int(r.get('outer_steps', 0)):>6} {r.get('bytes_sent_total', 0) / 1e6:>15.2f} "
            f"{r.get('wall_seconds', 0):>8.1f} {str(r.get('status', '?')):>7}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m locoswarm.analysis ROOT``: print the comparison table for every run under ROOT."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m locoswarm.analysis RUNS_ROOT")
    print(comparison_table(load_runs(args[0])))


if __name__ == "__main__":
    main()
