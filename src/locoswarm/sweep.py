"""End-of-sweep bookkeeping as a Hydra callback: a ``sweep.json`` manifest and a comparison table.

The manifest lists every job's overrides, run dir and status, so a partly failed sweep still says what ran.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from locoswarm.analysis import comparison_table, load_runs
from locoswarm.runlog import atomic_write_text


def write_manifest(sweep_dir: Path) -> dict:
    jobs = []
    for run_dir in sorted(p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")):
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
        jobs.append(
            {
                "run_dir": run_dir.name,
                "overrides": overrides,
                "status": summary.get("status", "missing"),
                "error": summary.get("error"),
            }
        )
    manifest = {"sweep_dir": str(sweep_dir), "jobs": jobs}
    atomic_write_text(sweep_dir / "sweep.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        write_manifest(sweep_dir)
        df = load_runs(sweep_dir)
        if len(df):
            print("\n" + comparison_table(df))
            print(f"\nruns: {sweep_dir}  (manifest: {sweep_dir / 'sweep.json'})")
