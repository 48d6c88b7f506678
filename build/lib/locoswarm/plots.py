"""Plots shared by the notebooks and the paper: one function per figure kind, readable defaults.

Every function takes data from ``locoswarm.analysis`` (``load_runs`` rows, ``load_metrics`` frames) and an optional
matplotlib ``ax``; it labels its axes with units, puts bytes on a log scale, and returns the ``ax``. ``style()``
sets the house defaults once; ``save(fig, path)`` writes a tight PNG (and PDF when asked).

    from locoswarm import plots
    from locoswarm.analysis import load_runs
    plots.style()
    runs = load_runs("multirun/h_sweep")
    plots.loss_vs_bytes(runs, label="name")
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from locoswarm.analysis import load_metrics

LOSS_LABEL = "validation loss (nats/token)"
TRAIN_LOSS_LABEL = "training loss (nats/token)"
TOKENS_LABEL = "tokens seen (all workers)"
BYTES_LABEL = "bytes sent per worker (log scale)"


def style() -> None:
    """House defaults: larger fonts, light grid, no top/right spines, a colour-blind-safe cycle."""
    plt.rcParams.update(
        {
            "figure.figsize": (6.0, 3.8),
            "figure.dpi": 110,
            "savefig.dpi": 150,
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.fontsize": 8,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.prop_cycle": plt.cycler(color=plt.get_cmap("tab10").colors),
        }
    )


def _ax(ax):
    if ax is None:
        _, ax = plt.subplots()
    return ax


def human_bytes(x: float, _pos=None) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:g} {unit}"
    return f"{x:g} B"


def human_count(x: float, _pos=None) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:g}{unit}"
    return f"{x:g}"


def _bytes_axis(axis) -> None:
    """Log-scale bytes with 1-2-5 ticks labelled in kB/MB/GB (no 2x10^7 minor labels)."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(human_bytes))
    axis.set_minor_formatter(NullFormatter())


def with_cumulative_bytes(metrics: pd.DataFrame) -> pd.DataFrame:
    """Adds ``bytes_cum``: bytes each worker sent up to and including each row (sync rows carry ``bytes_sent``)."""
    m = metrics.copy()
    sent = m["bytes_sent"] if "bytes_sent" in m else pd.Series(0.0, index=m.index)
    m["bytes_cum"] = sent.fillna(0.0).cumsum()
    return m


def val_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    m = with_cumulative_bytes(metrics)
    return m[m["val_loss"].notna()] if "val_loss" in m else m.iloc[0:0]


def _iter_runs(runs: pd.DataFrame, label: str) -> Iterable[tuple[str, pd.DataFrame]]:
    for _, r in runs.iterrows():
        if r.get("status", "ok") != "ok":
            continue
        yield str(r[label]), load_metrics(r["run_dir"])


def loss_vs_tokens(runs: pd.DataFrame, label: str = "name", ax=None, train: bool = False):
    """Validation loss (or training loss, ``train=True``) against tokens seen, one line per run."""
    ax = _ax(ax)
    for name, m in _iter_runs(runs, label):
        if train:
            ax.plot(m["tokens"], m["loss"], label=name, lw=1.2)
        else:
            v = val_rows(m)
            ax.plot(v["tokens"], v["val_loss"], marker="o", ms=2.5, label=name, lw=1.4)
    ax.set_xlabel(TOKENS_LABEL)
    ax.set_ylabel(TRAIN_LOSS_LABEL if train else LOSS_LABEL)
    ax.xaxis.set_major_formatter(FuncFormatter(human_count))
    ax.legend(frameon=False)
    return ax


def loss_vs_bytes(runs: pd.DataFrame, label: str = "name", ax=None):
    """Validation loss against the cumulative bytes each worker sent: the communication cost of quality."""
    ax = _ax(ax)
    for name, m in _iter_runs(runs, label):
        v = val_rows(m)
        v = v[v["bytes_cum"] > 0]
        ax.plot(v["bytes_cum"], v["val_loss"], marker="o", ms=2.5, label=name, lw=1.4)
    ax.set_xscale("log")
    _bytes_axis(ax.xaxis)
    ax.set_xlabel(BYTES_LABEL)
    ax.set_ylabel(LOSS_LABEL)
    ax.legend(frameon=False)
    return ax


def pareto_frontier(
    runs: pd.DataFrame, cost: str = "bytes_sent_total", quality: str = "final_val_loss"
) -> pd.DataFrame:
    """The runs no other run beats on both cost and quality (lower is better for both), sorted by cost."""
    ok = runs[(runs.get("status", "ok") == "ok") & runs[quality].notna()].sort_values([cost, quality])
    best = np.inf
    keep = []
    for idx, q in zip(ok.index, ok[quality], strict=True):
        if q < best:
            keep.append(idx)
            best = q
    return ok.loc[keep]


def pareto(runs: pd.DataFrame, label: str = "name", ax=None, cost: str = "bytes_sent_total",
           quality: str = "final_val_loss"):  # fmt: skip
    """Every run as a point (bytes sent per worker vs final validation loss) and the Pareto frontier as a line."""
    ax = _ax(ax)
    ok = runs[(runs.get("status", "ok") == "ok") & runs[quality].notna()]
    front = pareto_frontier(ok, cost, quality)
    ax.scatter(ok[cost], ok[quality], s=22, color="0.55", label="runs", zorder=2)
    ax.plot(front[cost], front[quality], "-o", color="C3", ms=5, lw=1.6, label="Pareto frontier", zorder=3)
    for _, r in ok.iterrows():
        ax.annotate(str(r[label]), (r[cost], r[quality]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    _bytes_axis(ax.xaxis)
    ax.set_xlabel(BYTES_LABEL)
    ax.set_ylabel("final " + LOSS_LABEL)
    ax.legend(frameon=False)
    return ax


def bars(table: pd.DataFrame, label: str = "variant", mean: str = "val_loss_mean", err: str | None = "val_loss_std",
         ax=None, reference: str | None = None, ref_col: str | None = None, ylabel: str = "final " + LOSS_LABEL):  # fmt: skip
    """One bar per variant with its spread over seeds; the ``reference`` row (matched in ``ref_col``, default the
    label column) is red and drawn as a dashed line across."""
    ref_col = ref_col or label
    ax = _ax(ax)
    x = np.arange(len(table))
    yerr = table[err].fillna(0.0).to_numpy() if err and err in table else None
    colors = ["C3" if reference is not None and v == reference else "C0" for v in table[ref_col]]
    ax.bar(x, table[mean], yerr=yerr, color=colors, capsize=3, width=0.65)
    if reference is not None and reference in set(table[ref_col]):
        ax.axhline(float(table.loc[table[ref_col] == reference, mean].iloc[0]), ls="--", color="C3", lw=1)
    lo = float((table[mean] - (yerr if yerr is not None else 0)).min())
    hi = float((table[mean] + (yerr if yerr is not None else 0)).max())
    pad = max(hi - lo, 1e-3) * 0.35
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xticks(x, table[label], rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.grid(axis="x", visible=False)
    return ax


# ------------------------------------------------------------------------------------------------ single run


def sync_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    """The rows logged at DiLoCo outer steps (they carry pseudo-gradient statistics)."""
    return metrics[metrics["pg_norm"].notna()] if "pg_norm" in metrics else metrics.iloc[0:0]


def worker_losses(metrics: pd.DataFrame, ax=None):
    """Each worker's training loss and the spread between them: how far the replicas drift apart."""
    ax = _ax(ax)
    rows = metrics[metrics["worker_loss"].notna()] if "worker_loss" in metrics else metrics.iloc[0:0]
    losses = np.array(rows["worker_loss"].tolist(), dtype=float) if len(rows) else np.zeros((0, 0))
    for k in range(losses.shape[1] if losses.ndim == 2 else 0):
        ax.plot(rows["step"], losses[:, k], lw=1.0, label=f"worker {k}")
    ax.set_xlabel("inner step")
    ax.set_ylabel(TRAIN_LOSS_LABEL)
    if losses.size:
        spread = ax.twinx()
        spread.plot(rows["step"], losses.max(1) - losses.min(1), color="k", ls=":", lw=1.2, label="max - min")
        spread.set_ylabel("worker loss spread (nats)")
        spread.grid(False)
        spread.legend(frameon=False, loc="upper center")
    ax.legend(frameon=False, ncol=2)
    return ax


def pseudo_gradient_norms(metrics: pd.DataFrame, ax=None):
    """Each worker's pseudo-gradient L2 norm at every outer step, and the norm of their average (what the outer
    optimiser receives): the gap between the two shows how much the workers' updates cancel."""
    ax = _ax(ax)
    rows = sync_rows(metrics)
    norms = np.array(rows["pg_norm"].tolist(), dtype=float) if len(rows) else np.zeros((0, 0))
    for k in range(norms.shape[1] if norms.ndim == 2 else 0):
        ax.plot(rows["outer_step"], norms[:, k], lw=1.0, marker=".", label=f"worker {k}")
    if "outer_grad_norm" in rows:
        ax.plot(rows["outer_step"], rows["outer_grad_norm"], color="k", lw=1.8, label="averaged (outer gradient)")
    ax.set_xlabel("outer step")
    ax.set_ylabel("pseudo-gradient L2 norm")
    ax.set_yscale("log")
    ax.legend(frameon=False, ncol=2)
    return ax


def pseudo_gradient_cosine(metrics: pd.DataFrame, ax=None):
    """Mean pairwise cosine similarity between the workers' pseudo-gradients at each outer step."""
    ax = _ax(ax)
    rows = sync_rows(metrics)
    if "pg_cosine" in rows:
        ax.plot(rows["outer_step"], rows["pg_cosine"], marker="o", ms=3, lw=1.4)
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_ylim(min(-0.05, float(rows["pg_cosine"].min()) - 0.05) if len(rows) else -0.05, 1.02)
    ax.set_xlabel("outer step")
    ax.set_ylabel("mean pairwise cosine similarity")
    return ax


def outer_update(metrics: pd.DataFrame, ax=None):
    """The outer gradient's norm (averaged pseudo-gradient) against the ratio it keeps of the workers' mean norm:
    1 means the workers agree, 1/sqrt(K) means their updates are orthogonal."""
    ax = _ax(ax)
    rows = sync_rows(metrics)
    if len(rows) and "outer_grad_norm" in rows:
        mean_norm = np.array(rows["pg_norm"].tolist(), dtype=float).mean(1)
        ax.plot(rows["outer_step"], rows["outer_grad_norm"], marker="o", ms=3, lw=1.4, label="outer gradient norm")
        ratio = ax.twinx()
        ratio.plot(rows["outer_step"], rows["outer_grad_norm"] / mean_norm, color="C1", ls="--", lw=1.2,
                   label="outer / mean worker norm")  # fmt: skip
        ratio.set_ylabel("outer / mean worker norm", color="C1")
        ratio.set_ylim(0, 1.05)
        ratio.grid(False)
    ax.set_xlabel("outer step")
    ax.set_ylabel("outer gradient L2 norm")
    return ax


def outer_optimizer_state(metrics: pd.DataFrame, ax=None):
    """What the outer optimiser did with the outer gradient: the norm of the step it applied to the anchor and of
    its momentum buffer (Nesterov/SGD; Adam's first moment). A step much larger than the outer gradient is
    momentum carrying the anchor on; a momentum norm that keeps growing is an outer lr/momentum set too high."""
    ax = _ax(ax)
    rows = sync_rows(metrics)
    for key, label, style in [("outer_grad_norm", "outer gradient (input)", dict(color="0.5", lw=1.0, ls=":")),
                              ("outer_update_norm", "update applied to the anchor", dict(color="C0", lw=1.6)),
                              ("outer_momentum_norm", "momentum buffer", dict(color="C3", lw=1.4, ls="--"))]:  # fmt: skip
        if len(rows) and key in rows and rows[key].notna().any():
            ax.plot(rows["outer_step"], rows[key], marker=".", label=label, **style)
    ax.set_xlabel("outer step")
    ax.set_ylabel("L2 norm")
    ax.legend(frameon=False)
    return ax


def save(fig, path: str | Path, pdf: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"))
    if pdf:
        fig.savefig(path.with_suffix(".pdf"))
    plt.close(fig)
    return path.with_suffix(".png")
