"""experiments/reproduce_swarm.py: every variant composes at equal tokens on the same pipeline, and a shrunk study
runs end to end into its table; the paper's SWARM section fills from the committed runs."""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))


def test_every_variant_composes_on_the_same_pipeline_at_equal_tokens() -> None:
    from reproduce_diloco import compose
    from reproduce_swarm import PEERS, SLOW_SPEEDS, SLOW_STAGE, STAGES, VARIANTS, plan

    runs = plan(3)
    assert len(runs) == 3 * len(VARIANTS) and len({r.run_id for r in runs}) == len(runs)
    cfgs = {r.run_id: compose(r.overrides) for r in runs}
    ref = cfgs["swarm-s0"]
    assert ref.pipeline.stages == STAGES and ref.workers == PEERS and ref.network.bandwidth_mbps == 100
    for run_id, cfg in cfgs.items():
        assert (
            cfg.model,
            cfg.train.max_steps,
            cfg.train.batch_size,
            cfg.pipeline.stages,
            cfg.pipeline.microbatches,
        ) == (ref.model, ref.train.max_steps, ref.train.batch_size, ref.pipeline.stages, ref.pipeline.microbatches)
        assert cfg.algorithm.name == ("ddp" if run_id.startswith("swarm") else "diloco"), run_id
        speeds = list(cfg.network.compute_speed)
        slowstage = "-slowstage" in run_id
        assert speeds == (SLOW_STAGE if slowstage else SLOW_SPEEDS if "-slow-" in run_id else []), run_id
        stochastic = "-slow-stochastic" in run_id or slowstage
        assert cfg.pipeline.routing.value == ("stochastic" if stochastic else "fixed"), run_id
        assert (cfg.pipeline.rebalance_every > 0) == ("-moves" in run_id), run_id
    assert SLOW_SPEEDS[PEERS - 1] < 1 and min(SLOW_STAGE[PEERS:]) < 1  # the slow peer; the slow stage


@pytest.mark.slow
def test_a_shrunk_study_runs_into_its_table(tmp_path) -> None:
    from reproduce_swarm import VARIANTS, main

    assert main(["--out", str(tmp_path), "--seeds", "1", "--max-steps", "24", "--data", "synthetic", "--jobs", "1",
                 "--no-progress"]) == 0  # fmt: skip
    table = (tmp_path / "report" / "swarm.md").read_text()
    numbers = json.loads((tmp_path / "report" / "numbers.json").read_text())
    assert set(numbers) == set(VARIANTS) and all(n["seeds"] == 1 for n in numbers.values())
    assert all(f"| {v} |" in table for v in VARIANTS)
    # the slow peer gets a quarter of stage 0's work under fixed routing and much less under stochastic routing
    assert numbers["swarm-slow-fixed"]["slow_share"] == [0.25]
    assert numbers["swarm-slow-stochastic"]["slow_share"][0] < 0.15
    assert (tmp_path / "report" / "swarm.png").stat().st_size > 10_000


COMMITTED = REPO / "paper" / "results" / "swarm_ci"


def test_the_papers_section_fills_from_the_committed_results(tmp_path) -> None:
    sys.path.insert(0, str(REPO / "paper"))
    import build

    (tmp_path / "figures").mkdir()
    nums, tables = build.swarm_section(COMMITTED, tmp_path)
    assert (tmp_path / "figures" / "swarm.png").stat().st_size > 10_000
    used = set(re.findall(r"\{\{\s*(swarm\.[\w.\-]+)\s*\}\}", (REPO / "paper" / "report.md").read_text()))
    assert used and used <= set(nums), sorted(used - set(nums))
    filled = build.fill("{{table:swarm}}", nums, tables)
    assert "{{" not in filled and "| diloco-swarm |" in filled
    plan = json.loads((COMMITTED / "plan.json").read_text())
    assert plan["seeds"] >= 3
    for variant in ("swarm", "diloco-swarm"):
        summaries = [json.loads((COMMITTED / "runs" / f"{variant}-s{s}" / "summary.json").read_text())
                     for s in range(plan["seeds"])]  # fmt: skip
        assert all(s["status"] == "ok" for s in summaries)
        loss = statistics.mean(s["final_val_loss"] for s in summaries)
        assert nums[f"swarm.{variant.replace('-', '_')}.loss"] == f"{loss:.4f}"
