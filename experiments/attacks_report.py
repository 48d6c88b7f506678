"""Tables, numbers and heatmap of an attacks x aggregators study, computed from its run directories only.

``write_report(out, report_dir)`` reads ``out/plan.json`` (written by ``reproduce_attacks.py``) and every
``out/runs/*/`` (summary.json, metrics.jsonl, .hydra/config.yaml) through ``diloco_report.load``, and writes
``attacks.md`` / ``.csv`` (the loss heatmap: one row per attack and n, one column per aggregator),
``rejections.md`` (what screening excluded), ``verify.md`` / ``.csv`` (the lazy worker with and without
verification), ``numbers.json`` (every number the paper's section quotes, keyed ``attacks.*``) and
``figures/attacks.png``. ``paper/build.py`` calls the same functions.

Definitions:
- change vs clean: (loss - clean loss) / clean loss, with the clean run of the same aggregator on the same seed;
  with several seeds the mean ± standard deviation of the per-seed changes.
- verdict: *held* (✓) when the change is at most 1% (``TOL_MATCH``) or, with several seeds, within 2 standard
  errors; *hurt* (▲) up to 10%; *broken* (✗) above 10% or when the run diverged (status failed).
- rejections: contributions screened out over the run (summary.json), for every kind of round (the warm-start's
  gradient all-reduces and the outer steps); which ranks, from the metrics rows' ``rejected`` lists.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from diloco_report import TOL_MATCH, Reproduction, load
from reproduce_attacks import cell

from locoswarm import plots
from locoswarm.analysis import load_metrics

TOL_BROKEN = 0.10  # above a 10% higher loss the attack has won
LABELS = {"mean": "mean", "trimmed_mean": "trimmed mean", "median": "median", "centered_clip": "centered clip"}
MARK = {"held": "✓", "hurt": "▲", "broken": "✗", "-": ""}


def grid_cells(plan: dict) -> list[tuple[str, str, int]]:
    """(aggregator, attack, n) of every cell in display order: the clean run first, then attack x n."""
    at = plan["attacks"]
    pairs = [("none", 0)] + [(a, n) for a in at["attacks"] for n in at["byzantine"]]
    return [(agg, a, n) for agg in at["aggregators"] for a, n in pairs]


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df["status"] == "ok") & np.isfinite(df["final_val_loss"].astype(float))]


def _rejected_ranks(run_dir: str) -> list[int]:
    m = load_metrics(run_dir)
    if "rejected" not in m:
        return []
    return sorted({int(x["rank"]) for lst in m["rejected"] if isinstance(lst, list) for x in lst})


def cells_table(rep: Reproduction) -> pd.DataFrame:
    """One row per (aggregator, attack, n): seeds, loss, paired change vs clean, verdict, status, rejections."""
    runs = rep.runs
    rows = []
    for agg, attack, n in grid_cells(rep.plan):
        v = cell(agg, attack, n)
        mine = runs[runs["variant"] == v]
        ok = _ok(mine)
        clean = _ok(runs[runs["variant"] == cell(agg)]).set_index("seed")["final_val_loss"]
        common = sorted(set(ok["seed"]) & set(clean.index))
        rel = (ok.set_index("seed").loc[common, "final_val_loss"] - clean.loc[common]) / clean.loc[common]
        failed = mine[mine["status"] == "failed"]
        errors = sorted({str(e) for e in failed.get("error", pd.Series(dtype=str)).dropna()})
        first = mine[mine["seed"] == mine["seed"].min()] if len(mine) else mine
        done = mine[mine["status"].isin(["ok", "failed"]) & mine["run_dir"].notna()]
        rows.append({
            "variant": v, "aggregator": agg, "attack": attack, "n": n,
            "seeds": len(ok), "planned": len(mine), "failed": len(failed),
            "seed_list": " ".join(str(s) for s in sorted(mine["seed"])),
            "error": "; ".join(errors),
            "val_loss_mean": float(ok["final_val_loss"].mean()) if len(ok) else np.nan,
            "val_loss_std": float(ok["final_val_loss"].std(ddof=1)) if len(ok) > 1 else np.nan,
            "seed0_loss": float(ok.loc[ok["seed"] == 0, "final_val_loss"].iloc[0]) if (ok["seed"] == 0).any() else np.nan,
            "delta_vs_clean": float(rel.mean()) if len(rel) and attack != "none" else np.nan,
            "delta_std": float(rel.std(ddof=1)) if len(rel) > 1 and attack != "none" else np.nan,
            "delta_seeds": len(rel),
            "rejections": float(done["rejections"].mean()) if len(done) else np.nan,
            "rounds": float(done["rounds"].mean()) if len(done) else np.nan,
            "rejected_ranks": " ".join(str(r) for r in _rejected_ranks(first["run_dir"].iloc[0]))
            if len(first) and isinstance(first["run_dir"].iloc[0], str) else "",
            "workers": int(rep.scale["workers"]),
            "mb_sent": float(ok["bytes_sent_total"].mean()) / 1e6 if len(ok) else np.nan,
            "wall_seconds": float(done["wall_seconds"].sum()) if len(done) else 0.0,
        })  # fmt: skip
    t = pd.DataFrame(rows)
    t["verdict"] = [verdict(r) for r in t.itertuples()]
    return t


def verdict(r) -> str:
    if r.attack == "none":
        return "-"
    if r.failed:
        return "broken"
    if pd.isna(r.delta_vs_clean):
        return "-"
    within = r.delta_vs_clean <= TOL_MATCH
    if r.delta_seeds > 1 and not pd.isna(r.delta_std):
        within = within or abs(r.delta_vs_clean) < 2 * r.delta_std / math.sqrt(r.delta_seeds)
    if within:
        return "held"
    return "hurt" if r.delta_vs_clean <= TOL_BROKEN else "broken"


def _loss(r) -> str:
    if r.failed and not r.seeds:
        return "diverged"
    s = f"{r.val_loss_mean:.4f}" if not pd.isna(r.val_loss_mean) else "-"
    if r.attack == "none":
        s += "" if pd.isna(r.val_loss_std) else f" ± {r.val_loss_std:.4f}"
        return s + ("" if pd.isna(r.seed0_loss) or r.seeds < 2 else f" (seed 0: {r.seed0_loss:.4f})")
    if pd.isna(r.delta_vs_clean):
        return s
    d = f"{r.delta_vs_clean:+.1%}" + (f" ± {r.delta_std:.1%}" if r.delta_seeds > 1 else ", seed 0")
    more = f", {r.failed} of {r.planned} diverged" if r.failed else ""
    return f"{s} ({d}{more})"


def _row_label(attack: str, n: int) -> tuple[str, str]:
    return ("none (clean)", "0") if attack == "none" else (attack, str(n))


def _header(t: pd.DataFrame, trim: float) -> list[str]:
    aggs = list(dict.fromkeys(t["aggregator"]))
    names = [LABELS.get(a, a) + (f" (trim {trim:g})" if a == "trimmed_mean" else "") for a in aggs]
    return ["| attack | n | " + " | ".join(names) + " |", "|" + " --- |" * (2 + len(aggs))]


def to_markdown(t: pd.DataFrame, trim: float) -> str:
    """The heatmap as a table: final val loss and its change vs the same aggregator's clean run, with a mark."""
    lines = _header(t, trim)
    for (attack, n), g in t.groupby(["attack", "n"], sort=False):
        by = {r.aggregator: r for r in g.itertuples()}
        a, nn = _row_label(attack, n)
        cells = []
        for agg in dict.fromkeys(t["aggregator"]):
            r = by[agg]
            mark = MARK[r.verdict]
            cells.append((f"{mark} " if mark else "") + _loss(r))
        lines.append(f"| {a} | {nn} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rej(r) -> str:
    if pd.isna(r.rejections):
        return "-"
    text = f"{r.rejections:.0f}"
    ranks = [int(x) for x in str(r.rejected_ranks).split()]
    if ranks:
        text += " (all ranks)" if len(ranks) == r.workers else f" (rank{'s' if len(ranks) > 1 else ''} " + \
            ", ".join(map(str, ranks)) + ")"  # fmt: skip
    if r.failed:
        text += f"; {r.failed} diverged"
    return text


def rejections_markdown(t: pd.DataFrame, trim: float) -> str:
    """Contributions excluded per run (and whose), and the runs that diverged."""
    lines = _header(t, trim)
    for (attack, n), g in t.groupby(["attack", "n"], sort=False):
        by = {r.aggregator: r for r in g.itertuples()}
        a, nn = _row_label(attack, n)
        lines.append(f"| {a} | {nn} | " + " | ".join(_rej(by[agg]) for agg in dict.fromkeys(t["aggregator"])) + " |")
    return "\n".join(lines)


def caught(run_dir: str) -> list[dict]:
    """Every failed verification in a run: rank, outer phase (the row's outer_step), inner step, round, evidence."""
    m = load_metrics(run_dir)
    if "verification_failed" not in m:
        return []
    out = []
    for row in m[m["verification_failed"].apply(lambda x: isinstance(x, dict))].itertuples():
        for rank, why in row.verification_failed.items():
            rnd = int(why.split("phase ", 1)[1].split(":", 1)[0]) if "phase " in why else -1
            out.append({"rank": int(rank), "outer_phase": int(row.outer_step), "step": int(row.step), "round": rnd,
                        "evidence": why})  # fmt: skip
    return out


def verify_table(rep: Reproduction) -> pd.DataFrame:
    """Per seed: the clean mean run, the lazy worker unchecked and checked; where it was caught; the checks."""
    runs = rep.runs
    rows = []
    for seed in sorted(runs.loc[runs["variant"].isin(["mean-lazy", "mean-lazy-verify"]), "seed"].unique()):

        def one(variant: str, seed=seed) -> pd.Series | None:
            r = _ok(runs[(runs["variant"] == variant) & (runs["seed"] == seed)])
            return None if r.empty else r.iloc[0]

        clean, lazy, checked = one(cell("mean")), one("mean-lazy"), one("mean-lazy-verify")
        found = caught(checked["run_dir"]) if checked is not None else []
        checks = 0
        if checked is not None:
            m = load_metrics(checked["run_dir"])
            checks = int(m["verified"].fillna(0).sum()) if "verified" in m else 0
        row = {
            "seed": int(seed),
            "clean": float(clean["final_val_loss"]) if clean is not None else np.nan,
            "lazy": float(lazy["final_val_loss"]) if lazy is not None else np.nan,
            "verified": float(checked["final_val_loss"]) if checked is not None else np.nan,
            "lazy_rank": int(rep.scale["workers"]) - 1,
            "caught_ranks": " ".join(str(c["rank"]) for c in found),
            "caught_phase": found[0]["outer_phase"] if found else np.nan,
            "caught_step": found[0]["step"] if found else np.nan,
            "caught_round": found[0]["round"] if found else np.nan,
            "evidence": found[0]["evidence"] if found else "",
            "checks": checks,
            "outer_phases": int(checked["outer_steps"]) if checked is not None else 0,
        }  # fmt: skip
        row["lazy_delta"] = (row["lazy"] - row["clean"]) / row["clean"]
        row["verified_delta"] = (row["verified"] - row["clean"]) / row["clean"]
        rows.append(row)
    return pd.DataFrame(rows)


def verify_markdown(v: pd.DataFrame, fraction: float, lazy_fraction: float) -> str:
    lines = ["| seed | clean (mean) | lazy worker, unchecked | lazy worker, verify.fraction="
             f"{fraction:g} | caught | checks |", "|" + " --- |" * 6]  # fmt: skip
    for r in v.itertuples():
        where = (
            "never"
            if pd.isna(r.caught_phase)
            else (
                f"rank {r.caught_ranks} in outer phase {r.caught_phase:.0f} of {r.outer_phases} (step {r.caught_step:.0f})"
            )
        )
        lines.append(f"| {r.seed} | {r.clean:.4f} | {r.lazy:.4f} ({r.lazy_delta:+.1%}) | {r.verified:.4f} "
                     f"({r.verified_delta:+.1%}) | {where} | {r.checks} |")  # fmt: skip
    return "\n".join(lines)


def _key(agg: str, attack: str, n: int) -> str:
    return f"{agg}.clean" if attack == "none" else f"{agg}.{attack}.n{n}"


def numbers(rep: Reproduction, t: pd.DataFrame, v: pd.DataFrame) -> dict[str, str]:
    """Every number the paper's attacks section quotes, keyed ``attacks.*``."""
    sc, at = rep.scale, rep.plan["attacks"]
    runs = rep.runs
    ok = _ok(runs)
    done = runs[runs["status"].isin(["ok", "failed"])]
    k = int(sc["workers"])
    sync_rounds = int(sc["warmup_sync"]) + int(rep.plan["reference_outer_rounds"])
    n: dict[str, str] = {
        "scale": rep.plan["scale"],
        "description": rep.plan["description"],
        "n_runs": str(len(runs)),
        "n_ok": str(len(ok)),
        "n_diverged": str(int((runs["status"] == "failed").sum())),
        "n_missing": str(int((runs["status"] == "missing").sum())),
        "cpu_minutes": f"{done['wall_seconds'].fillna(0).sum() / 60:.1f}",
        "workers": str(k),
        "H": str(sc["H"]),
        "max_steps": str(sc["max_steps"]),
        "warmup_sync": str(sc["warmup_sync"]),
        "outer_rounds": str(rep.plan["reference_outer_rounds"]),
        "rounds": str(sync_rounds),
        "byzantine": " and ".join(str(b) for b in at["byzantine"]),
        "attack_list": ", ".join(at["attacks"]),
        "trim": f"{trim_of(at):g}",
        "trimmed_values": str(math.floor(trim_of(at) * k)),
        "small": f"{at['small']:.0%}",
        "tol_match": f"{TOL_MATCH:.0%}",
        "tol_broken": f"{TOL_BROKEN:.0%}",
        "clean_seeds": ", ".join(str(s) for s in range(at["seeds"] + at["confirm_seeds"])),
        "cell_seeds": ", ".join(str(s) for s in range(at["seeds"])),
        "confirm_seeds": ", ".join(str(s) for s in range(at["seeds"], at["seeds"] + at["confirm_seeds"])),
        "n_confirmed": str(len(rep.plan.get("confirmed", {}))),
        "n_cells": str(int((t["attack"] != "none").sum())),
        "confirmed": ", ".join(rep.plan.get("confirmed", {})) or "none",
        "unconfirmed": "; ".join(
            f"{LABELS.get(r.aggregator, r.aggregator)} under {r.attack}, n={r.n}"
            + (" (diverged)" if pd.isna(r.delta_vs_clean) else f" ({r.delta_vs_clean:+.0%})")
            for r in t.itertuples()
            if r.attack != "none" and r.variant not in rep.plan.get("confirmed", {})
        )
        or "none",
        # the trimmed mean's arithmetic at K and at K - 1 rows (one row screened out)
        "workers_less_one": str(k - 1),
        "trimmed_values_less_one": str(math.floor(trim_of(at) * (k - 1))),
        "kept_values": str(k - 2 * math.floor(trim_of(at) * k)),
        "kept_values_less_one": str(k - 1 - 2 * math.floor(trim_of(at) * (k - 1))),
        "git_sha": str(ok["git_sha"].iloc[0])[:12] if len(ok) else "-",
    }
    for r in t.itertuples():
        key = _key(r.aggregator, r.attack, r.n)
        n[f"{key}.loss"] = "diverged" if r.failed and not r.seeds else f"{r.val_loss_mean:.4f}"
        n[f"{key}.loss_std"] = "-" if pd.isna(r.val_loss_std) else f"{r.val_loss_std:.4f}"
        n[f"{key}.delta"] = "-" if pd.isna(r.delta_vs_clean) else f"{r.delta_vs_clean:+.1%}"
        n[f"{key}.verdict"] = r.verdict
        n[f"{key}.seeds"] = str(r.seeds)
        n[f"{key}.rejections"] = "-" if pd.isna(r.rejections) else f"{r.rejections:.0f}"
        ranks = str(r.rejected_ranks).split()
        n[f"{key}.rejected_ranks"] = (
            (", ".join(ranks[:-1]) + " and " + ranks[-1]) if len(ranks) > 1 else (ranks[0] if ranks else "none")
        )
        n[f"{key}.status"] = "ok" if not r.failed else f"{r.failed} of {r.planned} diverged ({r.error})"
    for agg in dict.fromkeys(t["aggregator"]):
        g = t[(t["aggregator"] == agg) & (t["attack"] != "none")]
        for word in ("held", "hurt", "broken"):
            n[f"{agg}.{word}"] = str(int((g["verdict"] == word).sum()))
        n[f"{agg}.cells"] = str(len(g))
        clean = t[(t["aggregator"] == agg) & (t["attack"] == "none")].iloc[0]
        n[f"{agg}.clean.mb"] = f"{clean.mb_sent:.1f}"
        # the aggregator's own price without any attack: its clean runs against mean's, paired by seed
        base = _ok(runs[runs["variant"] == cell("mean")]).set_index("seed")["final_val_loss"]
        mine = _ok(runs[runs["variant"] == cell(agg)]).set_index("seed")["final_val_loss"]
        common = sorted(set(base.index) & set(mine.index))
        rel = (mine.loc[common] - base.loc[common]) / base.loc[common]
        n[f"{agg}.clean.vs_mean"] = f"{rel.mean():+.1%}" if len(rel) else "-"
        n[f"{agg}.clean.vs_mean_std"] = f"{rel.std(ddof=1):.1%}" if len(rel) > 1 else "-"
        worst = g[g["verdict"] != "-"].sort_values("delta_vs_clean", na_position="first").tail(1)
        if len(worst):
            w = worst.iloc[0]
            d = "diverged" if w.failed and not w.seeds else f"{w.delta_vs_clean:+.1%}"
            n[f"{agg}.worst"] = f"{w.attack} with n={w.n}, {d}"
    # the seed-to-seed spread of a paired change: its standard deviation over seeds, median over the confirmed cells
    spread = t.loc[t["delta_seeds"] > 1, "delta_std"].dropna()
    n["paired_noise"] = f"{spread.median():.1%}" if len(spread) else "-"
    n["paired_noise_max"] = f"{spread.max():.1%}" if len(spread) else "-"
    from locoswarm.comm.adversary import Adversary
    from locoswarm.config import FaultsConfig

    for b in at["byzantine"]:  # ALIE's z (Baruch et al.'s formula, as the adversary computes it) at this K and n
        n[f"alie_z.n{b}"] = f"{Adversary(FaultsConfig(byzantine=b, attack='alie'), workers=k).alie_z():.2f}"
    nan_mean = t[(t["aggregator"] == "mean") & (t["attack"] == "nan")]
    if len(nan_mean):
        whole = all(r.rejections == r.rounds * r.workers for r in nan_mean.itertuples() if not pd.isna(r.rejections))
        n["mean.nan.every_round_rejected"] = "yes" if whole else "no"
        n["mean.nan.rejections_expected"] = str(sync_rounds * k)
    init = math.log(256) if str(ok.get("data.tokenizer", pd.Series(["byte"])).iloc[0]) == "byte" else np.nan
    n["init_loss"] = f"{init:.4f}"
    if len(v):
        n["verify.fraction"] = f"{at['verify_fraction']:g}"
        n["verify.lazy_fraction"] = f"{at['lazy_fraction']:g}"
        n["verify.lazy_steps"] = str(math.ceil(at["lazy_fraction"] * int(sc["H"])))
        n["verify.lazy_rank"] = str(int(v["lazy_rank"].iloc[0]))
        n["verify.seeds"] = ", ".join(str(s) for s in v["seed"])
        n["verify.clean"] = f"{v['clean'].mean():.4f}"
        n["verify.lazy"] = f"{v['lazy'].mean():.4f}"
        n["verify.verified"] = f"{v['verified'].mean():.4f}"
        n["verify.lazy_delta"] = f"{v['lazy_delta'].mean():+.1%}"
        n["verify.lazy_delta_std"] = f"{v['lazy_delta'].std(ddof=1):.1%}" if len(v) > 1 else "-"
        n["verify.verified_delta"] = f"{v['verified_delta'].mean():+.1%}"
        n["verify.verified_delta_std"] = f"{v['verified_delta'].std(ddof=1):.1%}" if len(v) > 1 else "-"
        n["verify.caught"] = f"{int(v['caught_phase'].notna().sum())} of {len(v)}"
        n["verify.phases"] = ", ".join("never" if pd.isna(p) else f"{p:.0f}" for p in v["caught_phase"])
        n["verify.outer_phases"] = str(int(v["outer_phases"].max()))
        n["verify.checks"] = str(int(v["checks"].sum()))
        lazy = v["lazy_rank"].astype(str)
        wrong = [r for r, c in zip(lazy, v["caught_ranks"], strict=True) if c and set(c.split()) != {r}]
        n["verify.false_positives"] = str(len(wrong))
        n["verify.evidence"] = (
            str(v.loc[v["caught_phase"].notna(), "evidence"].iloc[0]) if v["caught_phase"].notna().any() else "-"
        )
    return {f"attacks.{k}": val for k, val in n.items()}


def trim_of(at: dict) -> float:
    over = at["aggregators"].get("trimmed_mean", [])
    return float(next((o.split("=", 1)[1] for o in over if o.startswith("aggregator.trim=")), 0.1))


def figure(t: pd.DataFrame, path: Path, trim: float) -> Path:
    """The heatmap: change of the final val loss vs the same aggregator's clean run (colour, clipped at the 'broken'
    threshold), with the
    loss and the change written in each cell; diverged cells are black."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    plots.style()
    aggs = list(dict.fromkeys(t["aggregator"]))
    keys = list(dict.fromkeys(zip(t["attack"], t["n"], strict=True)))
    grid = np.full((len(keys), len(aggs)), np.nan)
    text = [["" for _ in aggs] for _ in keys]
    by = {(r.attack, r.n, r.aggregator): r for r in t.itertuples()}
    for i, (attack, n) in enumerate(keys):
        for j, agg in enumerate(aggs):
            r = by[(attack, n, agg)]
            if r.failed and not r.seeds:
                text[i][j] = "diverged"
                continue
            d = 0.0 if attack == "none" else r.delta_vs_clean
            grid[i, j] = d
            text[i][j] = (
                f"{r.val_loss_mean:.3f}\n"
                + ("clean" if attack == "none" else f"{d:+.1%}")
                + (f" ({r.seeds} seeds)" if r.seeds > 1 else "")
            )
    fig, ax = plt.subplots(figsize=(7.2, 0.42 * len(keys) + 1.2))
    lo, hi = -0.03, TOL_BROKEN  # the colour saturates where the verdict becomes 'broken'
    shown = np.clip(np.nan_to_num(grid, nan=np.inf), lo, hi)
    cmap = plt.get_cmap("RdYlGn_r").with_extremes(over="black")
    im = ax.imshow(np.where(np.isnan(grid), 1.0, shown), cmap=cmap, norm=TwoSlopeNorm(0.0, lo, hi),
                   aspect="auto")  # fmt: skip
    im.set_clim(lo, hi)
    for i in range(len(keys)):
        for j in range(len(aggs)):
            dark = np.isnan(grid[i, j]) or shown[i, j] > 0.7 * hi
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=6.5, color="white" if dark else "black")
    ax.set_xticks(range(len(aggs)), [LABELS.get(a, a) + (f"\n(trim {trim:g})" if a == "trimmed_mean" else "")
                                     for a in aggs])  # fmt: skip
    ax.set_yticks(range(len(keys)), ["clean" if a == "none" else f"{a}, n={n}" for a, n in keys])
    ax.tick_params(length=0)
    ax.grid(False)
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.set_label(f"final val loss vs clean (clipped at {hi:+.0%})", fontsize=7)
    cb.ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x:+.0%}"))
    ax.set_title("Final validation loss under attack, K=8 (change vs the same aggregator's clean run)", fontsize=8)
    return plots.save(fig, path)


def write_report(out: str | Path, report_dir: str | Path) -> Path:
    rep = load(out)
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    trim = trim_of(rep.plan["attacks"])
    t = cells_table(rep)
    t.to_csv(report_dir / "attacks.csv", index=False)
    (report_dir / "attacks.md").write_text(f"### Final val loss under attack, K={rep.scale['workers']}\n\n"
                                           f"{to_markdown(t, trim)}\n\n{rejections_markdown(t, trim)}\n")  # fmt: skip
    v = verify_table(rep)
    v.to_csv(report_dir / "verify.csv", index=False)
    at = rep.plan["attacks"]
    (report_dir / "verify.md").write_text(verify_markdown(v, at["verify_fraction"], at["lazy_fraction"]) + "\n")
    (report_dir / "numbers.json").write_text(json.dumps(numbers(rep, t, v), indent=2) + "\n")
    figure(t, report_dir / "figures" / "attacks.png", trim)
    return report_dir
