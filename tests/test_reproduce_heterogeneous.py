"""experiments/reproduce_heterogeneous.py: every variant composes on the heterogeneous swarm at equal work, and a
shrunk study runs end to end into its table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))


def test_every_variant_composes_on_the_same_swarm_at_equal_work() -> None:
    from reproduce_diloco import compose
    from reproduce_heterogeneous import LONG, SPEEDS, VARIANTS, plan

    runs = plan(3)
    assert len(runs) == 3 * 2 * len(VARIANTS) and len({r.run_id for r in runs}) == len(runs)
    cfgs = {r.run_id: compose(r.overrides) for r in runs}
    ref = cfgs["diloco-s0"]
    assert list(ref.network.compute_speed) == SPEEDS and max(SPEEDS) / min(SPEEDS) >= 4
    assert ref.network.churn.drop_prob > 0
    for run_id, cfg in cfgs.items():
        assert cfg.network == ref.network and cfg.model == ref.model and cfg.workers == ref.workers, run_id
        assert cfg.algorithm.inner_steps == ref.algorithm.inner_steps, run_id
        warm = cfg.algorithm.warmup_sync_steps
        work = LONG if "-long-" in run_id else 1.0  # in synchronous runs' local steps
        if cfg.algorithm.name == "async_diloco":  # the furthest worker's budget: about the same tokens in all
            steps = warm * 4 + (cfg.train.max_steps - warm) * sum(SPEEDS)
            assert steps == pytest.approx(warm * 4 + (ref.train.max_steps - warm) * 4 * work, rel=0.02), run_id
        else:
            assert cfg.train.max_steps == warm + (ref.train.max_steps - warm) * work, run_id


@pytest.mark.slow
def test_a_shrunk_study_runs_into_its_table(tmp_path) -> None:
    from reproduce_heterogeneous import VARIANTS, main

    assert main(["--out", str(tmp_path), "--seeds", "1", "--max-steps", "24", "--data", "synthetic", "--jobs", "1",
                 "--no-progress"]) == 0  # fmt: skip
    table = (tmp_path / "report" / "heterogeneous.md").read_text()
    numbers = json.loads((tmp_path / "report" / "numbers.json").read_text())
    assert set(numbers) == set(VARIANTS) and all(n["seeds"] == 1 for n in numbers.values())
    assert numbers["diloco"]["reached"] == 1  # its own final loss is its target
    assert numbers["async-dn-dylu"]["staleness"] and numbers["noloco"]["replica_spread"]
    assert all(f"| {v} |" in table for v in VARIANTS)
    assert (tmp_path / "report" / "heterogeneous.png").stat().st_size > 10_000


COMMITTED = REPO / "paper" / "results" / "heterogeneous_ci"


def test_the_papers_section_fills_from_the_committed_results(tmp_path) -> None:
    """Every heterogeneous macro of report.md is defined by the committed runs, and the numbers are the runs'."""
    import re
    import statistics

    sys.path.insert(0, str(REPO / "paper"))
    import build

    (tmp_path / "figures").mkdir()
    nums, tables = build.heterogeneous_section(COMMITTED, tmp_path)
    assert (tmp_path / "figures" / "heterogeneous.png").stat().st_size > 10_000
    used = set(re.findall(r"\{\{\s*(heterogeneous\.[\w.\-]+)\s*\}\}", (REPO / "paper" / "report.md").read_text()))
    assert used and used <= set(nums), sorted(used - set(nums))
    filled = build.fill("{{table:heterogeneous}}", nums, tables)
    assert "{{" not in filled and "| async-dn-dylu |" in filled
    plan = json.loads((COMMITTED / "plan.json").read_text())
    assert plan["seeds"] >= 3
    for variant in ("diloco", "async-dn-dylu", "noloco"):
        summaries = [json.loads((COMMITTED / "runs" / f"{variant}-s{s}" / "summary.json").read_text())
                     for s in range(plan["seeds"])]  # fmt: skip
        assert all(s["status"] == "ok" for s in summaries)
        key = variant.replace("-", "_")
        loss = statistics.mean(s["final_val_loss"] for s in summaries)
        assert nums[f"heterogeneous.{key}.loss"] == f"{loss:.4f}"
    assert nums["heterogeneous.diloco.reached"] == "3/3"  # its own final loss is its target
