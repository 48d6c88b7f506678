"""locoswarm.analysis on the committed fixture sweep: one row per run, and a comparison table whose run labels
tell the grid points apart."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from locoswarm.analysis import comparison_table, load_runs, run_labels

FIXTURE = Path(__file__).parent / "fixtures" / "sweep"


def test_load_runs_reads_config_summary_and_overrides():
    df = load_runs(FIXTURE)
    assert len(df) == 7
    assert {"compression.name", "final_val_loss", "run_dir", "overrides"} <= set(df.columns)
    assert all(isinstance(o, list) and o for o in df["overrides"])


def test_unique_names_are_kept_and_repeated_names_show_what_differs():
    df = load_runs(FIXTURE)
    assert run_labels(df) == [str(n) for n in df["name"]]  # the fixture's names are unique already
    grid = pd.DataFrame({
        "name": ["diloco"] * 3,
        "overrides": [["compression=topk", "seed=0"], ["compression=int8", "seed=0"], ["compression=topk", "seed=1"]],
    })  # fmt: skip
    assert run_labels(grid) == ["compression=topk seed=0", "compression=int8 seed=0", "compression=topk seed=1"]
    table = comparison_table(load_runs(FIXTURE))
    assert len(table.splitlines()) == 2 + 7 and "ddp" in table
