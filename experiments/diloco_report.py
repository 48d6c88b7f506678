"""Tables, claims and figures of a DiLoCo reproduction, computed from its run directories only.

``write_report(out, report_dir)`` reads ``out/plan.json`` (which run belongs to which study, variant and seed) and
every ``out/runs/*/summary.json`` + ``metrics.jsonl`` + ``.hydra/config.yaml`` through ``locoswarm.analysis``, and
writes per-study tables (``<study>.md`` / ``.csv``), ``claims.md`` / ``claims.csv`` (each qualitative claim of the
paper with the measured numbers and whether it held), ``numbers.json`` (every number the paper's text quotes) and
the figures. ``paper/build.py`` calls the same functions, so the report and the paper cannot disagree.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from locoswarm import plots
from locoswarm.analysis import load_metrics, load_runs

# What "matches", "slowly" and "slightly" mean below, relative to the reference's final validation loss.
TOL_MATCH = 0.01  # within 1%: DiLoCo vs DDP, a compressed run vs the uncompressed one
TOL_SLOW = 0.03  # within 3%: the largest H vs the smallest, non-iid vs iid

# Each study: (the variants in display order, display labels, the reference each variant is compared with).
STUDIES: dict[str, dict] = {
    "main": {"title": "DDP vs DiLoCo at equal tokens", "ref": "ddp",
             "labels": {"single": "1 worker (1/K tokens)", "ddp": "DDP (K workers)", "diloco": "DiLoCo"}},
    "outer": {"title": "Outer optimiser", "ref": "diloco",
              "labels": {"outer-sgd": "SGD lr 1 (FedAvg)", "diloco": "Nesterov (DiLoCo)", "outer-adam": "Adam (FedOpt)"}},
    "H": {"title": "Communication frequency H", "ref": "diloco", "labels": {}},
    "K": {"title": "Number of workers K (fixed steps per worker)", "ref": "diloco", "labels": {}},
    "compression": {"title": "Pseudo-gradient compression", "ref": "diloco",
                    "labels": {"diloco": "none (fp32)", "topk0.5": "top-k 50%", "topk0.1": "top-k 10%", "int8": "int8"}},
    "non-iid": {"title": "iid vs non-iid shards", "ref": {"diloco-noniid": "diloco", "ddp-noniid": "ddp"},
                "labels": {"diloco": "DiLoCo iid", "diloco-noniid": "DiLoCo non-iid", "ddp": "DDP iid",
                           "ddp-noniid": "DDP non-iid"}},
    "warm-start": {"title": "Synchronous warm-start", "ref": "diloco",
                   "labels": {"diloco": "with warm-start", "no-warm-start": "from scratch"}},
}  # fmt: skip


CLAIM_KEYS = ("diloco_vs_ddp", "diloco_vs_single", "outer", "H", "K", "pruning", "int8", "noniid", "warm_start")
# The study whose runs each claim reads: a claim of a partly run scale is stated only once all of them finished.
CLAIM_STUDY = {"diloco_vs_ddp": "main", "diloco_vs_single": "main", "outer": "outer", "H": "H", "K": "K",
               "pruning": "compression", "int8": "compression", "noniid": "non-iid", "warm_start": "warm-start"}  # fmt: skip


@dataclass
class Reproduction:
    plan: dict
    runs: pd.DataFrame  # one row per run: plan fields + config + summary (+ bytes_local)

    @property
    def scale(self) -> dict:
        return self.plan["scale_config"]


def load(out: str | Path) -> Reproduction:
    out = Path(out)
    plan = json.loads((out / "plan.json").read_text())
    df = load_runs(out / "runs")
    df["run_id"] = [Path(p).name for p in df["run_dir"]]
    specs = pd.DataFrame(plan["runs"])[["run_id", "variant", "studies", "seed"]]
    df = specs.merge(df.drop(columns=["seed"], errors="ignore"), on="run_id", how="left")  # the plan's seed = config's
    df["status"] = df["status"].fillna("missing")
    warm = plan["scale_config"]["warmup_sync"]
    df["bytes_local"] = [_bytes_after(r.run_dir, warm) if r.status == "ok" else np.nan for r in df.itertuples()]
    return Reproduction(plan, df)


def _bytes_after(run_dir: str, step: int) -> float:
    """Bytes each worker sent after inner step ``step`` (the local phase, after the synchronous warm-start)."""
    m = load_metrics(run_dir)
    if "bytes_sent" not in m:
        return 0.0
    return float(m.loc[m["step"] > step, "bytes_sent"].fillna(0.0).sum())


def _ref_of(study: str, variant: str) -> str:
    ref = STUDIES[study]["ref"]
    return ref.get(variant, variant) if isinstance(ref, dict) else ref


def _order(study: str, variants: list[str], rep: Reproduction) -> list[str]:
    if study in ("H", "K"):
        key = "algorithm.inner_steps" if study == "H" else "workers"
        ok = rep.runs[rep.runs["variant"].isin(variants)]
        val = ok.groupby("variant")[key].first()
        return sorted(variants, key=lambda v: float(val.get(v, math.inf)))
    labels = list(STUDIES[study]["labels"])
    return sorted(variants, key=lambda v: labels.index(v) if v in labels else len(labels))


def study_table(rep: Reproduction, study: str) -> pd.DataFrame:
    """One row per variant: seeds, final val loss mean/std, paired delta vs the reference, bytes, syncs, time."""
    df = rep.runs[[study in s for s in rep.runs["studies"]]]
    # Compare like with like: only the seeds every variant of the study finished (ablations with one seed are
    # compared with the reference's same seed, not with its mean over more seeds).
    ok = df[df["status"] == "ok"]
    shared = set.intersection(*(set(g["seed"]) for _, g in ok.groupby("variant"))) if len(ok) else set()
    if shared:
        df = df[df["seed"].isin(shared)]
    rows = []
    for variant in _order(study, list(dict.fromkeys(df["variant"])), rep):
        v = df[(df["variant"] == variant) & (df["status"] == "ok")]
        ref_name = _ref_of(study, variant)
        ref = df[(df["variant"] == ref_name) & (df["status"] == "ok")]
        common = sorted(set(v["seed"]) & set(ref["seed"]))
        delta = delta_se = np.nan
        if common and ref_name != variant:
            a = v.set_index("seed").loc[common, "final_val_loss"].to_numpy(float)
            b = ref.set_index("seed").loc[common, "final_val_loss"].to_numpy(float)
            delta = float(np.mean(a - b) / np.mean(b))
            if len(common) > 1:  # the standard error of the paired difference, relative like delta
                delta_se = float(np.std(a - b, ddof=1) / np.sqrt(len(common)) / np.mean(b))
        label = STUDIES[study]["labels"].get(variant)
        if label is None and study == "H" and len(v):
            label = f"H={int(v['algorithm.inner_steps'].iloc[0])}"
        if label is None and study == "K" and len(v):
            label = f"K={int(v['workers'].iloc[0])}"
        rows.append({
            "variant": variant, "label": label or variant, "reference": ref_name,
            "seeds": len(v), "failed": int((df["variant"] == variant).sum() - len(v)),
            "val_loss_mean": float(v["final_val_loss"].mean()) if len(v) else np.nan,
            "val_loss_std": float(v["final_val_loss"].std(ddof=1)) if len(v) > 1 else np.nan,
            "delta_vs_ref": delta,
            "delta_se": delta_se,
            "bytes_sent_per_worker": float(v["bytes_sent_total"].mean()) if len(v) else np.nan,
            "bytes_local_phase": float(v["bytes_local"].mean()) if len(v) else np.nan,
            "syncs": float(v["outer_steps"].mean()) if len(v) else np.nan,
            "tokens": float(v["tokens"].mean()) if len(v) else np.nan,
            "wall_seconds": float(v["wall_seconds"].mean()) if len(v) else np.nan,
        })  # fmt: skip
    return pd.DataFrame(rows)


def study_tables(rep: Reproduction) -> dict[str, pd.DataFrame]:
    """``study_table`` of every study the plan has runs for."""
    return {s: study_table(rep, s) for s in STUDIES if any(s in st for st in rep.runs["studies"])}


def _mb(x: float) -> str:
    return "-" if pd.isna(x) else f"{x / 1e6:.2f}"


def to_markdown(t: pd.DataFrame) -> str:
    head = "| variant | seeds | final val loss | vs reference | MB sent / worker | MB after warm-start | outer steps | tokens |"
    lines = [head, "|" + " --- |" * 8]
    for r in t.itertuples():
        loss = "-" if pd.isna(r.val_loss_mean) else f"{r.val_loss_mean:.4f}"
        if not pd.isna(r.val_loss_std):
            loss += f" ± {r.val_loss_std:.4f}"
        delta = "ref" if r.variant == r.reference else ("-" if pd.isna(r.delta_vs_ref) else f"{r.delta_vs_ref:+.2%}")
        seeds = f"{r.seeds}" + (f" ({r.failed} failed)" if r.failed else "")
        lines.append(f"| {r.label} | {seeds} | {loss} | {delta} | {_mb(r.bytes_sent_per_worker)} | "
                     f"{_mb(r.bytes_local_phase)} | {r.syncs:.0f} | {r.tokens / 1e3:.0f}k |")  # fmt: skip
    return "\n".join(lines)


def _row(t: pd.DataFrame, variant: str) -> pd.Series | None:
    r = t[t["variant"] == variant]
    return None if r.empty or pd.isna(r["val_loss_mean"].iloc[0]) else r.iloc[0]


def claims(rep: Reproduction, tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Each qualitative claim of the DiLoCo paper, what the paper reports, what these runs measured, and whether
    the claim held here (None when its runs are missing). Thresholds: TOL_MATCH and TOL_SLOW."""
    sc = rep.scale
    out = []

    def add(key, claim, paper, ours, held):
        out.append({"key": key, "claim": claim, "paper": paper, "ours": ours, "held": held})

    t = tables.get("main")
    ddp, dil, single = (_row(t, v) for v in ("ddp", "diloco", "single")) if t is not None else (None, None, None)
    if ddp is not None and dil is not None:
        local = ddp.bytes_local_phase / dil.bytes_local_phase if dil.bytes_local_phase else np.nan
        total = ddp.bytes_sent_per_worker / dil.bytes_sent_per_worker
        add("diloco_vs_ddp", "DiLoCo matches or beats synchronous training at equal tokens, communicating H times "
            "less", "8 workers, H=500: as good as fully synchronous, 500x less communication (abstract)",
            f"K={sc['workers']}, H={sc['H']}: {dil.val_loss_mean:.4f} vs DDP {ddp.val_loss_mean:.4f} "
            f"({dil.delta_vs_ref:+.2%}, {int(dil.seeds)} seeds); {local:.0f}x fewer bytes after the warm-start, "
            f"{total:.1f}x over the whole run", bool(dil.val_loss_mean <= ddp.val_loss_mean * (1 + TOL_MATCH)))  # fmt: skip
    if single is not None and dil is not None:
        add("diloco_vs_single", "DiLoCo with K workers beats one worker on the same number of steps",
            "8 workers beat the 1x-compute baseline", f"{dil.val_loss_mean:.4f} vs 1 worker {single.val_loss_mean:.4f}",
            bool(dil.val_loss_mean < single.val_loss_mean))  # fmt: skip
    t = tables.get("outer")
    if t is not None:
        nes, sgd, adam = (_row(t, v) for v in ("diloco", "outer-sgd", "outer-adam"))
        if nes is not None and sgd is not None and adam is not None:
            add("outer", "Outer Nesterov momentum beats outer SGD (FedAvg) and Adam", "Nesterov best of the outer "
                "optimisers compared (outer-optimiser ablation)", f"Nesterov {nes.val_loss_mean:.4f}, SGD "
                f"{sgd.val_loss_mean:.4f} ({sgd.delta_vs_ref:+.2%}), Adam {adam.val_loss_mean:.4f} "
                f"({adam.delta_vs_ref:+.2%})", bool(nes.val_loss_mean < min(sgd.val_loss_mean, adam.val_loss_mean)))  # fmt: skip
    t = tables.get("H")
    if t is not None and t["val_loss_mean"].notna().sum() >= 2:
        ok = t[t["val_loss_mean"].notna()]
        lo, hi = ok.iloc[0], ok.iloc[-1]
        add("H", "Quality degrades only slowly as H grows", "H=500 costs little against more frequent "
            "communication (communication-frequency ablation)", f"{lo.label}: {lo.val_loss_mean:.4f}, {hi.label}: "
            f"{hi.val_loss_mean:.4f} ({(hi.val_loss_mean / lo.val_loss_mean - 1):+.2%}) for "
            f"{lo.bytes_local_phase / hi.bytes_local_phase:.1f}x fewer bytes after the warm-start",
            bool(hi.val_loss_mean <= lo.val_loss_mean * (1 + TOL_SLOW)))  # fmt: skip
    t = tables.get("K")
    if t is not None and t["val_loss_mean"].notna().sum() >= 2:
        ok = t[t["val_loss_mean"].notna()]
        losses = ok["val_loss_mean"].to_numpy()
        add("K", "More workers (same steps each) give a lower loss", "more replicas improve perplexity, with "
            "diminishing returns (replica ablation)", ", ".join(f"{r.label}: {r.val_loss_mean:.4f}" for r in
            ok.itertuples()), bool(np.all(np.diff(losses) < 0)))  # fmt: skip
    t = tables.get("compression")
    if t is not None:
        none, half, int8 = (_row(t, v) for v in ("diloco", "topk0.5", "int8"))
        if none is not None and half is not None:
            add("pruning", "Pruning half of the pseudo-gradient values costs little", "pruning up to ~50% of the "
                "values degrades perplexity only slightly (pruning ablation)", f"top-k 50%: {half.val_loss_mean:.4f} "
                f"vs {none.val_loss_mean:.4f} ({half.delta_vs_ref:+.2%})",
                bool(half.val_loss_mean <= none.val_loss_mean * (1 + TOL_MATCH)))  # fmt: skip
        if none is not None and int8 is not None:
            add("int8", "int8 pseudo-gradients (4x fewer bytes) cost little", "not in the paper (a toolkit claim)",
                f"int8: {int8.val_loss_mean:.4f} ({int8.delta_vs_ref:+.2%}), {none.bytes_local_phase / int8.bytes_local_phase:.1f}x "
                "fewer bytes after the warm-start", bool(int8.val_loss_mean <= none.val_loss_mean * (1 + TOL_MATCH)))  # fmt: skip
    t = tables.get("non-iid")
    if t is not None:
        iid, non = _row(t, "diloco"), _row(t, "diloco-noniid")
        if iid is not None and non is not None:
            add("noniid", "Non-iid shards are only slightly worse than iid shards", "robust to the data "
                "distribution; non-iid only slightly worse, slower early (iid vs non-iid ablation)",
                f"DiLoCo non-iid {non.val_loss_mean:.4f} vs iid {iid.val_loss_mean:.4f} ({non.delta_vs_ref:+.2%}"
                + ("" if pd.isna(non.delta_se) else f" ± {non.delta_se:.2%} over {int(non.seeds)} seeds"
                   + (", within seed noise" if abs(non.delta_vs_ref) < 2 * non.delta_se else "")) + ")",
                bool(non.val_loss_mean <= iid.val_loss_mean * (1 + TOL_SLOW)))  # fmt: skip
    t = tables.get("warm-start")
    if t is not None:
        ws, scratch = _row(t, "diloco"), _row(t, "no-warm-start")
        if ws is not None and scratch is not None:
            add("warm_start", "A synchronous warm-start helps DiLoCo", "protocol: DiLoCo starts from a model "
                "trained synchronously for 24k of the 88k steps", f"from scratch {scratch.val_loss_mean:.4f} vs "
                f"warm-start ({sc['warmup_sync']} of {sc['max_steps']} steps) {ws.val_loss_mean:.4f} "
                f"({scratch.delta_vs_ref:+.2%})", bool(ws.val_loss_mean <= scratch.val_loss_mean))  # fmt: skip
    return pd.DataFrame(out)


def claims_markdown(c: pd.DataFrame, scale: str) -> str:
    lines = [f"| claim | DiLoCo paper | this toolkit, scale={scale} | held? |", "| --- | --- | --- | --- |"]
    for r in c.itertuples():
        lines.append(f"| {r.claim} | {r.paper} | {r.ours} | {'yes' if r.held else 'no'} |")
    return "\n".join(lines)


def scales_markdown(reps: dict[str, Reproduction]) -> str:
    """The paper's claims with what each scale measured, side by side: one row per claim, one column per scale
    (``reps``: scale name -> its reproduction). A claim is stated for a scale only once every run of its study
    finished there (else "not finished yet": a part of a study could give a verdict that the rest overturns), so a
    partly run scale can be committed and read while the rest trains; the header counts each scale's runs."""
    found = {name: claims(rep, study_tables(rep)) for name, rep in reps.items()}
    measured = {}
    for name, c in found.items():
        runs = reps[name].runs
        unfinished = {s for studies, status in zip(runs["studies"], runs["status"], strict=True) if status == "missing"
                      for s in studies}  # fmt: skip
        measured[name] = {key: "not finished yet" if CLAIM_STUDY[key] in unfinished else "no result (its runs failed)"
                          for key in CLAIM_KEYS}  # fmt: skip
        measured[name].update({r.key: f"{r.ours} ({'held' if r.held else 'did not hold'})" for r in c.itertuples()
                               if CLAIM_STUDY[r.key] not in unfinished})  # fmt: skip
    paper = {}  # a claim's wording and the paper's number, from whichever scale could state them
    for c in found.values():
        for r in c.itertuples():
            paper.setdefault(r.key, (r.claim, r.paper))
    head = [f"{name} ({int((rep.runs['status'] == 'ok').sum())} of {len(rep.runs)} runs)" for name, rep in reps.items()]
    lines = [f"| claim | DiLoCo paper | {' | '.join(head)} |", "| --- | --- |" + " --- |" * len(reps)]
    for key in CLAIM_KEYS:
        if key in paper:
            cells = [measured[name][key] for name in reps]
            lines.append(f"| {paper[key][0]} | {paper[key][1]} | {' | '.join(cells)} |")
    return "\n".join(lines)


def gap_and_agreement(rep: Reproduction) -> dict[str, float] | None:
    """Where DiLoCo's loss gap to DDP opens, and how much its workers agree. The gap: relative val loss, the mean
    over the seeds both finished, at DiLoCo's first evaluation after the warm-start and at its last (DDP's loss
    interpolated between its own evaluations). The agreement, over every outer step of those DiLoCo runs: the mean
    pairwise cosine of the workers' pseudo-gradients, and the norm of their average over their mean norm (1 when
    they agree, 1/sqrt(K) when orthogonal). None if no seed has both runs."""
    ok = rep.runs[rep.runs["status"] == "ok"]
    dil, ddp = (ok[ok["variant"] == v].set_index("seed")["run_dir"] for v in ("diloco", "ddp"))
    seeds = sorted(set(dil.index) & set(ddp.index))
    if not seeds:
        return None
    warm = rep.scale["warmup_sync"]
    first, last, cosine, ratio = [], [], [], []
    for seed in seeds:
        a, b = (
            load_metrics(r).dropna(subset=["val_loss"]).set_index("step")["val_loss"] for r in (dil[seed], ddp[seed])
        )
        after = [s for s in a.index if s > warm]
        # DDP evaluates on its own grid (DiLoCo's is aligned to its outer steps): read it where DiLoCo evaluated
        ddp_at = np.interp(after, b.index.to_numpy(float), b.to_numpy(float))
        first.append(a[after[0]] / ddp_at[0] - 1)
        last.append(a[after[-1]] / ddp_at[-1] - 1)
        m = load_metrics(dil[seed])
        rounds = m[m["outer_step"].diff() > 0].dropna(subset=["pg_cosine"])  # one row per outer step
        cosine += list(rounds["pg_cosine"])
        ratio += [g / np.mean(n) for g, n in zip(rounds["outer_grad_norm"], rounds["pg_norm"], strict=True)]
    return {"seeds": len(seeds), "gap_first": float(np.mean(first)), "gap_first_step": float(after[0]),
            "gap_last": float(np.mean(last)), "cosine": float(np.mean(cosine)), "norm_ratio": float(np.mean(ratio)),
            "K": float(rep.scale["workers"])}  # fmt: skip


def gap_by_h(rep: Reproduction) -> tuple[str, str]:
    """DiLoCo's final val-loss gap to DDP for each H of the H study, on the seeds every H and DDP finished:
    ("H=20: +0.45%, H=50: ... (seed 0)", whether it grows with H), or "not finished yet" while a run is missing."""
    runs = rep.runs[[("H" in s) for s in rep.runs["studies"]]]
    if (runs["status"] == "missing").any():
        return "not finished yet", "cannot be told yet"
    ok = rep.runs[rep.runs["status"] == "ok"]
    ddp = ok[ok["variant"] == "ddp"].set_index("seed")["final_val_loss"]
    by_h = sorted(runs[runs["status"] == "ok"].groupby("algorithm.inner_steps"), key=lambda x: float(x[0]))
    seeds = sorted(set(ddp.index).intersection(*(set(g["seed"]) for _, g in by_h)))
    if not by_h or not seeds:
        return "no result", "cannot be told (its runs failed)"
    gaps = [(int(h), float(np.mean([g.set_index("seed")["final_val_loss"][s] / ddp[s] - 1 for s in seeds])))
            for h, g in by_h]  # fmt: skip
    text = ", ".join(f"H={h}: {gap:+.2%}" for h, gap in gaps)
    grows = all(b > a for (_, a), (_, b) in zip(gaps, gaps[1:], strict=False))
    return (f"{text} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})",
            "grows with H" if grows else "does not grow steadily with H")  # fmt: skip


def numbers(rep: Reproduction, tables: dict[str, pd.DataFrame], c: pd.DataFrame) -> dict[str, str]:
    """Every number the paper's text quotes, formatted, keyed by name (the paper's {{macros}})."""
    sc = rep.scale
    ok = rep.runs[rep.runs["status"] == "ok"]
    n: dict[str, str] = {
        "scale": rep.plan["scale"],
        "description": rep.plan["description"],
        "n_runs": str(len(rep.runs)),
        "n_ok": str(len(ok)),
        "n_failed": str(len(rep.runs) - len(ok)),
        "workers": str(sc["workers"]),
        "H": str(sc["H"]),
        "max_steps": str(sc["max_steps"]),
        "warmup_sync": str(sc["warmup_sync"]),
        "warmup_pct": f"{sc['warmup_sync'] / sc['max_steps']:.0%}",
        "outer_rounds": str(rep.plan["reference_outer_rounds"]),
        "seeds_main": str(int(tables["main"]["seeds"].max())) if "main" in tables else "0",
        "tol_match": f"{TOL_MATCH:.0%}",
        "tol_slow": f"{TOL_SLOW:.0%}",
        "claims_total": str(len(c)),
        "claims_held": str(int(c["held"].sum())) if len(c) else "0",
        "cpu_minutes": f"{ok['wall_seconds'].sum() / 60:.1f}",
        "params": "-",
        "git_sha": str(ok["git_sha"].iloc[0])[:12] if len(ok) else "-",
        "notes": "; ".join(rep.plan.get("notes", [])) or "none",
    }
    for study, t in tables.items():
        for r in t.itertuples():
            key = f"{study}.{r.variant}".replace("-", "_")
            n[f"{key}.loss"] = "-" if pd.isna(r.val_loss_mean) else f"{r.val_loss_mean:.4f}"
            n[f"{key}.delta"] = "-" if pd.isna(r.delta_vs_ref) else f"{r.delta_vs_ref:+.2%}"
            n[f"{key}.mb"] = _mb(r.bytes_sent_per_worker)
    for key in CLAIM_KEYS:  # a claim whose runs are missing or failed says so, in place of a verdict
        n[f"claim.{key}"] = "could not be checked (its runs are missing or failed)"
        n[f"claim.{key}.ours"] = "no result"
    for r in c.itertuples():
        n[f"claim.{r.key}"] = "held" if r.held else "did not hold"
        n[f"claim.{r.key}.ours"] = r.ours
    t = tables.get("main")
    if t is not None and _row(t, "ddp") is not None and _row(t, "diloco") is not None:
        ddp, dil = _row(t, "ddp"), _row(t, "diloco")
        n["local_comm_ratio"] = f"{ddp.bytes_local_phase / dil.bytes_local_phase:.0f}"
        n["total_comm_ratio"] = f"{ddp.bytes_sent_per_worker / dil.bytes_sent_per_worker:.1f}"
    return n


def figures(rep: Reproduction, tables: dict[str, pd.DataFrame], fig_dir: Path) -> list[Path]:
    """The report's figures (seed 0 for curves; means and spread over seeds for bars)."""
    import matplotlib.pyplot as plt

    plots.style()
    made = []
    ok = rep.runs[(rep.runs["status"] == "ok") & (rep.runs["seed"] == 0)].copy()
    main_labels = STUDIES["main"]["labels"]
    ok["label"] = [main_labels.get(v, v) for v in ok["variant"]]
    for study in ("H", "K", "compression", "outer", "non-iid", "warm-start"):  # first study naming a variant wins
        if study in tables:
            names = dict(zip(tables[study]["variant"], tables[study]["label"], strict=True))
            ok["label"] = [
                lab if v in main_labels else names.get(v, lab)
                for v, lab in zip(ok["variant"], ok["label"], strict=True)
            ]

    main = ok[ok["variant"].isin(["ddp", "diloco", "single"])]
    if len(main):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        plots.loss_vs_tokens(main, label="label", ax=axes[0])
        axes[0].set_title("Validation loss vs tokens (seed 0)")
        plots.loss_vs_bytes(main[main["variant"] != "single"], label="label", ax=axes[1])
        axes[1].set_title("Validation loss vs communication")
        made.append(plots.save(fig, fig_dir / "main_curves.png"))

    at_k = ok[ok["workers"] == rep.scale["workers"]]
    if len(at_k):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        plots.pareto(at_k, label="label", ax=ax)
        ax.set_title(f"Communication vs quality, K={rep.scale['workers']} (seed 0)")
        made.append(plots.save(fig, fig_dir / "pareto.png"))

    # a partly run plan (--only, or a run still training) draws the studies that have a finished run
    abl = [s for s in ("outer", "H", "K", "compression", "non-iid", "warm-start")
           if s in tables and tables[s]["val_loss_mean"].notna().any()]  # fmt: skip
    if abl:
        cols = 3
        fig, axes = plt.subplots(math.ceil(len(abl) / cols), cols, figsize=(12, 3.6 * math.ceil(len(abl) / cols)))
        for ax, study in zip(np.ravel(axes), abl, strict=False):
            t = tables[study].dropna(subset=["val_loss_mean"])
            ref = STUDIES[study]["ref"]
            plots.bars(t, label="label", ax=ax, reference=ref if isinstance(ref, str) else None, ref_col="variant")
            ax.set_title(STUDIES[study]["title"])
        for ax in np.ravel(axes)[len(abl) :]:
            ax.set_visible(False)
        made.append(plots.save(fig, fig_dir / "ablations.png"))

    ref = ok[ok["variant"] == "diloco"]
    non = ok[ok["variant"] == "diloco-noniid"]
    if len(ref):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for name, r in (("iid", ref), ("non-iid", non)):
            if len(r):
                m = plots.sync_rows(load_metrics(r["run_dir"].iloc[0]))
                axes[0].plot(m["outer_step"], m["pg_cosine"], marker="o", ms=3, label=f"DiLoCo {name}")
                axes[1].plot(m["outer_step"], m["outer_grad_norm"], marker="o", ms=3, label=f"DiLoCo {name}")
        axes[0].set(xlabel="outer step", ylabel="mean pairwise cosine", title="Agreement between workers")
        axes[1].set(xlabel="outer step", ylabel="outer gradient L2 norm", title="Averaged pseudo-gradient")
        axes[1].set_yscale("log")
        for ax in axes:
            ax.legend(frameon=False)
        made.append(plots.save(fig, fig_dir / "diagnostics.png"))
    return made


def write_report(out: str | Path, report_dir: str | Path) -> Path:
    rep = load(out)
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    tables = study_tables(rep)
    for study, t in tables.items():
        t.to_csv(report_dir / f"{study}.csv", index=False)
        (report_dir / f"{study}.md").write_text(f"### {STUDIES[study]['title']}\n\n{to_markdown(t)}\n")
    c = claims(rep, tables)
    c.to_csv(report_dir / "claims.csv", index=False)
    (report_dir / "claims.md").write_text(claims_markdown(c, rep.plan["scale"]) + "\n")
    (report_dir / "numbers.json").write_text(json.dumps(numbers(rep, tables, c), indent=2) + "\n")
    figures(rep, tables, report_dir / "figures")
    return report_dir
