"""Table, claims, numbers and figure of a Streaming DiLoCo study, computed from its run directories only.

``write_report(out, report_dir)`` reads ``out/plan.json`` (written by ``reproduce_streaming.py``) and every
``out/runs/*/`` (summary.json, metrics.jsonl, .hydra/config.yaml) through ``diloco_report.load``, and writes
``streaming.md`` / ``.csv`` (one row per variant), ``claims.md`` / ``.csv`` (the paper's claims with our numbers),
``numbers.json`` (every number the paper's section quotes, keyed ``streaming.*``) and ``figures/streaming.png``.
``paper/build.py`` calls the same functions.

Definitions (per worker, as the simulator counts them; K workers on a ring all-reduce each send 2(K-1)/K of a
payload):
- peak bytes per exchange: the largest single averaging round after the synchronous warm-start. DiLoCo: the
  ``bytes_sent`` of an outer step (the whole model); streaming: the largest entry of ``fragment_bytes_sent``
  (the fragment holding the embeddings). The warm-start's data-parallel steps exchange the whole gradient every
  step in every variant, so they are left out: they are the same for all.
- local-phase utilisation: (local steps x ``network.step_seconds``) / simulated seconds after the warm-start;
  ``compute_utilisation`` (the summary's) is over the whole run, warm-start included.
- paired change: mean over seeds of (variant − DiLoCo) / DiLoCo on the same seed, ± the standard deviation of
  those per-seed changes; "within noise" when |mean| < 2 standard errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from diloco_report import TOL_MATCH, Reproduction, _row, load

from locoswarm import plots
from locoswarm.analysis import load_metrics

REF = "diloco"


def label(row: pd.Series | dict) -> str:
    """'DiLoCo', 'Streaming P=4', 'Streaming P=4, τ=1, α=0.5', '... + int4' from a run's config."""
    if row["algorithm.name"] != "streaming_diloco":
        return "DiLoCo"
    text = f"Streaming P={int(row['algorithm.fragments'])}"
    if int(row["algorithm.overlap_steps"]) or float(row["algorithm.mixing"]):
        text += f", τ={int(row['algorithm.overlap_steps'])}, α={float(row['algorithm.mixing']):g}"
    if row["compression.name"] != "none":
        text += f" + {row['compression.name']}"
    return text


def exchanges(run_dir: str, warmup: int) -> dict[str, float]:
    """Per-exchange bytes after the warm-start, from metrics.jsonl: peak, count, and whether every exchange's
    bytes are in a row of its own (the sum of the per-exchange bytes equals the sum of the rows' bytes_sent)."""
    m = load_metrics(run_dir)
    x = exchanges_by_step(m, warmup)
    local = m[m["step"] > warmup]
    sent = float(local["bytes_sent"].fillna(0.0).sum()) if "bytes_sent" in local else 0.0
    return {
        "peak": float(x["bytes"].max()) if len(x) else 0.0,
        "exchanges": float(len(x)),
        "complete": bool(np.isclose(float(x["bytes"].sum()), sent)),
        "sim_at_warmup": float(m.loc[m["step"] <= warmup, "sim_seconds"].dropna().iloc[-1]) if warmup else 0.0,
    }


def runs_table(rep: Reproduction) -> pd.DataFrame:
    """One row per finished run with the per-exchange figures and the local-phase utilisation."""
    warm = int(rep.scale["warmup_sync"])
    df = rep.runs[rep.runs["status"] == "ok"].copy()
    extra = pd.DataFrame([exchanges(d, warm) for d in df["run_dir"]], index=df.index)
    df = pd.concat([df, extra], axis=1)
    local_steps = df["train.max_steps"].astype(float) - warm
    df["util_local"] = (
        local_steps * df["network.step_seconds"].astype(float) / (df["sim_seconds"] - df["sim_at_warmup"])
    )
    df["label"] = [label(r) for _, r in df.iterrows()]
    return df


def study_table(rep: Reproduction) -> pd.DataFrame:
    """One row per variant (plan order): seeds, loss mean ± std, paired change vs DiLoCo, bytes, time."""
    df = runs_table(rep)
    ref = df[df["variant"] == REF].set_index("seed")["final_val_loss"]
    rows = []
    for variant in dict.fromkeys(rep.runs["variant"]):
        v = df[df["variant"] == variant]
        planned = int((rep.runs["variant"] == variant).sum())
        common = sorted(set(v["seed"]) & set(ref.index))
        rel = (v.set_index("seed").loc[common, "final_val_loss"] - ref.loc[common]) / ref.loc[common]
        n = len(rel)
        rows.append({
            "variant": variant, "label": v["label"].iloc[0] if len(v) else variant,
            "fragments": int(v["algorithm.fragments"].iloc[0]) if len(v) and variant != REF else 1,
            "seeds": len(v), "failed": planned - len(v), "seed_list": " ".join(str(s) for s in sorted(v["seed"])),
            "val_loss_mean": float(v["final_val_loss"].mean()) if len(v) else np.nan,
            "val_loss_std": float(v["final_val_loss"].std(ddof=1)) if len(v) > 1 else np.nan,
            "delta_vs_ref": float(rel.mean()) if n and variant != REF else np.nan,
            "delta_std": float(rel.std(ddof=1)) if n > 1 and variant != REF else np.nan,
            "delta_worse_seeds": int((rel > 0).sum()) if variant != REF else 0,
            "delta_seeds": n,
            "peak_bytes": float(v["peak"].max()) if len(v) else np.nan,
            "exchanges_local": float(v["exchanges"].mean()) if len(v) else np.nan,
            "all_exchanges_logged": bool(v["complete"].all()) if len(v) else False,
            "bytes_sent_per_worker": float(v["bytes_sent_total"].mean()) if len(v) else np.nan,
            "bytes_local_phase": float(v["bytes_local"].mean()) if len(v) else np.nan,
            "compute_utilisation": float(v["compute_utilisation"].mean()) if len(v) else np.nan,
            "util_local": float(v["util_local"].mean()) if len(v) else np.nan,
            "sim_seconds": float(v["sim_seconds"].mean()) if len(v) else np.nan,
            "comm_seconds": float(v["comm_seconds"].mean()) if len(v) else np.nan,
            "tokens": float(v["tokens"].mean()) if len(v) else np.nan,
            "wall_seconds": float(v["wall_seconds"].sum()) if len(v) else np.nan,
        })  # fmt: skip
    return pd.DataFrame(rows)


def _verdict(r: pd.Series) -> str:
    """'within noise', 'worse' or 'better': the paired change against 2 standard errors over seeds."""
    if pd.isna(r.delta_vs_ref):
        return "-"
    if r.delta_seeds < 2 or pd.isna(r.delta_std):
        return "one seed"
    se = r.delta_std / np.sqrt(r.delta_seeds)
    if abs(r.delta_vs_ref) < 2 * se:
        return "within noise"
    return "worse" if r.delta_vs_ref > 0 else "better"


def _kb(x: float) -> str:
    return "-" if pd.isna(x) else f"{x / 1e3:.0f}"


def _mb(x: float) -> str:
    return "-" if pd.isna(x) else f"{x / 1e6:.1f}"


def _loss(r) -> str:
    s = "-" if pd.isna(r.val_loss_mean) else f"{r.val_loss_mean:.4f}"
    return s + ("" if pd.isna(r.val_loss_std) else f" ± {r.val_loss_std:.4f}")


def _delta(r) -> str:
    if r.variant == REF:
        return "ref"
    if pd.isna(r.delta_vs_ref):
        return "-"
    s = f"{r.delta_vs_ref:+.2%}" + ("" if pd.isna(r.delta_std) else f" ± {r.delta_std:.2%}")
    return s + f", {_verdict(r)}"


def to_markdown(t: pd.DataFrame) -> str:
    """The section's table (the csv also has MB after the warm-start, comm seconds and the seed list)."""
    head = (
        "| variant | seeds | final val loss | vs DiLoCo, paired | peak kB | exchanges | MB sent | utilisation | sim s |"
    )
    lines = [head, "|" + " --- |" * 9]
    for r in t.itertuples():
        seeds = f"{r.seeds}" + (f" ({r.failed} failed)" if r.failed else "")
        util = "-" if pd.isna(r.util_local) else f"{r.compute_utilisation:.1%} ({r.util_local:.1%})"
        lines.append(f"| {r.label} | {seeds} | {_loss(r)} | {_delta(r)} | {_kb(r.peak_bytes)} | "
                     f"{r.exchanges_local:.0f} | {_mb(r.bytes_sent_per_worker)} | {util} | {r.sim_seconds:.1f} |")  # fmt: skip
    return "\n".join(lines)


def key_variants(t: pd.DataFrame) -> tuple[str | None, str | None, str | None]:
    """The plain streaming variant with the most fragments (streaming-P<P>), its overlapped twin
    (streaming-P<P>-tau<τ>) and that one with int4 (…-int4); None where the study lacks one."""
    names = list(t["variant"])
    plain = [v for v in names if v.startswith("streaming-P") and v.count("-") == 1]
    if not plain:
        return None, None, None
    big = max(plain, key=lambda v: int(v.removeprefix("streaming-P")))
    over = next((v for v in names if v.startswith(big + "-tau") and v.count("-") == 2), None)
    int4 = f"{over}-int4" if over and f"{over}-int4" in names else None
    return big, over, int4


def claims(t: pd.DataFrame) -> pd.DataFrame:
    """The paper's claims, what it reports, what these runs measured, whether the claim held here."""
    out = []
    ref = _row(t, REF)
    if ref is None:
        return pd.DataFrame(out, columns=["key", "claim", "paper", "ours", "held"])

    def add(key, claim, paper, ours, held):
        out.append({"key": key, "claim": claim, "paper": paper, "ours": ours, "held": held})

    plain, over, int4 = (_row(t, v) if v else None for v in key_variants(t))
    streams = [r for r in t.itertuples() if r.variant.startswith("streaming-P") and r.variant.count("-") == 1]
    streams = [r for r in streams if not pd.isna(r.val_loss_mean)]
    if streams:
        add("loss", "Streaming (P fragments, no overlap) matches DiLoCo's loss at equal tokens",
            "loss on par with DiLoCo at the same H (main experiments)",
            ", ".join(f"P={r.fragments}: {r.val_loss_mean:.4f} ({_delta(r)})" for r in streams)
            + f" vs DiLoCo {ref.val_loss_mean:.4f}",
            bool(all(r.delta_vs_ref <= TOL_MATCH for r in streams)))  # fmt: skip
    if plain is not None:
        ratio = ref.peak_bytes / plain.peak_bytes
        add("peak", "Streaming divides the peak bytes per exchange by about P",
            "peak bandwidth reduced by the number of fragments (method)",
            f"P={plain.fragments}: {_kb(plain.peak_bytes)} kB vs {_kb(ref.peak_bytes)} kB, {ratio:.1f}x lower; "
            f"total bytes {_mb(plain.bytes_sent_per_worker)} vs {_mb(ref.bytes_sent_per_worker)} MB",
            bool(ratio >= 0.5 * plain.fragments))  # fmt: skip
    if over is not None and plain is not None:
        add("overlap", "Overlapping τ=1 step with α=0.5 mixing costs little loss",
            "τ=1 with α=0.5 about as good as no overlap (overlap and mixing ablations)",
            f"{over.val_loss_mean:.4f} ({_delta(over)}) vs no overlap {plain.val_loss_mean:.4f}",
            bool(over.delta_vs_ref <= TOL_MATCH))  # fmt: skip
    if int4 is not None and over is not None:
        add("int4", "4-bit pseudo-gradients cost little loss",
            "FP4 (E3M0) outer gradients: no significant loss change (quantisation ablation)",
            f"{int4.val_loss_mean:.4f} ({_delta(int4)}) with {over.bytes_local_phase / int4.bytes_local_phase:.1f}x "
            "fewer bytes after the warm-start", bool(int4.delta_vs_ref <= TOL_MATCH))  # fmt: skip
    if over is not None:
        add("utilisation", "Streaming with overlap raises compute utilisation at a given bandwidth",
            "1B-100B models: less bandwidth for the same utilisation (Table 4)",
            f"local phase at 100 Mbit/s: {over.util_local:.1%} vs DiLoCo {ref.util_local:.1%}",
            bool(over.util_local > ref.util_local))  # fmt: skip
    return pd.DataFrame(out)


def claims_markdown(c: pd.DataFrame, scale: str) -> str:
    lines = [f"| claim | Streaming DiLoCo paper | this toolkit, scale={scale} | held? |", "| --- | --- | --- | --- |"]
    for r in c.itertuples():
        lines.append(f"| {r.claim} | {r.paper} | {r.ours} | {'yes' if r.held else 'no'} |")
    return "\n".join(lines)


def latency_budget(rep: Reproduction, t: pd.DataFrame) -> dict[str, str]:
    """Why utilisation goes the way it does: one exchange's price on this network (latency and transfer terms,
    ``locoswarm.netsim``) against the compute between two exchanges, for DiLoCo and the largest-P variant."""
    from locoswarm.config import NetworkConfig, Topology
    from locoswarm.netsim import steady_round

    r0 = rep.runs[(rep.runs["variant"] == REF) & (rep.runs["status"] == "ok")].iloc[0]
    net = NetworkConfig(name=r0["network.name"], bandwidth_mbps=float(r0["network.bandwidth_mbps"]),
                        latency_ms=float(r0["network.latency_ms"]),
                        topology=Topology(r0["network.topology"]))  # fmt: skip
    k, h, step = int(r0["workers"]), int(r0["algorithm.inner_steps"]), float(r0["network.step_seconds"])
    ref = _row(t, REF)
    payload = ref.peak_bytes * k / (2 * (k - 1))  # the ring sends 2(K-1)/K of the payload per worker
    latency = steady_round(net, k, 0.0, 1.0).comm_seconds  # a 1-byte exchange: the latency term alone
    whole = steady_round(net, k, 0.0, payload).comm_seconds
    n = {"latency_s": f"{latency:.2f}", "exchange_s": f"{whole:.2f}", "transfer_s": f"{whole - latency:.2f}",
         "compute_between_s": f"{h * step:.2f}"}  # fmt: skip
    plain = key_variants(t)[0]
    if plain is not None and _row(t, plain) is not None:
        p = _row(t, plain).fragments
        frag = steady_round(net, k, 0.0, payload / p).comm_seconds
        n.update(fragment_exchange_s=f"{frag:.2f}", fragment_compute_s=f"{h * step / p:.2f}", P=str(p))
    return n


def numbers(rep: Reproduction, t: pd.DataFrame, c: pd.DataFrame) -> dict[str, str]:
    """Every number the paper's Streaming section quotes, keyed ``streaming.*``."""
    sc, st = rep.scale, rep.plan["streaming"]
    ok = rep.runs[rep.runs["status"] == "ok"]
    r0 = ok.iloc[0] if len(ok) else None
    n: dict[str, str] = {
        "scale": rep.plan["scale"],
        "description": rep.plan["description"],
        "n_runs": str(len(rep.runs)),
        "n_ok": str(len(ok)),
        "n_failed": str(len(rep.runs) - len(ok)),
        "seeds": str(int(t["seeds"].max())) if len(t) else "0",
        "seed_list": ", ".join(str(s) for s in sorted(ok["seed"].unique())),
        "workers": str(sc["workers"]),
        "H": str(sc["H"]),
        "max_steps": str(sc["max_steps"]),
        "warmup_sync": str(sc["warmup_sync"]),
        "fragments": ", ".join(str(p) for p in st["fragments"]),
        "tau": str(st["overlap_steps"]),
        "alpha": f"{st['mixing']:g}",
        "pattern": st["pattern"],
        "step_ms": f"{st['step_seconds'] * 1e3:.4g}",
        "step_note": st["step_note"],
        "network": rep.plan["network"],
        "bandwidth_mbps": f"{float(r0['network.bandwidth_mbps']):g}" if r0 is not None else "-",
        "latency_ms": f"{float(r0['network.latency_ms']):g}" if r0 is not None else "-",
        "cpu_minutes": f"{ok['wall_seconds'].sum() / 60:.1f}",
        "tol_match": f"{TOL_MATCH:.0%}",
        "claims_total": str(len(c)),
        "claims_held": str(int(c["held"].sum())) if len(c) else "0",
        "all_exchanges_logged": "yes" if len(t) and t["all_exchanges_logged"].all() else "no",
        "git_sha": str(ok["git_sha"].iloc[0])[:12] if len(ok) else "-",
        "notes": "; ".join(rep.plan.get("notes", [])) or "none",
    }
    for r in t.itertuples():
        key = r.variant.replace("-", "_")
        n[f"{key}.label"] = r.label
        n[f"{key}.loss"] = "-" if pd.isna(r.val_loss_mean) else f"{r.val_loss_mean:.4f}"
        n[f"{key}.loss_std"] = "-" if pd.isna(r.val_loss_std) else f"{r.val_loss_std:.4f}"
        n[f"{key}.delta"] = "-" if pd.isna(r.delta_vs_ref) else f"{r.delta_vs_ref:+.2%}"
        n[f"{key}.delta_std"] = "-" if pd.isna(r.delta_std) else f"{r.delta_std:.2%}"
        n[f"{key}.verdict"] = _verdict(r)
        n[f"{key}.worse_seeds"] = f"{r.delta_worse_seeds} of {r.delta_seeds}"
        n[f"{key}.peak_kb"] = _kb(r.peak_bytes)
        n[f"{key}.total_mb"] = _mb(r.bytes_sent_per_worker)
        n[f"{key}.local_mb"] = _mb(r.bytes_local_phase)
        n[f"{key}.exchanges"] = f"{r.exchanges_local:.0f}"
        n[f"{key}.util"] = "-" if pd.isna(r.compute_utilisation) else f"{r.compute_utilisation:.1%}"
        n[f"{key}.util_local"] = "-" if pd.isna(r.util_local) else f"{r.util_local:.1%}"
        n[f"{key}.sim_s"] = f"{r.sim_seconds:.1f}"
        n[f"{key}.comm_s"] = f"{r.comm_seconds:.1f}"
    ref = _row(t, REF)
    plain, over, _ = key_variants(t)
    for kind, v in (("plain", plain), ("overlap", over)):
        r = _row(t, v) if v else None
        if ref is not None and r is not None:
            n[f"{kind}"] = v.replace("-", "_")
            n[f"{kind}.peak_ratio"] = f"{ref.peak_bytes / r.peak_bytes:.1f}"
            n[f"{kind}.P"] = str(r.fragments)
    for key in ("loss", "peak", "overlap", "int4", "utilisation"):
        n[f"claim.{key}"] = "could not be checked (its runs are missing or failed)"
    for r in c.itertuples():
        n[f"claim.{r.key}"] = "held" if r.held else "did not hold"
    if ref is not None:
        n.update({f"net.{k}": v for k, v in latency_budget(rep, t).items()})
    return {f"streaming.{k}": v for k, v in n.items()}


def figure(rep: Reproduction, t: pd.DataFrame, path: Path) -> Path:
    """After the warm-start (seed 0, every variant): validation loss against the bytes each worker sent and against
    simulated time, and the bytes of each exchange."""
    import matplotlib.pyplot as plt

    plots.style()
    df = runs_table(rep)
    warm = int(rep.scale["warmup_sync"])
    seed = int(df["seed"].min()) if len(df) else 0
    fig = plt.figure(figsize=(10, 7.2))
    grid = fig.add_gridspec(2, 2, height_ratios=[1.25, 1])
    axes = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])]
    for variant in t["variant"]:
        r = df[(df["variant"] == variant) & (df["seed"] == seed)]
        if r.empty:
            continue
        m = load_metrics(r["run_dir"].iloc[0])
        m["sim_seconds"] = m["sim_seconds"].ffill()
        m = plots.with_cumulative_bytes(m)
        at_warm = m[m["step"] <= warm].iloc[-1]  # the last row of the warm-start: the local phase starts here
        v = plots.val_rows(m)
        v = v[v["step"] > warm]
        lab = r["label"].iloc[0]
        (line,) = axes[0].plot((v["bytes_cum"] - at_warm["bytes_cum"]) / 1e6, v["val_loss"], marker="o", ms=2.5,
                               lw=1.3, label=lab)  # fmt: skip
        axes[1].plot(v["sim_seconds"] - at_warm["sim_seconds"], v["val_loss"], marker="o", ms=2.5, lw=1.3, label=lab)
        x = exchanges_by_step(m, warm)
        axes[2].plot(x["step"], x["bytes"] / 1e3, ls="none", marker="_", ms=7, mew=1.6, color=line.get_color(),
                     label=lab)  # fmt: skip
    axes[0].set(xlabel="MB sent per worker after the warm-start", ylabel=plots.LOSS_LABEL,
                title=f"Validation loss vs bytes (seed {seed})")  # fmt: skip
    axes[1].set(xlabel="simulated seconds after the warm-start", ylabel=plots.LOSS_LABEL,
                title=f"Validation loss vs simulated time (seed {seed})")  # fmt: skip
    axes[2].set(xlabel="inner step", ylabel="kB sent per worker", title="Bytes of each exchange after the warm-start")
    axes[2].set_ylim(bottom=0)
    axes[0].legend(frameon=False, fontsize=7)
    return plots.save(fig, path)


def exchanges_by_step(m: pd.DataFrame, warmup: int) -> pd.DataFrame:
    """(step, bytes) of every exchange after the warm-start, from a run's metrics rows."""
    local = m[m["step"] > warmup]
    if "fragment_bytes_sent" in local:
        rows = [(s, b) for s, lst in zip(local["step"], local["fragment_bytes_sent"], strict=True)
                if isinstance(lst, list) for b in lst]  # fmt: skip
    else:
        rows = [(s, b) for s, b in zip(local["step"], local["bytes_sent"].fillna(0.0), strict=True) if b > 0]
    return pd.DataFrame(rows, columns=["step", "bytes"])


def write_report(out: str | Path, report_dir: str | Path) -> Path:
    rep = load(out)
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    t = study_table(rep)
    t.to_csv(report_dir / "streaming.csv", index=False)
    (report_dir / "streaming.md").write_text(f"### Streaming DiLoCo vs DiLoCo at equal tokens\n\n{to_markdown(t)}\n")
    c = claims(t)
    c.to_csv(report_dir / "claims.csv", index=False)
    (report_dir / "claims.md").write_text(claims_markdown(c, rep.plan["scale"]) + "\n")
    (report_dir / "numbers.json").write_text(json.dumps(numbers(rep, t, c), indent=2) + "\n")
    figure(rep, t, report_dir / "figures" / "streaming.png")
    return report_dir
