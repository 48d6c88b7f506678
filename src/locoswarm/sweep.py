"""Sweep bookkeeping: a ``sweep.json`` manifest and a comparison table (a Hydra callback), and the job-side rules
that make sweeps safe to re-run.

- A failing job never kills the sweep: under ``-m`` the task function records ``status=failed`` in the run's
  ``summary.json`` (the trainer already does for crashes; ``record_failure`` does for a config that does not
  validate) and returns, so every launcher (basic, joblib, submitit) runs the remaining jobs and this callback
  still writes the manifest. The sweep then exits with status 1 so scripts notice.
- Re-running a sweep into the same ``hydra.sweep.dir`` skips every run whose ``summary.json`` says ``ok`` with the
  same ``config_hash`` (``finished_summary``); failed or changed runs train again.

Hydra's basic launcher on its own runs the whole batch, then re-raises the first job's exception from the sweeper,
so ``on_multirun_end`` never runs and no manifest is written; a config error (``SystemExit``) stops it at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from locoswarm.analysis import comparison_table, load_runs, tradeoff_summary
from locoswarm.runlog import atomic_write_text

log = logging.getLogger(__name__)
MANIFEST = "sweep.json"


def run_subdir(name: str, override_dirname: str = "") -> str:
    """A run's folder in a sweep: its name plus a short hash of its overrides, e.g. ``diloco-H50-3fa9c1``.

    Stable under re-runs and grid edits (unlike ``hydra.job.num``), unique per grid point, and short however many
    overrides the command line carries (unlike ``hydra.job.override_dirname`` itself). Used by conf/experiment/ as
    ``hydra.sweep.subdir: ${run_subdir:${name},${hydra.job.override_dirname}}``.
    """
    if not override_dirname:
        return str(name)
    return f"{name}-{hashlib.sha1(str(override_dirname).encode()).hexdigest()[:6]}"


# Registered on import: locoswarm-train imports this module, in the launching process and in every launcher worker.
OmegaConf.register_new_resolver("run_subdir", run_subdir, replace=True)


def in_multirun() -> bool:
    """True inside a job of ``locoswarm-train -m`` (any launcher)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finished_summary(run_dir: str | Path, config_hash: str) -> dict[str, Any] | None:
    """The run's summary if it already finished with ``status=ok`` for this exact config, else None (train it)."""
    summary = read_summary(run_dir)
    if summary and summary.get("status") == "ok" and summary.get("config_hash") == config_hash:
        return summary
    return None


def record_failure(run_dir: str | Path, error: str, cfg: DictConfig | None = None) -> None:
    """A job that failed before the trainer started (its config did not validate) still leaves a summary."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = {"status": "failed", "error": error, "final_val_loss": None}
    try:
        summary["name"] = str(cfg.name) if cfg is not None else None
    except Exception:  # the name may interpolate the very value that is broken
        summary["name"] = None
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")


def write_manifest(sweep_dir: Path, started: float | None = None) -> dict:
    """``sweep.json``: every job's run dir, overrides, status (ok | failed | missing), error and config hash.

    ``reused`` marks runs whose summary predates this invocation (``started``): they were skipped, not retrained.
    """
    jobs = []
    for run_dir in sorted(p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")):
        summary = read_summary(run_dir) or {}
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
        summary_path = run_dir / "summary.json"
        job = {
            "run_dir": str(run_dir.relative_to(sweep_dir)),
            "overrides": overrides,
            "status": summary.get("status", "missing"),
            "error": summary.get("error"),
            "config_hash": summary.get("config_hash"),
            "final_val_loss": summary.get("final_val_loss"),
        }
        if started is not None and summary_path.exists():
            job["reused"] = summary_path.stat().st_mtime < started
        jobs.append(job)
    counts = {s: sum(j["status"] == s for j in jobs) for s in ("ok", "failed", "missing")}
    manifest = {"sweep_dir": str(sweep_dir), "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "counts": counts,
                "jobs": jobs}  # fmt: skip
    atomic_write_text(sweep_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


class SweepSummary(Callback):
    """Writes ``sweep.json`` and prints the comparison table when a multirun ends; exit status 1 if a job failed."""

    def __init__(self) -> None:
        self._started: float | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        manifest = write_manifest(sweep_dir, self._started)
        df = load_runs(sweep_dir)
        if len(df):
            print("\n" + comparison_table(df))
        reused = sum(bool(j.get("reused")) for j in manifest["jobs"])
        print(f"\nruns: {sweep_dir}  (manifest: {sweep_dir / MANIFEST}; {reused} finished runs reused)")
        if len(df) and (summary := tradeoff_summary(df)):
            print("\n" + summary)
        failed = [j for j in manifest["jobs"] if j["status"] != "ok"]
        if failed:
            for j in failed:
                print(f"  {j['status']}: {j['run_dir']}: {j['error']}")
            print(
                f"{len(failed)} of {len(manifest['jobs'])} jobs did not finish; re-run the same command to retry them"
            )
            raise SystemExit(1)
