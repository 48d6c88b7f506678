"""experiments/reproduce_streaming.py: the plan is DiLoCo vs streaming at equal tokens, a shrunk study runs,
resumes and fills every streaming macro of the paper; the committed results agree with the numbers drawn from them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "reproduce_streaming.py"
COMMITTED = REPO / "paper" / "results" / "streaming_ci"
sys.path.insert(0, str(REPO / "experiments"))
sys.path.insert(0, str(REPO / "paper"))


def _value(overrides: list[str], key: str) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith(key + "="))


def test_plan_compares_streaming_with_diloco_at_equal_tokens_on_a_priced_network() -> None:
    from reproduce_streaming import STREAMING, plan, study_scale

    for name in STREAMING:
        scale, st = study_scale(name)
        runs = plan(scale, st, st.seeds)
        assert len({r.run_id for r in runs}) == len(runs)
        variants = list(dict.fromkeys(r.variant for r in runs))
        assert variants[0] == "diloco" and {f"streaming-P{p}" for p in st.fragments} <= set(variants), name
        p = max(st.fragments)
        assert {f"streaming-P{p}-tau{st.overlap_steps}", f"streaming-P{p}-tau{st.overlap_steps}-int4"} <= set(variants)
        ref = next(r for r in runs if r.variant == "diloco" and r.seed == 0)
        for r in runs:  # equal tokens, same warm-start, network and step time: only the algorithm (and codec) differ
            for key in ("train.max_steps", "workers", "algorithm.inner_steps", "algorithm.warmup_sync_steps",
                        "network", "network.step_seconds", "train.batch_size", "model.n_layer"):  # fmt: skip
                if any(o.startswith(key + "=") for o in ref.overrides):
                    assert _value(r.overrides, key) == _value(ref.overrides, key), (name, r.run_id, key)
            differs = {o.split("=", 1)[0] for o in set(r.overrides) ^ set(ref.overrides)}
            assert differs <= {"algorithm", "compression", "name", "seed"} | {
                k for k in differs if k.startswith("algorithm.")
            }, (name, r.run_id, differs)
        assert (
            _value(ref.overrides, "network") == "wan_100mbit"
            and float(_value(ref.overrides, "network.step_seconds")) > 0
        )
        assert _value(ref.overrides, "train.log_interval") == "1"  # every exchange gets a row of its own
        if name == "ci":
            assert st.seeds >= 3


def test_every_variant_composes_and_the_model_has_a_block_per_fragment() -> None:
    from reproduce_diloco import compose
    from reproduce_streaming import plan, study_scale

    scale, st = study_scale("ci")
    for r in plan(scale, st, 1):
        cfg = compose(r.overrides)
        assert cfg.model.n_layer >= max(st.fragments)
        if r.variant != "diloco":
            assert cfg.algorithm.name == "streaming_diloco" and cfg.algorithm.overlap_steps < cfg.algorithm.inner_steps


def run_script(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def _check_section(runs: Path, out: Path) -> dict[str, str]:
    """paper/build.py's streaming section from ``runs``: every streaming macro of report.md is defined."""
    import build

    (out / "tables").mkdir(parents=True, exist_ok=True)
    nums, tables = build.streaming_section(runs, out)
    used = set(re.findall(r"\{\{\s*(streaming\.[\w.\-]+)\s*\}\}", (REPO / "paper" / "report.md").read_text()))
    assert used and used <= set(nums), sorted(used - set(nums))
    assert nums["streaming.all_exchanges_logged"] == "yes"
    filled = build.fill("{{table:streaming}}\n{{table:streaming_claims}} {{streaming.diloco.loss}}", nums, tables)
    assert "{{" not in filled and "Streaming P=4" in filled
    assert (out / "figures" / "streaming.png").stat().st_size > 10_000
    return nums


def test_the_papers_streaming_section_fills_from_the_committed_results(tmp_path: Path) -> None:
    nums = _check_section(COMMITTED, tmp_path)
    assert nums["streaming.scale"] == "ci" and nums["streaming.network"] == "wan_100mbit"


@pytest.mark.slow
def test_shrunk_study_runs_resumes_and_fills_the_papers_streaming_section(tmp_path: Path) -> None:
    out_dir = tmp_path / "streaming"
    args = ["--scale", "ci", "--out", str(out_dir), "--max-steps", "48", "--seeds", "1", "--data", "synthetic",
            "--no-progress"]  # fmt: skip
    first = run_script(*args)
    plan = json.loads((out_dir / "plan.json").read_text())
    n = len(plan["runs"])
    assert n == 5 and first.stdout.count(" val loss ") >= n
    for r in plan["runs"]:
        summary = json.loads((out_dir / "runs" / r["run_id"] / "summary.json").read_text())
        assert summary["status"] == "ok", (r["run_id"], summary.get("error"))
    report = out_dir / "report"
    assert (report / "figures" / "streaming.png").stat().st_size > 10_000
    table = (report / "streaming.csv").read_text()
    assert "streaming-P4-tau1-int4" in table

    second = run_script(*args)  # resumable: every finished run is skipped
    assert second.stdout.count("skipped: finished earlier") == n and "at a time" not in second.stdout

    _check_section(out_dir, tmp_path / "paper")


def test_committed_results_agree_with_the_numbers_drawn_from_them() -> None:
    """The numbers the paper quotes are the run dirs' numbers: losses, peak bytes (the largest fragment after the
    warm-start, read from metrics.jsonl), totals; and streaming's peak is below DiLoCo's."""
    import numpy as np
    from streaming_report import claims as streaming_claims
    from streaming_report import load, numbers, study_table

    rep = load(COMMITTED)
    assert (rep.runs["status"] == "ok").all()
    t = study_table(rep)
    nums = numbers(rep, t, streaming_claims(t))
    assert nums["streaming.all_exchanges_logged"] == "yes" and int(nums["streaming.seeds"]) >= 3
    for variant in t["variant"]:
        summaries = [json.loads(p.read_text()) for p in (COMMITTED / "runs").glob(f"{variant}-s[0-9]*/summary.json")]
        key = variant.replace("-", "_")
        assert nums[f"streaming.{key}.loss"] == f"{np.mean([s['final_val_loss'] for s in summaries]):.4f}"
        assert nums[f"streaming.{key}.total_mb"] == f"{np.mean([s['bytes_sent_total'] for s in summaries]) / 1e6:.1f}"
    peak = dict(zip(t["variant"], t["peak_bytes"], strict=True))
    warm = rep.scale["warmup_sync"]
    rows = [json.loads(line) for line in (COMMITTED / "runs" / "streaming-P4-s0" / "metrics.jsonl").open()]
    assert peak["streaming-P4"] == max(b for r in rows if r["step"] > warm for b in r.get("fragment_bytes_sent", []))
    assert peak["streaming-P4"] < peak["streaming-P2"] < peak["diloco"]


@pytest.mark.slow
def test_paper_builds_with_the_committed_streaming_results(tmp_path: Path) -> None:
    out = subprocess.run(["make", "-C", "paper", f"OUT={tmp_path}"], capture_output=True, text=True, timeout=300,
                         cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    text = (tmp_path / "report.md").read_text()
    assert "{{" not in text and "## 6. Streaming DiLoCo" in text
    numbers = json.loads((tmp_path / "numbers.json").read_text())
    for key in ("streaming.diloco.loss", "streaming.streaming_P4.peak_kb", "streaming.diloco.util_local"):
        assert numbers[key] in text
    assert (tmp_path / "figures" / "streaming.png").exists()
