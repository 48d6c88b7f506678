"""locoswarm.analysis on the committed fixture sweep: one row per run, and a comparison table whose run labels
tell the grid points apart."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from locoswarm.analysis import AT_SCALE, comparison_table, load_runs, run_labels, tradeoff_summary

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


def test_the_tradeoff_is_said_in_sentences_against_ddp():
    df = load_runs(FIXTURE)
    lines = tradeoff_summary(df).splitlines()
    assert len(lines) == 6 + 1 and lines[-1] == AT_SCALE  # every diloco run against the one ddp run, then the paper
    ddp = df[df["name"] == "ddp"].iloc[0]
    h5 = df[df["name"] == "diloco-H5-int8"].iloc[0]
    line = next(x for x in lines if x.startswith("diloco-H5-int8 "))
    ratio = ddp["bytes_sent_total"] / h5["bytes_sent_total"]
    gap = ddp["final_val_loss"] - h5["final_val_loss"]
    assert f"sent {ratio:.3g}x fewer bytes" in line and f"ended {gap:.3f} nats" in line and "ahead of it" in line
    assert "after 4 outer steps (4 of its 8 exchanges were the synchronous warm-start)" in line
    assert tradeoff_summary(df[df["name"] != "ddp"]) == ""  # nothing to set the runs against
    later = df.copy()
    later.loc[later["name"] == "diloco-H5-int8", "tokens"] *= 2  # not at equal tokens: left out
    assert len(tradeoff_summary(later).splitlines()) == 5 + 1
