"""experiments/reproduce_attacks.py: the plan is every attack x aggregator x n against each aggregator's clean run
(only the aggregator and the faults differ), a shrunk study runs, confirms its small cells, resumes and fills every
attacks macro of the paper; the committed results agree with the numbers drawn from them."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "reproduce_attacks.py"
COMMITTED = REPO / "paper" / "results" / "attacks_ci"
sys.path.insert(0, str(REPO / "experiments"))
sys.path.insert(0, str(REPO / "paper"))


def _value(overrides: list[str], key: str) -> str | None:
    return next((o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")), None)


def test_plan_is_every_attack_and_aggregator_against_the_same_clean_run() -> None:
    from reproduce_attacks import ATTACKS, STUDY, cell, grid, study_scale

    for name in STUDY:
        scale, at = study_scale(name)
        runs = grid(scale, at)
        assert len({r.run_id for r in runs}) == len(runs)
        assert scale.workers == 8 and at.byzantine == [1, 2] and at.attacks == ATTACKS
        assert list(at.aggregators) == ["mean", "trimmed_mean", "median", "centered_clip"]
        # trimmed_mean can trim n=2 of 8 at each end (the default trim 0.1 would trim none)
        trim = float(_value(at.aggregators["trimmed_mean"], "aggregator.trim"))
        assert math.floor(trim * scale.workers) >= max(at.byzantine)
        variants = {r.variant for r in runs}
        for agg in at.aggregators:
            assert cell(agg) in variants
            assert {cell(agg, a, n) for a in ATTACKS for n in at.byzantine} <= variants
        # clean runs have the confirm seeds from the start; attacked cells only the base seeds
        assert {r.seed for r in runs if r.variant == "median-clean"} == set(range(at.seeds + at.confirm_seeds))
        assert {r.seed for r in runs if r.variant == "median-alie-n2"} == set(range(at.seeds))
        ref = next(r for r in runs if r.variant == "mean-clean" and r.seed == 0)
        for r in runs:  # equal tokens, same model, K, H, warm-start: only the aggregator and faults/verify differ
            differs = {o.split("=", 1)[0] for o in set(r.overrides) ^ set(ref.overrides)}
            assert differs <= {"aggregator", "name", "seed"} | {
                k for k in differs if k.startswith(("aggregator.", "faults.", "verify."))
            }, (name, r.run_id, differs)
        attacked = next(r for r in runs if r.variant == "mean-nan-n2")
        assert _value(attacked.overrides, "faults.byzantine") == "2"
        assert _value(attacked.overrides, "faults.attack") == "'nan'"  # quoted: a bare nan is a float to Hydra
        verify = {r.variant for r in runs if "verify" in r.studies}
        assert verify == {"mean-lazy", "mean-lazy-verify"}


def test_every_cell_composes_with_its_attack_and_aggregator() -> None:
    from reproduce_attacks import grid, study_scale
    from reproduce_diloco import compose

    scale, at = study_scale("ci")
    seen = set()
    for r in grid(scale, at):
        if r.seed or (r.variant.endswith("-n1") and not r.variant.startswith("mean-")):  # n=1 once is enough
            continue
        cfg = compose(r.overrides)
        agg, rest = r.variant.split("-", 1)
        seen.add((str(cfg.aggregator.name.value), str(cfg.faults.attack.value), cfg.faults.byzantine))
        if "verify" in r.studies:
            assert cfg.faults.lazy == 1 and cfg.aggregator.name.value == "mean"
            assert cfg.verify.fraction == (at.verify_fraction if r.variant.endswith("verify") else 0.0)
            continue
        assert cfg.aggregator.name.value == agg and cfg.workers == 8
        if agg == "trimmed_mean":
            assert cfg.aggregator.trim == 0.25
        if rest != "clean":
            attack, n = rest.rsplit("-n", 1)
            assert cfg.faults.attack.value == attack and cfg.faults.byzantine == int(n)
    assert ("mean", "nan", 1) in seen and ("centered_clip", "alie", 2) in seen


def test_confirm_adds_seeds_only_to_cells_close_to_their_clean_run() -> None:
    from reproduce_attacks import confirm, grid, study_scale

    scale, at = study_scale("ci")
    first = grid(scale, at)
    losses = {"mean-clean-s0": 2.0, "mean-nan-n1-s0": 5.5, "mean-signflip-n1-s0": 2.02, "median-clean-s0": 2.1,
              "median-scale-n2-s0": 2.29, "median-alie-n1-s0": 2.5}  # fmt: skip
    runs, why = confirm(scale, at, first, losses)
    assert set(why) == {"mean-signflip-n1", "median-scale-n2"}
    assert sorted(r.run_id for r in runs) == ["mean-signflip-n1-s1", "mean-signflip-n1-s2",
                                              "median-scale-n2-s1", "median-scale-n2-s2"]  # fmt: skip


def run_script(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def _check_section(runs: Path, out: Path) -> dict[str, str]:
    """paper/build.py's attacks section from ``runs``: every attacks macro of report.md is defined (a study of a
    subset of the attacks defines those of its attacks)."""
    import build
    from reproduce_attacks import ATTACKS

    (out / "tables").mkdir(parents=True, exist_ok=True)
    nums, tables = build.attacks_section(runs, out)
    used = set(re.findall(r"\{\{\s*(attacks\.[\w.\-]+)\s*\}\}", (REPO / "paper" / "report.md").read_text()))
    ran = json.loads((runs / "plan.json").read_text())["attacks"]["attacks"]
    used = {m for m in used if not any(f".{a}." in m for a in set(ATTACKS) - set(ran))}
    assert used and used <= set(nums), sorted(used - set(nums))
    filled = build.fill("{{table:attacks}}\n{{table:attacks_rejections}}\n{{table:attacks_verify}}", nums, tables)
    assert "{{" not in filled and "centered clip" in filled and "trim 0.25" in filled
    assert (out / "figures" / "attacks.png").stat().st_size > 10_000
    return nums


def test_the_papers_attacks_section_fills_from_the_committed_results(tmp_path: Path) -> None:
    nums = _check_section(COMMITTED, tmp_path)
    assert nums["attacks.scale"] == "ci" and nums["attacks.workers"] == "8" and nums["attacks.trimmed_values"] == "2"


@pytest.mark.slow
def test_shrunk_study_runs_confirms_resumes_and_fills_the_papers_attacks_section(tmp_path: Path) -> None:
    out_dir = tmp_path / "attacks"
    args = ["--scale", "ci", "--out", str(out_dir), "--max-steps", "24", "--attacks", "nan,signflip",
            "--confirm-seeds", "1", "--data", "synthetic", "--no-progress"]  # fmt: skip
    first = run_script(*args)
    plan = json.loads((out_dir / "plan.json").read_text())
    n = len(plan["runs"])
    # 4 aggregators x (2 clean seeds + 2 attacks x 2 n) + 2 x 2 lazy runs, plus one seed per confirmed cell
    assert n == 4 * (2 + 4) + 4 + len(plan["confirmed"]) and first.stdout.count(" val loss ") >= n
    for r in plan["runs"]:
        summary = json.loads((out_dir / "runs" / r["run_id"] / "summary.json").read_text())
        assert summary["status"] == "ok", (r["run_id"], summary.get("error"))
    # the robust aggregators see the NaN rows and exclude exactly them; mean's all-reduce rejects every round whole
    table = {row["variant"]: row for row in _csv(out_dir / "report" / "attacks.csv")}
    assert table["median-nan-n2"]["rejected_ranks"] == "6 7" and table["mean-nan-n1"]["rejected_ranks"] == " ".join(
        str(r) for r in range(8)
    )
    assert "median-nan-n1" in plan["confirmed"] and "mean-nan-n1" not in plan["confirmed"]
    verify = _csv(out_dir / "report" / "verify.csv")
    assert all(row["caught_ranks"] in ("", "7") for row in verify)

    second = run_script(*args)  # resumable: every finished run is skipped, the confirm stage finds the same cells
    assert second.stdout.count("skipped: finished earlier") == n and "at a time" not in second.stdout
    assert json.loads((out_dir / "plan.json").read_text())["runs"] == plan["runs"]

    _check_section(out_dir, tmp_path / "paper")


def _csv(path: Path) -> list[dict]:
    import pandas as pd

    return pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")


def test_committed_results_agree_with_the_numbers_drawn_from_them() -> None:
    """The numbers the paper quotes are the run dirs' numbers: losses, rejections, which runs have extra seeds, and
    mean's all-reduce rejecting every round of a NaN attack whole while the robust aggregators exclude the attacker."""
    import numpy as np
    from attacks_report import cells_table, load, numbers, verify_table

    rep = load(COMMITTED)
    assert set(rep.runs["status"]) <= {"ok", "failed"}
    failed = rep.runs[rep.runs["status"] == "failed"]
    assert failed.empty or all("diverged" in str(e) for e in failed["error"])  # a diverged run is an attack's result
    t = cells_table(rep)
    nums = numbers(rep, t, verify_table(rep))
    for r in t.itertuples():
        summaries = [json.loads(p.read_text()) for p in (COMMITTED / "runs").glob(f"{r.variant}-s[0-9]*/summary.json")]
        assert len(summaries) == r.planned
        ok = [s["final_val_loss"] for s in summaries if s["status"] == "ok"]
        key = f"attacks.{r.aggregator}." + ("clean" if r.attack == "none" else f"{r.attack}.n{r.n}")
        if ok:
            assert nums[f"{key}.loss"] == f"{np.mean(ok):.4f}"
        assert nums[f"{key}.rejections"] == f"{np.mean([s['rejections'] for s in summaries]):.0f}"
        if r.attack == "none":
            assert r.planned == 3
        else:
            assert r.planned == (3 if r.variant in rep.plan["confirmed"] else 1)
    rounds = int(nums["attacks.rounds"])
    for n in (1, 2):
        mean_nan = json.loads((COMMITTED / "runs" / f"mean-nan-n{n}-s0" / "summary.json").read_text())
        assert mean_nan["rejections"] == 8 * rounds and mean_nan["status"] == "ok"
        for agg in ("trimmed_mean", "median", "centered_clip"):
            s = json.loads((COMMITTED / "runs" / f"{agg}-nan-n{n}-s0" / "summary.json").read_text())
            assert s["rejections"] == n * rounds and s["status"] == "ok"
    assert nums["attacks.mean.nan.every_round_rejected"] == "yes"
    assert nums["attacks.verify.false_positives"] == "0"


@pytest.mark.slow
def test_paper_builds_with_the_committed_attacks_results(tmp_path: Path) -> None:
    out = subprocess.run(["make", "-C", "paper", f"OUT={tmp_path}"], capture_output=True, text=True, timeout=300,
                         cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    text = (tmp_path / "report.md").read_text()
    assert "{{" not in text and "## 7. Attacks" in text and "## 6. Streaming DiLoCo" in text
    numbers = json.loads((tmp_path / "numbers.json").read_text())
    for key in ("attacks.mean.clean.loss", "attacks.median.nan.n2.loss", "attacks.verify.phases"):
        assert numbers[key] in text
    assert (tmp_path / "figures" / "attacks.png").exists()
