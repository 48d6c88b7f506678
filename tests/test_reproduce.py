"""experiments/reproduce_diloco.py end to end (shrunk), resumable; the paper builds a PDF from run dirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "reproduce_diloco.py"
COMMITTED = REPO / "paper" / "results" / "ci"
sys.path.insert(0, str(REPO / "experiments"))


def test_plan_covers_every_study_with_equal_tokens_and_enough_rounds() -> None:
    from reproduce_diloco import SCALES, plan

    for name, scale in SCALES.items():
        runs = plan(scale, scale.seeds_main, scale.seeds_ablation)
        studies = {s for r in runs for s in r.studies}
        assert studies == {"main", "outer", "H", "K", "compression", "non-iid", "warm-start"}, name
        assert len({r.run_id for r in runs}) == len(runs)
        assert all(f"train.max_steps={scale.max_steps}" in r.overrides for r in runs)  # equal tokens at equal K
        assert (scale.max_steps - scale.warmup_sync) / scale.H >= 10, f"{name}: too few outer rounds"
        assert 0.15 <= scale.warmup_sync / scale.max_steps <= 0.35, f"{name}: warm-start like the paper's 24k/88k"
        main = [r for r in runs if "main" in r.studies]
        assert len({r.seed for r in main}) == scale.seeds_main


def test_a_partly_run_scale_shows_its_finished_claims_and_says_which_are_not(tmp_path: Path) -> None:
    """The two-scale table of the paper reads a scale whose runs are still training: the claims whose runs all
    finished get the measurement and a verdict, the others say they are not finished, and the header counts runs."""
    import shutil

    from diloco_report import CLAIM_KEYS, gap_by_h, load, scales_markdown

    partial = tmp_path / "partial"
    shutil.copytree(COMMITTED, partial)
    # the outer-optimiser study lacks one seed and the H study its largest H: either could still give a verdict
    # from what finished (two seeds; the two smaller H) that the missing run might overturn
    for run in ("outer-adam-s2", "H45-s0"):
        shutil.rmtree(partial / "runs" / run)
    whole, part = load(COMMITTED), load(partial)
    n = len(whole.runs)
    table = scales_markdown({"whole": whole, "part": part}).splitlines()
    assert table[0] == f"| claim | DiLoCo paper | whole ({n} of {n} runs) | part ({n - 2} of {n} runs) |"
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in table[2:]]
    assert len(cells) == len(CLAIM_KEYS)
    for claim, _paper, a, b in cells:
        if claim.startswith(("Outer Nesterov", "Quality degrades only slowly as H grows")):
            assert a.endswith("held)") and b == "not finished yet", claim
        else:
            assert a == b and a.endswith("held)"), claim  # the same runs: the same measurement and verdict
    # DiLoCo's gap to DDP by H, on the seeds every H finished (seed 0: the H study's one seed)
    text, trend = gap_by_h(whole)
    ddp = json.loads((COMMITTED / "runs" / "ddp-s0" / "summary.json").read_text())["final_val_loss"]
    gaps = [json.loads((COMMITTED / "runs" / r / "summary.json").read_text())["final_val_loss"] / ddp - 1
            for r in ("H6-s0", "diloco-s0", "H45-s0")]  # fmt: skip
    assert text == f"H=6: {gaps[0]:+.2%}, H=18: {gaps[1]:+.2%}, H=45: {gaps[2]:+.2%} (seed 0)"
    assert trend == ("grows with H" if gaps[0] < gaps[1] < gaps[2] else "does not grow steadily with H")
    assert gap_by_h(part)[0] == "not finished yet"


def test_only_trains_the_named_variants_and_keeps_the_whole_plan(tmp_path: Path) -> None:
    """--only finishes a study first (the small scale is run in parts): it trains just those variants, the plan
    and the report still list every run, and a variant not in the plan is an error that names it."""
    out = tmp_path / "part"
    args = ["--scale", "ci", "--out", str(out), "--max-steps", "12", "--seeds", "1", "--data", "synthetic",
            "--no-progress", "--jobs", "1"]  # fmt: skip
    run = run_script(*args, "--only", "K2,single")
    trained = sorted(p.parent.name for p in (out / "runs").glob("*/summary.json"))
    assert trained == ["K2-s0", "single-s0"]
    assert run.stdout.index("K2-s0") < run.stdout.index("single-s0")  # in the order given
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["runs"]) > 10
    numbers = json.loads((out / "report" / "numbers.json").read_text())
    assert numbers["n_ok"] == "2" and numbers["n_runs"] == str(len(plan["runs"]))
    bad = subprocess.run([sys.executable, str(SCRIPT), *args, "--only", "K2,H999"], capture_output=True, text=True,
                         timeout=300, cwd=REPO)  # fmt: skip
    assert bad.returncode != 0 and "--only: no variant H999" in bad.stderr


def run_script(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env={**os.environ})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_reproduce_ci_shrunk_end_to_end_resumes_and_builds_the_paper(tmp_path: Path) -> None:
    out_dir = tmp_path / "diloco"
    args = ["--scale", "ci", "--out", str(out_dir), "--max-steps", "24", "--seeds", "1", "--data", "synthetic",
            "--no-progress", "--jobs", "2"]  # fmt: skip
    first = run_script(*args)
    plan = json.loads((out_dir / "plan.json").read_text())
    n = len(plan["runs"])
    assert n >= 14 and first.stdout.count(" val loss ") >= n
    for r in plan["runs"]:
        summary = json.loads((out_dir / "runs" / r["run_id"] / "summary.json").read_text())
        assert summary["status"] == "ok", (r["run_id"], summary.get("error"))
    report = out_dir / "report"
    for name in ("main", "outer", "H", "K", "compression", "non-iid", "warm-start", "claims"):
        assert (report / f"{name}.md").exists() and (report / f"{name}.csv").exists(), name
    assert len(list((report / "figures").glob("*.png"))) == 4
    numbers = json.loads((report / "numbers.json").read_text())
    assert numbers["n_ok"] == str(n)

    second = run_script(*args)  # resumable: every finished run is skipped
    assert second.stdout.count("skipped: finished earlier") == n and "at a time" not in second.stdout

    build = REPO / "paper" / "build"
    paper = subprocess.run(["make", "-C", "paper", f"RUNS={out_dir}", f"OUT={tmp_path / 'paper'}"],
                           capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert paper.returncode == 0, paper.stdout[-2000:] + paper.stderr[-3000:]
    pdf = tmp_path / "paper" / "report.pdf"
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 50_000
    assert not build.exists() or build.is_dir()


@pytest.mark.slow
def test_paper_builds_from_the_committed_results(tmp_path: Path) -> None:
    """make -C paper with the default RUNS (the committed ci results): every macro resolves, figures are drawn,
    and every number in the text is the one the run dirs give."""
    out = subprocess.run(["make", "-C", "paper", f"OUT={tmp_path}"], capture_output=True, text=True, timeout=300,
                         cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert (tmp_path / "report.pdf").read_bytes()[:5] == b"%PDF-"
    text = (tmp_path / "report.md").read_text()
    assert "{{" not in text
    numbers = json.loads((tmp_path / "numbers.json").read_text())
    for key in ("main.ddp.loss", "main.diloco.loss", "local_comm_ratio", "claims_held"):
        assert numbers[key] in text
    # numbers.json agrees with the runs it was computed from
    summaries = [json.loads(p.read_text()) for p in (COMMITTED / "runs").glob("diloco-s*/summary.json")]
    mean = sum(s["final_val_loss"] for s in summaries) / len(summaries)
    assert numbers["main.diloco.loss"] == f"{mean:.4f}"
    # the two-scale section counts the committed small-scale runs that finished and has a column for that scale
    small = [json.loads(p.read_text()) for p in (REPO / "paper" / "results" / "small" / "runs").glob("*/summary.json")]
    assert numbers["small.n_ok"] == str(sum(s["status"] == "ok" for s in small)) and int(numbers["small.n_ok"]) > 0
    assert f"| small ({numbers['small.n_ok']} of {numbers['small.n_runs']} runs) |" in text
    # the gap's anatomy at scale small: its final gap is the paired one of the runs' final validation losses
    by_run = {p.parent.name: json.loads(p.read_text())["final_val_loss"]
              for p in (REPO / "paper" / "results" / "small" / "runs").glob("*/summary.json")}  # fmt: skip
    seeds = [i for i in range(3) if f"diloco-s{i}" in by_run and f"ddp-s{i}" in by_run]
    gap = sum(by_run[f"diloco-s{i}"] / by_run[f"ddp-s{i}"] - 1 for i in seeds) / len(seeds)
    assert numbers["small.gap_last"] == f"{gap:+.2%}" and numbers["small.seeds_paired"] == str(len(seeds))
    # 4 DiLoCo + streaming.png (6) + attacks.png (7) + heterogeneous.png (8) + swarm.png and netem_swarm.png (9)
    assert len(list((tmp_path / "figures").glob("*.png"))) == 9
