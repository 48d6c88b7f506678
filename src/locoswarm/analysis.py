"""Analysis on top of run directories: ``load_runs(root)`` is one DataFrame row per run.

Columns are the flattened config (``algorithm.inner_steps``, ``compression.name``, …) plus every
``summary.json`` key, plus ``run_dir`` and ``overrides`` (the run's command-line overrides, a list). ``load_metrics(run_dir)`` gives that run's ``metrics.jsonl``.
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
        overrides_path = run_dir / ".hydra" / "overrides.yaml"
        row["overrides"] = (yaml.safe_load(overrides_path.read_text()) or []) if overrides_path.exists() else []
        row.update(json.loads(summary_path.read_text()))
        rows.append(row)
    return pd.DataFrame(rows)


def load_metrics(run_dir: str | Path) -> pd.DataFrame:
    path = Path(run_dir) / "metrics.jsonl"
    with open(path) as f:
        return pd.DataFrame([json.loads(line) for line in f if line.strip()])


def run_labels(df: pd.DataFrame) -> list[str]:
    """Each run's name, or, where names repeat (a multirun grid), the overrides that differ between runs."""
    names = [str(n) for n in df["name"]] if "name" in df.columns else ["?"] * len(df)
    if "overrides" not in df.columns or len(set(names)) == len(names):
        return names
    parsed = [dict(str(o).split("=", 1) for o in (ov if isinstance(ov, list) else []) if "=" in str(o))
              for ov in df["overrides"]]  # fmt: skip
    keys = sorted({k for p in parsed for k in p})
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    if not varying:
        return names
    return [" ".join(f"{k}={p[k]}" for k in varying if k in p) or n for p, n in zip(parsed, names, strict=True)]


def comparison_table(df: pd.DataFrame) -> str:
    """A plain-text table: final val loss, tokens, bytes each worker sent, wall time, status."""
    cols = ["name", "final_val_loss", "tokens", "outer_steps", "bytes_sent_total", "wall_seconds", "sim_seconds",
            "status"]  # fmt: skip
    labels = run_labels(df)
    width = max([24, *(len(label) for label in labels)])
    header = (
        f"{'run':<{width}} {'val loss':>9} {'tokens':>10} {'syncs':>6} {'MB sent/worker':>15} {'wall s':>8} "
        f"{'status':>7}"
    )
    lines = [header, "-" * len(header)]
    rows = df[[c for c in cols if c in df.columns]].fillna({c: 0 for c in cols[2:-1]})
    for label, (_, r) in zip(labels, rows.iterrows(), strict=True):
        val = r.get("final_val_loss")  # a job that failed before training has only status and error
        lines.append(
            f"{label:<{width}} {'-' if pd.isna(val) else f'{val:9.4f}':>9} {r.get('tokens', 0):>10.3g} "
            f"{int(r.get('outer_steps', 0)):>6} {r.get('bytes_sent_total', 0) / 1e6:>15.2f} "
            f"{r.get('wall_seconds', 0):>8.1f} {str(r.get('status', '?')):>7}"
        )
    return "\n".join(lines)


# What the reader of a DDP-vs-DiLoCo table needs to know that the table cannot say (the DiLoCo paper's abstract
# and its H sweep, Douillard et al. 2023, arXiv:2311.08105).
AT_SCALE = (
    "At scale, the DiLoCo paper (Douillard et al. 2023) reports 8 workers with H=500 doing as well as fully "
    "synchronous training while communicating 500x less, after a synchronous warm-start of 24k of 88k steps (about "
    "128 outer steps follow it). With a few dozen outer steps, as in a few-minute run, DiLoCo trails DDP: by how much "
    "depends on H and the outer learning rate, and a longer warm-start narrows the gap at the price of its exchanges "
    "being most of the bytes (conf/experiment/demo.yaml has the measured sweep)."
)


def tradeoff_summary(df: pd.DataFrame) -> str:
    """The comparison in sentences: each finished run against the finished ``ddp`` run that saw the same tokens,
    bytes each worker sent and the final loss gap (both measured), then what the paper finds at scale. Empty
    unless there is exactly one such ddp run and at least one other run to set against it."""
    need = {"algorithm", "status", "final_val_loss", "bytes_sent_total", "tokens"}
    if not need <= set(df.columns):
        return ""
    ok = df[df["status"] == "ok"]
    ddp = ok[ok["algorithm"] == "ddp"]
    if len(ddp) != 1:
        return ""
    base = ddp.iloc[0]
    labels = dict(zip(df.index, run_labels(df), strict=True))
    lines = []
    for i, r in ok[ok["algorithm"] != "ddp"].iterrows():
        if r["tokens"] != base["tokens"] or not r["bytes_sent_total"]:
            continue
        gap = r["final_val_loss"] - base["final_val_loss"]
        where = "behind" if gap > 0 else "ahead of"
        warm = int(r.get("rounds", 0) or 0) - int(r["outer_steps"])  # exchanges of a synchronous warm-start
        warm_said = f" ({warm} of its {warm + int(r['outer_steps'])} exchanges were the synchronous warm-start)"
        lines.append(
            f"{labels[i]} sent {base['bytes_sent_total'] / r['bytes_sent_total']:.3g}x fewer bytes per worker than "
            f"ddp ({r['bytes_sent_total'] / 1e6:.2f} vs {base['bytes_sent_total'] / 1e6:.1f} MB) for the same "
            f"{r['tokens'] / 1e6:.2f}M tokens, and ended {abs(gap):.3f} nats ({abs(gap) / base['final_val_loss']:.1%}) "
            f"{where} it ({r['final_val_loss']:.3f} vs {base['final_val_loss']:.3f}) after {int(r['outer_steps'])} "
            "outer steps" + (warm_said if warm > 0 else "") + "."
        )
    return "\n".join([*lines, AT_SCALE]) if lines else ""


def main(argv: list[str] | None = None) -> None:
    """``python -m locoswarm.analysis ROOT``: print the comparison table for every run under ROOT."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m locoswarm.analysis RUNS_ROOT")
    df = load_runs(args[0])
    print(comparison_table(df))
    if summary := tradeoff_summary(df):
        print("\n" + summary)


if __name__ == "__main__":
    main()
